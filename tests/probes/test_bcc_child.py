"""probes/bcc_child.py: the lines of /proc/kallsyms BCC's compile asks about, and the child's own
mount namespace that shows it only those while it compiles: BCC compiles the same program, and
nothing is mounted on the host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from probes.base import KernelFacts
from probes.bcc_child import kallsyms_lines

REPO = Path(__file__).resolve().parents[2]

KALLSYMS = (
    b"ffffffff814cb000 T bpf_probe_read_kernel_str\n"
    b"ffffffff814cc020 T bpf_probe_read_kernel\n"
    b"ffffffff814cd000 t xbpf_probe_read_user\n"
    b"ffffffffc0200000 t bpf_probe_read_user\t[some_module]\n"
    b"ffffffff814ceb50 T bpf_probe_read_user"  # the last line, no newline
)


def test_only_the_lines_of_the_two_names_are_kept_verbatim() -> None:
    assert kallsyms_lines(KALLSYMS) == (
        b"ffffffff814cc020 T bpf_probe_read_kernel\n"
        b"ffffffffc0200000 t bpf_probe_read_user\t[some_module]\n"
        b"ffffffff814ceb50 T bpf_probe_read_user\n"
    )


def test_no_line_for_names_the_kernel_lacks() -> None:
    assert kallsyms_lines(b"ffffffff814cb000 T bpf_probe_read_kernel_str\nffffffff8 T bpf_probe_read\n") == b""
    assert kallsyms_lines(b"") == b""


# In a process of its own: hide_kallsyms() moves the calling process into a new mount namespace.
# Prints what /proc/kallsyms shows while hidden and after, then BCC's bytecode of a program whose
# helper calls depend on BCC's kallsyms check (before any map: no fd in it).
COMPILE = r"""
import os, sys
from bcc import BPF
from probes.bcc_child import hide_kallsyms
restore = hide_kallsyms(*sys.argv[1:2]) if sys.argv[1:] != ["-"] else None
with open("/proc/kallsyms", "rb") as f:
    hidden = f.read()
text = b'''
int f(void *ctx) {
    u64 v = 0, w = 0;
    bpf_probe_read_kernel(&v, sizeof(v), ctx);
    bpf_probe_read_user(&w, sizeof(w), ctx);
    return v + w;
}
'''
bpf = BPF(text=text)
code = bpf.dump_func(b"f")
if restore:
    restore()
with open("/proc/kallsyms", "rb") as f:
    after = sum(1 for _ in f)
print(hidden.count(b"\n"), after, code.hex())
"""


def compile_in_child(headers: str, source: str) -> tuple[int, int, str]:
    env = {**os.environ, "BCC_KERNEL_SOURCE": headers, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", COMPILE, source], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    return int(out[0]), int(out[1]), out[2]


@pytest.mark.bpf
def test_bcc_compiles_the_same_with_the_lines_hidden_and_nothing_is_mounted_here(
    header_cache: Path, tmp_path: Path
) -> None:
    """Hidden: two lines shown while compiling, all of them after; the bytecode is BCC's own
    with the real file. With a kallsyms lacking both names, BCC takes the old helpers: the
    comparison can fail. This process's mounts and /proc/kallsyms are as they were."""
    headers = KernelFacts(cache_dir=header_cache).headers.path
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    with open("/proc/kallsyms", "rb") as f:
        total = sum(1 for _ in f)
    shown, after, hidden_code = compile_in_child(headers, "/proc/kallsyms")
    assert shown == 2 and after >= total - 100  # modules may come and go meanwhile
    _, _, real_code = compile_in_child(headers, "-")
    assert hidden_code == real_code
    lacking = tmp_path / "kallsyms"
    lacking.write_bytes(b"ffffffff81000000 T _stext\n")
    shown, _, old_helpers_code = compile_in_child(headers, str(lacking))
    assert shown == 0 and old_helpers_code != real_code
    with open("/proc/self/mountinfo") as f:
        assert f.read() == mounts
    with open("/proc/kallsyms", "rb") as f:
        assert sum(1 for _ in f) >= total - 100
