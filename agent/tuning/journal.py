"""The journal of original values, on the host's disk, written before every change.

One JSON file (``<state dir>/tuning-journal.json``), always replaced atomically: written to a
temporary file in the same directory, fsync'd, renamed over the old one, and the directory
fsync'd (rename(2) is atomic; the fsyncs make it durable across a power cut). It records:

* ``boot_id`` (``/proc/sys/kernel/random/boot_id``): after a reboot the kernel is back at its boot
  values, so the originals are current again and the entries are dropped, not restored;
* ``entries``: ``item/key`` -> the value before nodetune first changed it, the run that did, and
  whether that change survives a reboot (``survives``, decided when it was written: irqbalance
  disabled through systemd does, a SIGTERM'd irqbalance without systemd does not; an entry without
  the field, written by an older nodetune, takes its item's default);
* ``applying``: the run in progress, or null. A run found in progress at start-up was cut short
  (SIGKILL, power): it is undone, so a node is never left with half a run;
* ``undo``: for the run in progress, ``item/key`` -> the value the key held when the run began,
  written before the run's write to that key. Undoing a run writes these back, so a key that an
  earlier run had already changed returns to that run's value, not to a mix (``engine.py``);
* ``releasing``: keys the run in progress puts back to their original (dropped from the profile);
  their entries are removed only when the run completes.

Version 1 journals (no ``undo``) are read with the run in progress's own entries as its undo log.

A journal that cannot be parsed is an error that stops every action (nothing is written).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

NAME = "tuning-journal.json"
TEMP_PREFIX = ".journal-"  # save()'s temporary file; one left by a killed writer is removed under the lock
VERSION = 2
READABLE = (1, 2)


class JournalError(Exception):
    """The journal is unreadable or malformed: nothing is done until an operator looks."""


@dataclass
class Entry:
    original: str
    run: int
    survives: bool | None = None  # None: not recorded (an older journal), the item's default


@dataclass
class Journal:
    path: Path
    boot_id: str
    profile: str = ""
    run: int = 0  # the last run number handed out
    applying: int | None = None
    entries: dict[str, Entry] = field(default_factory=dict)
    undo: dict[str, str] = field(default_factory=dict)
    releasing: list[str] = field(default_factory=list)

    @staticmethod
    def key(item: str, key: str) -> str:
        return f"{item}/{key}"

    @classmethod
    def load(cls, directory: Path, boot_id: str) -> Journal:
        path = directory / NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path, boot_id)
        except OSError as e:
            raise JournalError(f"{path}: {e.strerror}") from None
        try:
            data = json.loads(raw.decode("utf-8"))  # UnicodeDecodeError is a ValueError
            if not isinstance(data, dict) or data.get("version") not in READABLE:
                raise ValueError(f"version {data.get('version') if isinstance(data, dict) else None!r}")
            entries = {
                str(k): Entry(_text(v["original"]), int(v["run"]), _flag(v.get("survives")))
                for k, v in dict(data["entries"]).items()
            }
            applying = data["applying"]
            journal = cls(
                path,
                str(data["boot_id"]),
                str(data.get("profile", "")),
                int(data["run"]),
                None if applying is None else int(applying),
                entries,
                {str(k): _text(v) for k, v in dict(data.get("undo", {})).items()},
                [str(k) for k in list(data.get("releasing", []))],
            )
            if data["version"] == 1 and journal.applying is not None:  # v1 undid the run's own entries
                journal.undo = {k: e.original for k, e in entries.items() if e.run == journal.applying}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise JournalError(f"{path}: corrupt journal ({e}); fix or remove it by hand") from None
        return journal

    def save(self) -> None:
        data = {
            "version": VERSION,
            "boot_id": self.boot_id,
            "profile": self.profile,
            "run": self.run,
            "applying": self.applying,
            "entries": {
                k: {"original": e.original, "run": e.run, **({} if e.survives is None else {"survives": e.survives})}
                for k, e in sorted(self.entries.items())
            },
            "undo": self.undo,  # in the order the run wrote: undone in reverse
            "releasing": sorted(self.releasing),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.entries.clear()
        self.undo.clear()
        self.releasing.clear()
        self.applying = None


def _flag(value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"survives: {value!r} is not true or false")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value
