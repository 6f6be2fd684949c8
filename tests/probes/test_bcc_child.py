"""probes/bcc_child.py: the lines of /proc/kallsyms BCC's compile asks about, and the child's own
mount namespace that shows it only those while it compiles: BCC compiles the same program, and
nothing is mounted on the host."""

from __future__ import annotations

import json
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
# Prints what /proc/kallsyms shows while hidden and after, BCC's bytecode of a program whose helper
# calls depend on BCC's kallsyms check (before any map: no fd in it), and how many mounts the
# parent's namespace had while this one's file was hidden.
COMPILE = r"""
import os
import sys
from bcc import BPF
from probes.bcc_child import hide_kallsyms, read_kallsyms_lines
restore = None
if sys.argv[1] != "-":
    restore, why_not = hide_kallsyms(read_kallsyms_lines(sys.argv[1]))
    assert why_not is None, why_not
with open("/proc/kallsyms", "rb") as f:
    hidden = f.read()
with open(f"/proc/{os.getppid()}/mountinfo") as f:  # the namespace this process came from
    parents = sum(1 for _ in f)
text = b'''
int f(void *ctx) {
    u64 v = 0, w = 0;
    bpf_probe_read_kernel(&v, sizeof(v), ctx);
    bpf_probe_read_user(&w, sizeof(w), ctx);
    return v + w;
}
'''
code = BPF(text=text).dump_func(b"f")
if restore:
    restore()
with open("/proc/kallsyms", "rb") as f:
    after = sum(1 for _ in f)
print(hidden.count(b"\n"), after, code.hex(), parents)
"""

# Runs COMPILE in a throwaway mount namespace whose mounts are shared (as / is under systemd),
# cut off from this machine's first: a mount that propagated out of the child would show in the
# throwaway namespace's mountinfo, and end with it.
DRIVER = r"""
import json, os, subprocess, sys
subprocess.run(["mount", "--make-rshared", "/"], check=True)
def mounts():
    with open("/proc/self/mountinfo") as f:
        return f.read()
before = mounts()
out = subprocess.run([sys.executable, "-c", os.environ["COMPILE"], sys.argv[1]],
                     stdout=subprocess.PIPE, text=True, check=True).stdout  # its stderr: the test's
print(json.dumps({"out": out, "shared": " shared:" in before, "mounts": before.count("\n"),
                  "unchanged": mounts() == before}))
"""


def compile_in_child(headers: str, source: str) -> tuple[int, int, str]:
    env = {**os.environ, "BCC_KERNEL_SOURCE": headers, "PYTHONPATH": str(REPO), "COMPILE": COMPILE}
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", DRIVER, source],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    shown, after, code, parents = result["out"].split()
    assert result["shared"]
    assert int(parents) == result["mounts"] and result["unchanged"], "a mount of the child's reached its parent"
    return int(shown), int(after), code


@pytest.mark.bpf
def test_bcc_compiles_the_same_with_the_lines_hidden_and_no_mount_leaves_the_child(
    header_cache: Path, tmp_path: Path
) -> None:
    """Hidden: two lines shown while compiling, all of them after; the bytecode is BCC's own
    with the real file. With a kallsyms lacking both names, BCC takes the old helpers: the
    comparison can fail. No mount of the child's reaches its parent's namespace, even a shared one."""
    headers = KernelFacts(cache_dir=header_cache).headers.path
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
