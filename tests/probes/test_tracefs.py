"""debugfs/tracefs mounting for classic tracepoints: mount only if needed, unmount only our own."""

from __future__ import annotations

import pytest

from probes import tracefs


def mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


@pytest.mark.root
def test_acquire_release_restores_the_mount_state() -> None:
    was = mounted("/sys/kernel/debug")
    tracefs.acquire()
    tracefs.acquire()  # nested users share one mount
    assert (tracefs.EVENTS / "sched" / "sched_switch" / "format").is_file()
    tracefs.release()
    assert (tracefs.EVENTS / "sched").is_dir()  # still one user
    tracefs.release()
    assert mounted("/sys/kernel/debug") == was


@pytest.mark.root
def test_unmountable_target_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(tracefs.TracefsUnavailable, match="tracing/events"):
        tracefs.acquire(tmp_path / "missing-dir")
