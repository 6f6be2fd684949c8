"""The journal is checked before it is trusted: every key it names must be a key its item can hold,
resolving inside the host root; otherwise the journal is refused (exit 2) and nothing is written,
inside the host tree or outside it. The first case is the issue's reproduction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.agent.tuning.hosttree import make_host, snapshot
from tests.agent.tuning.test_engine import PROFILE, tune


def journal(
    host: Path, entries: dict[str, str], undo: dict[str, str] | None = None, applying: int | None = None
) -> None:
    path = host / "var/lib/nodetune/tuning-journal.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "version": 2 if undo else 1,  # version 1: what the code before the undo log wrote and read
        "boot_id": "11111111-2222-3333-4444-555555555555",
        "profile": "p",
        "run": 1,
        "applying": applying,
        "entries": {k: {"original": v, "run": 1} for k, v in entries.items()},
        "undo": undo or {},
        "releasing": [],
    }
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "key",
    [
        "sysctl/{outside}",  # "sysctl//tmp/x/outsidefile": an absolute path as the key
        "sysctl/net.core.evil",  # a symlink in the host's proc/sys pointing outside
        "sysctl/net..core",
        "sysctl/net.core.somaxconn/../../../../x",
        "thp/../../../../x",
        "irq_affinity/irq1/../../../x",
        "kmod/../../x",
        "nosuchitem/x",
        "sysctl",
    ],
)
@pytest.mark.parametrize("where", ["entries", "undo"])
def test_a_journal_key_outside_the_host_is_refused_and_nothing_is_written(tmp_path: Path, key: str, where: str) -> None:
    host = make_host(tmp_path / "host")
    outside = tmp_path / "x" / "outsidefile"
    outside.parent.mkdir()
    outside.write_text("precious\n")
    (host / "proc/sys/net/core/evil").symlink_to(outside)
    key = key.format(outside=outside)
    good = {"sysctl/net.core.somaxconn": "4096"}
    if where == "entries":
        journal(host, {**good, key: "overwritten"})
    else:
        journal(host, good, undo={key: "overwritten"}, applying=1)
    before = snapshot(host)
    for action, profile in (("revert", None), ("apply", PROFILE), ("verify", PROFILE)):
        code, _, err = tune(action, host, profile, tmp=tmp_path)
        assert code == 2, (action, err)
        assert "not a key nodetune manages" in err
    assert outside.read_text() == "precious\n"
    assert snapshot(host) == before


def test_journal_values_of_the_wrong_type_are_a_corrupt_journal(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    journal(host, {"sysctl/net.core.somaxconn": "4096"})
    path = host / "var/lib/nodetune/tuning-journal.json"
    data = json.loads(path.read_text())
    data["entries"]["sysctl/net.core.somaxconn"]["original"] = ["4096"]
    path.write_text(json.dumps(data))
    code, _, err = tune("revert", host, None, tmp=tmp_path)
    assert code == 2 and "corrupt journal" in err


def test_a_refused_original_in_the_journal_is_not_restored_without_unsafe(tmp_path: Path) -> None:
    """Review #5a: a journal entry sysctl/kernel.core_pattern '|/tmp/x' made `tune revert` exit 0 and
    set the pipe (a program run as root). It is restored only when a host sysctl.d file sets that
    very value (systemd-coredump's default) or the revert's profile names the key under unsafe:."""
    host = make_host(tmp_path / "host", proc__sys__kernel__core_pattern="core\n")
    journal(host, {"sysctl/kernel.core_pattern": "|/tmp/x %p"})
    before = snapshot(host)
    code, _, err = tune("revert", host, None, tmp=tmp_path)
    assert code == 2 and "kernel.core_pattern" in err and "unsafe" in err, err
    assert snapshot(host) == before
    # the profile that set it, naming the key under unsafe:, may put the pipe back
    profile = "name: p\nsysctl: {kernel.core_pattern: /var/crash/core}\nunsafe: [kernel.core_pattern]"
    code, _, err = tune("revert", host, profile, tmp=tmp_path)
    assert code == 0, err
    assert (host / "proc/sys/kernel/core_pattern").read_text() == "|/tmp/x %p\n"


def test_a_refused_original_a_host_sysctl_file_sets_is_restored(tmp_path: Path) -> None:
    pipe = "|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h"
    host = make_host(
        tmp_path / "host",
        **{
            "proc__sys__kernel__core_pattern": "/var/crash/core\n",
            "usr__lib__sysctl.d__50-coredump.conf": f"kernel.core_pattern={pipe}\n",
        },
    )
    journal(host, {"sysctl/kernel.core_pattern": pipe})
    code, _, err = tune("revert", host, None, tmp=tmp_path)
    assert code == 0, err
    assert (host / "proc/sys/kernel/core_pattern").read_text() == pipe + "\n"


@pytest.mark.parametrize(
    ("entry", "original"),
    [
        ("irq_affinity/irq37", "garbage"),  # review #5b: was an uncaught CpuListError, exit 1
        ("thp/enabled", "sometimes"),
        ("irqbalance/service", "rm -rf /"),
        ("kmod/ip_vs", "maybe"),
        ("sysctl/net.core.somaxconn", "1\n2"),
    ],
)
def test_a_journal_value_its_item_cannot_hold_is_exit_2_and_nothing_is_written(
    tmp_path: Path, entry: str, original: str
) -> None:
    host = make_host(tmp_path / "host")
    journal(host, {"sysctl/net.core.somaxconn": "1024", entry: original})
    before = snapshot(host)
    code, _, err = tune("revert", host, None, tmp=tmp_path)
    assert code == 2 and "Traceback" not in err and entry in err, err
    assert snapshot(host) == before


@pytest.mark.parametrize("entry", ["irq_affinity/irq5", "thp/enabled"])
def test_an_item_path_that_leaves_the_host_root_is_refused(tmp_path: Path, entry: str) -> None:
    """Review #6: only sysctl keys were resolved inside the host root; /proc/irq/5 or a THP file
    pointing out of the tree made revert write the outside file."""
    host = make_host(tmp_path / "host")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "smp_affinity_list").write_text("precious\n")
    if entry.startswith("irq"):
        (host / "proc/irq/5").symlink_to(outside)
    else:
        (host / "sys/kernel/mm/transparent_hugepage/enabled").unlink()
        (host / "sys/kernel/mm/transparent_hugepage/enabled").symlink_to(outside / "smp_affinity_list")
    journal(host, {entry: "0" if entry.startswith("irq") else "always"})
    code, _, err = tune("revert", host, None, tmp=tmp_path)
    assert code == 2, err
    assert (outside / "smp_affinity_list").read_text() == "precious\n"


def test_a_profile_sysctl_whose_file_leaves_the_host_root_is_refused(tmp_path: Path) -> None:
    host = make_host(tmp_path / "host")
    outside = tmp_path / "outsidefile"
    outside.write_text("5\n")
    (host / "proc/sys/net/core/evil").symlink_to(outside)
    code, _, err = tune("apply", host, "name: p\nsysctl: {net.core.evil: '7'}", tmp=tmp_path)
    assert code == 2 and "net.core.evil" in err, err
    assert outside.read_text() == "5\n"


@pytest.mark.parametrize("data", [b'{"version": 2, "boot_id": "\xff"}', b"[" * 200_000])
def test_a_journal_that_is_not_utf8_or_nested_too_deep_is_exit_2(tmp_path: Path, data: bytes) -> None:
    """Review #7: read_text() raised UnicodeDecodeError, json.loads RecursionError: tracebacks."""
    host = make_host(tmp_path / "host")
    path = host / "var/lib/nodetune/tuning-journal.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    before = snapshot(host)
    for action, profile in (("revert", None), ("apply", PROFILE), ("verify", PROFILE)):
        code, _, err = tune(action, host, profile, tmp=tmp_path)
        assert code == 2 and "corrupt journal" in err, (action, err)
    assert snapshot(host) == before


def test_a_temporary_journal_left_by_a_writer_killed_inside_save_is_removed(tmp_path: Path) -> None:
    """Lesser point: SIGKILL between mkstemp and rename left a .journal-* file for good."""
    host = make_host(tmp_path / "host")
    state = host / "var/lib/nodetune"
    state.mkdir(parents=True)
    (state / ".journal-k1ll3d").write_text('{"version": 2')
    (state / "unrelated").write_text("kept\n")
    assert tune("apply", host, PROFILE, tmp=tmp_path)[0] == 0
    assert sorted(p.name for p in state.iterdir()) == ["tuning-journal.json", "unrelated"]
