"""The capabilities-only component's list, proved on this kernel (tests/e2e/capabilities.py): with
exactly that bounding set every probe loads and every collector reads the host's and a pod's
network namespaces; without any one of them, the units named here fail, reported as said."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.capabilities import component_capabilities, prove, table

# capability removed -> the units that must then fail (each capability is needed by something)
EXPECTED = {
    "SYS_ADMIN": {
        "probe runqlat",
        "probe lockstat",
        "probe connect",
        "ports (host netns)",
        "ports (a pod's netns)",
        "listen (host netns)",
        "listen (a pod's netns)",
    },
    "SYSLOG": {"probe lockstat"},
    "SYS_PTRACE": {"ports (a pod's netns)", "listen (a pod's netns)"},
}


@pytest.mark.bpf
@pytest.mark.root
def test_each_capability_is_needed_and_together_they_suffice(tmp_path: Path, header_cache: Path) -> None:
    assert set(component_capabilities()) == set(EXPECTED)
    runs = prove(header_cache, tmp_path)
    print(table(runs))  # the README's table (pytest -s)
    full, *removed = runs
    assert full.failures == {}, full.failures
    for run in removed:
        (cap,) = set(full.bounding) - set(run.bounding)
        assert set(run.failures) == EXPECTED[cap], (cap, run.failures)
        for unit, how in run.failures.items():
            if unit.startswith("probe "):
                assert how.startswith("nodetune_probe_up 0"), how
