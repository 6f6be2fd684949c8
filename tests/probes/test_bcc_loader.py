"""probes/bcc_loader.py: a program compiled, loaded and attached in a child process, handed over
by its file descriptors, and working in this process; failures of the child reported."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest

from probes import bcc_loader
from probes.base import KernelFacts
from probes.bcc_loader import Child, LoaderError, load_in_child
from tests.conftest import wait_until

pytestmark = pytest.mark.bpf

PROGRAM = """
BPF_ARRAY(calls, u64, 4);
BPF_HASH(seen, u32, u64, 16);
BPF_PERCPU_ARRAY(per_cpu, u64, 2);
BPF_STACK(free_rows, u32, 8);

RAW_TRACEPOINT_PROBE(sys_enter)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != PID)
        return 0;
    int zero = 0;
    u64 *n = calls.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    seen.increment(pid);
    per_cpu.increment(zero);
    return 0;
}

int not_attached(struct __sk_buff *skb)
{
    return 0;
}
"""


@pytest.fixture
def headers(header_cache: Path) -> str:
    """The merged headers' directory, for BCC_KERNEL_SOURCE in the child."""
    return KernelFacts(cache_dir=header_cache).headers.path


def calls(bpf: object) -> int:
    table = bpf[b"calls"]  # type: ignore[index]
    return table[table.Key(0)].value


def test_the_program_runs_attached_and_its_maps_work_here(headers: str) -> None:
    """The child compiled, loaded and attached the program and exited; here, through the fds
    alone: the tracepoint counts this process's syscalls, each map is BCC's table class of its type
    with its size, a function the child loaded unattached is there, and cleanup() detaches."""
    from bcc import BPF, table

    child = Child()
    bpf = child.load(
        {
            "text": PROGRAM,
            "cflags": [f"-DPID={os.getpid()}"],
            "functions": [["not_attached", BPF.SOCKET_FILTER]],
            "env": {"BCC_KERNEL_SOURCE": headers},
        }
    )
    try:
        assert child.proc.returncode == 0
        assert child.kallsyms_not_hidden is None  # BCC compiled with the two lines,
        assert child.kallsyms_restored  # and attached with all of them
        assert bpf.module is None
        before = calls(bpf)
        wait_until(lambda: os.getppid() and calls(bpf) > before + 10, what="syscalls counted")
        kinds = {name: type(t) for name, t in bpf.tables.items()}
        assert kinds == {
            b"calls": table.Array,
            b"seen": table.HashTable,
            b"per_cpu": table.PerCpuArray,
            b"free_rows": table.QueueStack,
        }
        assert (len(bpf[b"calls"]), bpf[b"seen"].max_entries, len(bpf[b"per_cpu"])) == (4, 16, 2)
        seen = bpf[b"seen"]
        assert seen[seen.Key(os.getpid())].value > before
        assert sum(bpf[b"per_cpu"][0]) > 0
        stack = bpf[b"free_rows"]
        stack.push(stack.Leaf(7))
        assert stack.pop().value == 7
        assert set(bpf.funcs) == {b"raw_tracepoint__sys_enter", b"not_attached"}
        assert bpf.load_func(b"not_attached", BPF.SOCKET_FILTER).fd == bpf.funcs[b"not_attached"].fd
        assert list(bpf.raw_tracepoint_fds) == [b"sys_enter"]
    finally:
        map_fds = [t.map_fd for t in bpf.tables.values()]
        bpf.cleanup()
    stopped = calls(bpf)
    for _ in range(100):
        os.getppid()
    assert calls(bpf) == stopped  # detached: no syscall of ours is counted any more
    for fd in map_fds:
        os.close(fd)


def test_a_compile_error_comes_back_with_bccs_message(headers: str) -> None:
    """The same program compiles with the headers given, and not with an undeclared name in it."""
    load_in_child("int fine(void *ctx) { return 0; }", [], kernel_source=headers).cleanup()
    with pytest.raises(LoaderError, match="Failed to compile BPF module"):
        load_in_child("int broken(void *ctx) { return undeclared; }", [], kernel_source=headers)


def test_a_child_that_dies_before_answering_is_reported(headers: str) -> None:
    child = Child()
    child.proc.kill()
    with pytest.raises(LoaderError, match="exited with -9 before answering"):
        child.load({"text": PROGRAM, "cflags": ["-DPID=1"], "functions": [], "env": {"BCC_KERNEL_SOURCE": headers}})


def test_a_spare_that_died_waiting_is_replaced_and_a_stopping_agent_starts_none(headers: str) -> None:
    bcc_loader.prespawn(1)
    dead = bcc_loader._spares[0]
    dead.proc.kill()
    dead.proc.wait()
    bpf = load_in_child(PROGRAM, ["-DPID=1"], kernel_source=headers)  # on a new child
    bcc_loader.close(bpf)
    assert dead.proc.returncode == -9 and bcc_loader._spares == [] and bcc_loader._live == set()
    bcc_loader.abort_all()
    try:
        with pytest.raises(LoaderError, match="stopping"):
            load_in_child(PROGRAM, ["-DPID=1"], kernel_source=headers)
    finally:
        bcc_loader.allow()


def test_prespawned_children_are_used_then_the_spares_ended(headers: str) -> None:
    bcc_loader.prespawn(2)
    spares = list(bcc_loader._spares)
    bpf = load_in_child(PROGRAM, ["-DPID=1"], kernel_source=headers)  # takes one of them
    try:
        assert len(bcc_loader._spares) == 1
    finally:
        bcc_loader.close(bpf)
    bcc_loader.discard_spares()
    assert bcc_loader._spares == [] and bcc_loader._live == set()
    assert [c.proc.returncode for c in spares] == [0, 0]


# read(2)'s number (include/uapi/asm-generic/unistd.h; arch/x86/entry/syscalls/syscall_64.tbl)
READ_SYSCALL = {"x86_64": "0", "aarch64": "63", "riscv64": "63"}[platform.machine()]


def waiting_for_its_request(child: Child) -> bool:
    """The child is blocked in read(0, ...): BCC imported, its request not sent yet."""
    assert child.proc.poll() is None, "the child exited"
    fields = Path(f"/proc/{child.proc.pid}/syscall").read_text().split()
    return fields[:2] == [READ_SYSCALL, "0x0"]


def test_a_spare_sees_what_is_mounted_after_it_started(headers: str, tmp_path: Path) -> None:
    """A prespawned child waits for its request in the agent's mount namespace, so a mount the
    agent makes meanwhile (debugfs, before a tracepoint strategy's compile) is seen: here a tmpfs
    holding a header the program includes."""
    child = Child()
    try:
        wait_until(lambda: waiting_for_its_request(child), what="the child waiting for its request")
        late = tmp_path / "late"
        late.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "nodetune-test", str(late)], check=True)
        try:
            (late / "late.h").write_text("#define LATE 7\n")
            bpf = child.load(
                {
                    "text": '#include "late.h"\nint f(void *ctx) { return LATE; }',
                    "cflags": [f"-I{late}"],
                    "functions": [],
                    "env": {"BCC_KERNEL_SOURCE": headers},
                }
            )
            bcc_loader.close(bpf)
            assert child.kallsyms_not_hidden is None and child.kallsyms_restored  # hidden, after the mount
        finally:
            subprocess.run(["umount", "--lazy", str(late)])
    finally:
        child.end()
    assert str(late) not in Path("/proc/self/mountinfo").read_text()
