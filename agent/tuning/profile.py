"""Tuning profiles: the YAML schema (pydantic), selection by node labels, and the built-in default.

A file holds one profile (a mapping with ``name``) or several (``profiles: [...]``), each with an
optional node-label ``selector`` and a ``priority``. Parsing never touches the host: any input gives
a list of profiles or a :class:`ProfileError` naming the bad field (the property test in
``tests/agent/tuning/test_profile.py`` feeds it arbitrary YAML). Checks that need the host (does
the sysctl exist, which THP values does this kernel offer) are in ``agent/tuning/validate.py``.
Files are UTF-8 (``read_profile_text``); a key repeated in a YAML mapping is an error; numbers are
ASCII as the kernel parses them; sysctls that hand out root (``agent/tuning/refused.py``) are
refused unless the profile names them under ``unsafe:``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.tuning.refused import refusal

SYSCTL_KEY = re.compile(r"^[a-z0-9_]+(\.[A-Za-z0-9_\-]+)+$")  # dots only: never a path
# ">=" takes one whole number, as the kernel parses it: ASCII digits (proc_get_long() uses
# strtoul; Python's int() and str.isdigit() also take "٥٠٠٠" and "²", which the kernel refuses).
FLOOR = re.compile(r"^>=\s*([0-9]+)$")
SYSCTL_VALUE = re.compile(r"^[^\s][^\n]*$")
NUMBER = re.compile(r"^-?[0-9]+$")
THP_MODES = ("always", "madvise", "never")
ITEMS = ("sysctl", "thp", "irqbalance", "irq_affinity", "kmod")  # apply order: irqbalance before pinning
THP_DEFRAG = ("always", "defer", "defer+madvise", "madvise", "never")


class ProfileError(ValueError):
    """The profile is invalid; the message names the field."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key repeated in a mapping is an error (PyYAML keeps the last)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[arg-type]
        try:
            repeated = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: the constructor below says so
            continue
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
            )
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_profile_text(path: Path) -> str:
    """A profile file's text: UTF-8 only (a UTF-16 or Latin-1 file is a ProfileError, not a
    traceback); OSError when it cannot be read."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})") from None


class THP(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: Literal["always", "madvise", "never"] | None = None
    defrag: Literal["always", "defer", "defer+madvise", "madvise", "never"] | None = None


class Irqbalance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool


class IrqAffinity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interfaces: list[str] = Field(min_length=1)
    cpus: str  # a kernel CPU list, checked against the online CPUs by validate.py
    mode: Literal["pin", "spread"] = "pin"  # pin: every IRQ on the whole list; spread: one CPU each
    avoid_exclusive_cpus: bool = True  # leave out CPUs the kubelet's static CPU manager gave pods

    @field_validator("interfaces")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", name) or name in (".", ".."):
                raise ValueError(f"interface {name!r}: not an interface name")
        return v


class Kmod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    load: list[str] = Field(min_length=1)

    @field_validator("load")
    @classmethod
    def _allowed(cls, v: list[str]) -> list[str]:
        from agent.tuning.kmod import ALLOWED

        for name in v:
            if name not in ALLOWED:
                raise ValueError(f"module {name!r} is not in the allowlist ({', '.join(ALLOWED)})")
        return list(dict.fromkeys(v))


class Profile(BaseModel):
    """One profile; every section optional. See README "Tuning" for each item."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    selector: dict[str, str] = Field(default_factory=dict)  # node labels that must all match
    priority: int = Field(default=0, ge=-1000, le=1000)
    sysctl: dict[str, str] = Field(default_factory=dict)
    thp: THP | None = None
    irqbalance: Irqbalance | None = None
    irq_affinity: IrqAffinity | None = None
    kmod: Kmod | None = None
    unsafe: list[str] = Field(default_factory=list)  # sysctl keys allowed although refused (refused.py)

    @field_validator("sysctl", mode="before")
    @classmethod
    def _sysctl_values(cls, v: object) -> object:
        if not isinstance(v, Mapping):
            return v
        out = {}
        for key, value in v.items():
            if not isinstance(key, str) or not SYSCTL_KEY.match(key):
                raise ValueError(f"sysctl key {key!r}: expected dotted names like net.core.somaxconn")
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ValueError(f"sysctl {key}: value {value!r} must be a number or a string")
            text = str(value).strip()
            if text.startswith(">="):
                floor = FLOOR.match(text)
                if floor is None:
                    raise ValueError(f"sysctl {key}: {value!r}: '>=' takes one whole number (ASCII digits)")
                out[key] = ">=" + floor.group(1)  # a leading zero is refused by validate.py
                continue
            if not text or not SYSCTL_VALUE.match(text):
                raise ValueError(f"sysctl {key}: value {value!r} is empty or malformed")
            fields = text.split()
            # numbers are normalised to single spaces; a string sysctl (core_pattern "a  b") is kept as
            # written: its spaces are part of the value
            out[key] = " ".join(fields) if all(NUMBER.match(f) for f in fields) else text
        return out

    @model_validator(mode="after")
    def _refused(self) -> Profile:
        """Keys that hand out root (``agent/tuning/refused.py``) only when named under ``unsafe:``."""
        for key in self.unsafe:
            if key not in self.sysctl:
                raise ValueError(f"unsafe: {key!r} is not a sysctl of this profile")
        for key, value in self.sysctl.items():
            why = refusal(key, value.removeprefix(">="))
            if why and key not in self.unsafe:
                raise ValueError(f"sysctl {key}: refused ({why}); name it under 'unsafe:' to allow it")
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.selector.items())

    def items(self) -> list[str]:
        """The item sections this profile sets."""
        return [name for name in ITEMS if getattr(self, name)]


class ProfileFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profiles: list[Profile] = Field(min_length=1)


def _location(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return f"{where}: {first['msg']}"


def parse(text: str) -> list[Profile]:
    """Profiles in a YAML document; raises ProfileError (never another exception)."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        raise ProfileError(f"not YAML: {e}") from None
    except (ValueError, RecursionError) as e:  # e.g. yaml's int overflow or deeply nested input
        raise ProfileError(f"not YAML: {e}") from None
    if not isinstance(data, dict):
        raise ProfileError("a profile is a mapping with a name (or a mapping with 'profiles: [...]')")
    try:
        profiles = ProfileFile.model_validate(data).profiles if "profiles" in data else [Profile.model_validate(data)]
    except ValidationError as e:
        raise ProfileError(_location(e)) from None
    except RecursionError as e:
        raise ProfileError(f"nested too deeply: {e}") from None
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ProfileError(f"profiles: names repeat ({', '.join(sorted(names))})")
    return profiles


def select(profiles: list[Profile], labels: Mapping[str, str] | None) -> Profile | None:
    """The matching profile with the highest priority (then the most specific selector, then the
    first). Without node labels only an unconditional profile (no selector) matches."""
    known = labels or {}
    candidates = [
        (p.priority, len(p.selector), -i, p)
        for i, p in enumerate(profiles)
        if (p.matches(known) if labels is not None else not p.selector)
    ]
    return max(candidates, key=lambda c: c[:3])[3] if candidates else None


# The seeds' recommendations (README "Tuning", value by value). Observe mode by default: it
# reports what it would change and changes nothing.
DEFAULT_PROFILE = """
name: nodetune-default
sysctl:
  net.core.somaxconn: ">=4096"
  net.ipv4.tcp_max_syn_backlog: ">=8192"
  fs.file-max: ">=1048576"
  net.ipv4.ip_local_port_range: "10240 65000"
  vm.max_map_count: ">=262144"
thp:
  enabled: never
  defrag: never
"""


def default_profile() -> Profile:
    return parse(DEFAULT_PROFILE)[0]
