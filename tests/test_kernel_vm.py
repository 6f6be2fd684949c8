"""The stock-kernel guest (tests/kernel_vm.py): its pure parts, and the run of every test marked
``tracing`` (fentry/fexit and kprobe strategies, which the development kernel refuses) or
``modules`` (loadable kernel modules, which it has none of) inside it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GUEST_MARKERS, REPO
from tests.kernel_vm import (
    GuestResult,
    VMUnavailable,
    accelerator,
    generic_headers_release,
    main,
    module_load_order,
    run_in_guest,
)


def test_module_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/fs/netfs/netfs.ko: kernel/fs/fscache/fscache.ko\n"
        "kernel/fs/fscache/fscache.ko:\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
    )
    order = module_load_order(tmp_path, ("9pnet_virtio", "9p"))
    assert order == [
        "kernel/net/9p/9pnet.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/net/9p/9pnet_virtio.ko",
        "kernel/fs/fscache/fscache.ko",
        "kernel/fs/netfs/netfs.ko",
        "kernel/fs/9p/9p.ko",
    ]
    with pytest.raises(VMUnavailable, match="module overlay not in"):
        module_load_order(tmp_path, ("overlay",))


def test_guest_release_is_the_newest_generic_header_set(tmp_path: Path) -> None:
    for name in ("linux-headers-6.1.0-9-amd64", "linux-headers-6.1.0-56-amd64", "linux-headers-6.1.0-60-cloud-amd64"):
        (tmp_path / name).mkdir()
    (tmp_path / "linux-headers-6.1.0-56-common").mkdir()
    assert generic_headers_release(tmp_path) == "6.1.0-56-amd64"  # 56 > 9 as numbers; cloud has no 9p
    with pytest.raises(VMUnavailable, match="no linux-headers"):
        generic_headers_release(tmp_path / "linux-headers-6.1.0-56-common")


GUEST_SELECTION = " or ".join(GUEST_MARKERS)  # one boot runs them all (a boot costs about a minute)


def tracing_tests() -> set[str]:
    """Node ids of the tests that run in the guest (marked ``tracing`` or ``modules``), as the
    guest will collect them."""
    env = {**os.environ, "NODETUNE_IN_TEST_VM": "1"}
    listing = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", GUEST_SELECTION],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line for line in listing.splitlines() if "::" in line}


def test_an_unknown_accelerator_is_refused_before_anything_boots(monkeypatch: pytest.MonkeyPatch) -> None:
    booted: list[str] = []
    monkeypatch.setattr("tests.kernel_vm.run_in_guest", lambda *a, **k: booted.append("booted"))
    with pytest.raises(ValueError, match="accelerator 'hvf': one of tcg, tcg-native, icount, kvm"):
        main(["--accel=hvf", "--", "true"])
    for bad in (["--cpus=0", "--", "true"], ["--cpus=two", "--", "true"], ["--smp=2", "--", "true"]):
        with pytest.raises(SystemExit, match="bad option"):
            main(bad)
    assert booted == []


def test_options_reach_the_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict]] = []

    def fake_run(command: str, **kw: object) -> GuestResult:
        calls.append((command, kw))
        return GuestResult(0, "", "")

    monkeypatch.setattr("tests.kernel_vm.run_in_guest", fake_run)
    assert main(["--accel=tcg-native", "--cpus=4", "--", "echo", "a b"]) == 0
    assert calls == [("echo 'a b'", {"accel": "tcg-native", "cpus": 4, "timeout": 7200})]
    assert accelerator("tcg-native")[-2:] == ["-cpu", "max,-hypervisor"]


@pytest.mark.bpf
def test_tracing_strategies_pass_on_a_stock_debian_kernel() -> None:
    """Boots Debian's generic kernel (kprobes, BTF, fentry/fexit) under qemu on this machine's own
    file system and runs every ``tracing`` test there with NODETUNE_REQUIRE_BPF=1, and every
    ``modules`` test (the ipvs modules, loaded and unloaded for real): each must pass (none
    skipped, none missing)."""
    expected = tracing_tests()
    assert expected, "no test is marked tracing or modules"
    try:
        result = run_in_guest(
            f"{sys.executable} -m pytest -p no:cacheprovider -m '{GUEST_SELECTION}' -rA -q",
            env={"NODETUNE_IN_TEST_VM": "1", "NODETUNE_REQUIRE_BPF": "1"},
            timeout=1800,
        )
    except VMUnavailable as e:
        pytest.skip(f"no stock-kernel guest here: {e}")
    print(result.output[-20000:])
    assert result.returncode is not None, f"the guest never reported:\n{result.console[-4000:]}"
    passed = set(re.findall(r"^PASSED (\S+)", result.output, re.MULTILINE))
    assert result.returncode == 0, result.output[-6000:]
    assert passed == expected, (sorted(expected - passed), sorted(passed - expected))
