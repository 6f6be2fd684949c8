"""Run code in a child process that can run out of file descriptors on demand (EMFILE), without
touching the test process's limits: ``exhaust()`` lowers the child's own RLIMIT_NOFILE and takes
every descriptor left, ``free()`` gives them back and restores the limit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

EXHAUST_FDS = """
import errno, os, resource
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_held = []
def exhaust():
    top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, _hard))
    while True:
        try:
            _held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            assert e.errno == errno.EMFILE, e
            return
def free():
    while _held:
        os.close(_held.pop())
    resource.setrlimit(resource.RLIMIT_NOFILE, (_soft, _hard))
"""


def run_child(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\nsys.path.insert(0, {str(REPO)!r})\n{EXHAUST_FDS}\n{code}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()
