"""Profiles: schema, selection, the built-in default, and a property test of the parser."""

from __future__ import annotations

import builtins
import os
from unittest import mock

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.tuning.profile import DEFAULT_PROFILE, ProfileError, default_profile, parse, select


def test_one_profile_and_its_normalised_values() -> None:
    (p,) = parse(
        "name: redis\nsysctl:\n  net.core.somaxconn: '>= 20480'\n  net.ipv4.ip_local_port_range: '10240   65000'\n"
        "  vm.max_map_count: 262144\nthp: {enabled: never}\n"
    )
    assert p.sysctl == {
        "net.core.somaxconn": ">=20480",
        "net.ipv4.ip_local_port_range": "10240 65000",
        "vm.max_map_count": "262144",
    }
    assert p.thp is not None and p.thp.enabled == "never" and p.thp.defrag is None
    assert p.items() == ["sysctl", "thp"]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: x\nsysctl: {net.core.somaxconn: [1]}", "sysctl"),
        ("name: x\nsysctl: {'../../etc/passwd': 1}", "sysctl"),
        ("name: x\nsysctl: {'net/core/somaxconn': 1}", "sysctl"),
        ("name: x\nsysctl: {net.core.somaxconn: true}", "sysctl"),
        ("name: x\nthp: {enabled: sometimes}", "thp.enabled"),
        ("name: x\nthp: {enabld: never}", "thp.enabld"),
        ("name: x\nirq_balance: {enabled: false}", "irq_balance"),
        ("name: 'has space'", "name"),
        ("sysctl: {}", "name"),
        ("name: x\npriority: 5000", "priority"),
        ("profiles: []", "profiles"),
        ("profiles: [{name: a}, {name: a}]", "profiles"),
        ("- just a list", "mapping"),
        ("name: [unclosed", "YAML"),
    ],
)
def test_invalid_profiles_name_the_field(text: str, field: str) -> None:
    with pytest.raises(ProfileError, match=field.replace(".", r"\.").replace("[", r"\[")):
        parse(text)


def test_selection_by_labels_and_priority() -> None:
    profiles = parse(
        """
profiles:
  - name: base
  - name: redis
    selector: {workload: redis}
    priority: 10
  - name: redis-big
    selector: {workload: redis, size: big}
    priority: 10
  - name: low
    selector: {workload: redis}
    priority: -1
"""
    )
    assert select(profiles, None).name == "base"  # labels not known: only the unconditional one
    assert select(profiles, {}).name == "base"
    assert select(profiles, {"workload": "redis"}).name == "redis"
    assert select(profiles, {"workload": "redis", "size": "big"}).name == "redis-big"  # more specific
    assert select(parse("profiles: [{name: only, selector: {a: b}}]"), None) is None


def test_default_profile_is_valid_and_documented() -> None:
    p = default_profile()
    assert p.name == "nodetune-default" and p.thp is not None and p.thp.enabled == "never"
    assert yaml.safe_load(DEFAULT_PROFILE)["sysctl"]["net.core.somaxconn"] == ">=4096"


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
profile_like = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=10) | st.integers(),
        "sysctl": st.dictionaries(st.text(max_size=25), st.text(max_size=12) | st.integers(), max_size=3) | yaml_values,
        "thp": st.fixed_dictionaries({}, optional={"enabled": st.text(max_size=8), "defrag": yaml_values}),
        "selector": yaml_values,
        "priority": yaml_values,
        "profiles": st.lists(yaml_values, max_size=3),
    },
)


def refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"host I/O during parse: {args}")


def _parse_or_error(text: str) -> None:
    """parse() with every way to the host's files refused: it must not need them."""
    try:
        with (
            mock.patch.object(builtins, "open", refuse),
            mock.patch.object(os, "open", refuse),
            mock.patch.object(os, "stat", refuse),
        ):
            profiles = parse(text)
    except ProfileError:
        return
    assert profiles and all(p.name for p in profiles)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_gives_profiles_or_a_profile_error(text: str) -> None:
    _parse_or_error(text)


@settings(max_examples=300, deadline=None)
@given(doc=profile_like | yaml_values)
def test_any_yaml_document_gives_profiles_or_a_profile_error(doc: object) -> None:
    _parse_or_error(yaml.safe_dump(doc))
