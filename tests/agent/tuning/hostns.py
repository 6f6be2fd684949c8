"""Stand-in hosts for the irqbalance tests, so that no test depends on (or touches) the machine's
own irqbalance, init system or PID 1.

* :class:`SandboxHost`: a pid + mount namespace made by the test (``unshare --pid --fork
  --mount-proc --kill-child``), seen from outside at ``/proc/<its init>/root`` - the way a
  DaemonSet pod sees the host at ``/host``: its ``proc`` is the namespace's own procfs, its PID 1
  the namespace's init. Inside, ``/run`` is a private tmpfs (pid files, a fake systemd marker),
  and ``/proc/irq`` is read-only, so an irqbalance running there cannot move the machine's IRQs.
  Killing the ``unshare`` process (by pid) kills its init, and with it every process inside.
* :func:`linked_host`: a directory whose ``proc/<pid>`` entries are symlinks to chosen processes
  of this machine's ``/proc`` (pid numbers as this test sees them), ``proc/1`` the process whose
  namespaces count as the host's, and ``usr/sbin/irqbalance`` the real binary.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

IRQBALANCE = "/usr/sbin/irqbalance"

# The namespace's init: reaps whatever is orphaned to it (daemons started by init scripts).
REAPER = """import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.1)
"""

FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl as the sandbox's service manager: logs its arguments; "enable --now" starts the
# daemon (detached: nothing here supervises it), "disable --now" leaves the stopping to nodetune.
echo "$*" >>/run/systemctl.log
case "$1" in
  enable) exec /usr/sbin/irqbalance ;;
  disable) exit 0 ;;
esac
exit 1
"""


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SandboxHost:
    def __init__(
        self,
        tmp: Path,
        *,
        systemd: bool = False,
        no_init_script: bool = False,
        env_file: str | None = None,
        systemctl: str = FAKE_SYSTEMCTL,
        private_var_lib: bool = False,
    ):
        steps = [
            "set -e",
            "mount -t tmpfs tmpfs /run",
            "mount --bind /proc/irq /proc/irq && mount -o remount,bind,ro /proc/irq",
        ]
        if systemd:
            fake = tmp / "systemctl"
            fake.write_text(systemctl)
            fake.chmod(0o755)
            steps += [
                "mkdir -p /run/systemd/system",
                "mount -t tmpfs tmpfs /usr/local/sbin",
                f"cp {shlex.quote(str(fake))} /usr/local/sbin/systemctl",
            ]
        if private_var_lib:  # the journal's default place (<host-root>/var/lib/nodetune), the sandbox's own
            steps.append("mount -t tmpfs tmpfs /var/lib")
        if no_init_script:
            steps.append("if [ -e /etc/init.d/irqbalance ]; then mount --bind /dev/null /etc/init.d/irqbalance; fi")
        if env_file is not None:
            path = tmp / "irqbalance.env"
            path.write_text(env_file)
            path.chmod(0o644)
            steps.append("mkdir -p /etc/default && touch /etc/default/irqbalance || true")
            steps.append(f"mount --bind {shlex.quote(str(path))} /etc/default/irqbalance")
        steps += ["touch /run/sandbox-ready", f"exec {shlex.quote(sys.executable)} -c {shlex.quote(REAPER)}"]
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c", "\n".join(steps)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(lambda: self._init() is not None, "the sandbox's init")
            wait_for(lambda: (self.root / "run/sandbox-ready").exists(), "the sandbox's mounts")
        except BaseException:
            self.close()
            raise

    def _init(self) -> int | None:
        if self.unshare.poll() is not None:
            raise AssertionError(f"sandbox failed: {self.unshare.stderr.read().decode(errors='replace')}")
        try:
            children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children").read_text().split()
        except OSError:
            return None
        self.init = int(children[0]) if children else None
        return self.init

    @property
    def root(self) -> Path:
        return Path(f"/proc/{self.init}/root")

    def run(self, *argv: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (as ``user`` if given), wait for it."""
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
        return subprocess.run(
            ["nsenter", "-t", str(self.init), "--pid", "--mount", "--", *prefix, *argv],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def pids(self, comm: str) -> list[int]:
        """Pids (the namespace's numbering) of its live processes named ``comm`` (not zombies: one
        that exited is listed until the namespace's init reaps it)."""
        out = []
        for entry in (self.root / "proc").iterdir():
            try:
                if not entry.name.isdigit() or (entry / "comm").read_text().strip() != comm:
                    continue
                if "\nState:\tZ" not in (entry / "status").read_text():
                    out.append(int(entry.name))
            except OSError:
                continue
        return sorted(out)

    def cmdline(self, pid: int) -> list[str]:
        return (self.root / f"proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")

    def close(self) -> None:
        if self.unshare.poll() is None:
            self.unshare.kill()  # --kill-child: the namespace's init dies, and every process in it
        self.unshare.wait(timeout=10)
        self.unshare.stderr.close()
        if getattr(self, "init", None) is not None:
            wait_gone(self.init)  # its init ends only once every process inside has ended


def wait_gone(pid: int) -> None:
    """Wait until ``pid`` (a process this test started, already killed) is gone and reaped, so
    that no later test sees it (tests/agent/tuning/test_items.py skips while any irqbalance runs)."""
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), f"pid {pid} to end")


def linked_host(root: Path, host_pid: int, pids: list[int]) -> Path:
    """A host root whose ``proc`` lists only ``pids`` (links into this machine's /proc) and whose
    PID 1 is ``host_pid``: the pid namespace of ``host_pid`` is the host's."""
    proc = root / "proc"
    proc.mkdir(parents=True)
    (proc / "1").symlink_to(f"/proc/{host_pid}")
    for pid in pids:
        (proc / str(pid)).symlink_to(f"/proc/{pid}")
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/irqbalance").symlink_to(IRQBALANCE)
    return root


def world_dir(prefix: str) -> Path:
    """A directory under /tmp that an unprivileged user can enter (pytest's tmp_path is 0700)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o777)
    return path


def remove_world_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
