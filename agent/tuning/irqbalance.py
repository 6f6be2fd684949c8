"""irqbalance item: the host's irqbalance daemon stopped (and kept stopped), or started again.

**Which process is the host's irqbalance.** Read from ``<host-root>/proc`` (no subprocess; the
DaemonSet runs with ``hostPID: true`` and the host's ``/proc`` at ``<host-root>/proc``). A name
proves nothing: under ``hostPID`` any pod, and on the host any user, can run a process called
``irqbalance``. A process counts only when all three hold:

* its executable (``/proc/PID/exe``) is the host's irqbalance binary: the same file (device and
  inode) as ``<host-root>/usr/sbin/irqbalance`` (or ``/usr/bin``, ``/sbin``);
* every one of its user ids (``Uid:`` in ``/proc/PID/status``) is root;
* its pid namespace (``/proc/PID/ns/pid``) is that of the host's PID 1 (``<host-root>/proc/1``):
  an irqbalance in a container is the container's business.

Any other process named irqbalance is left alone and named in the notes.

**Stopping.** Where the host runs systemd (``<host-root>/run/systemd/system`` exists), through its
own service manager: ``systemctl disable --now irqbalance.service`` (disabled, or the next boot
or a package upgrade starts it again). Then each host irqbalance process still running gets
SIGTERM through a descriptor of its ``/proc/PID`` directory, opened before the checks above:
``pidfd_send_signal(2)`` takes such a descriptor (Linux 5.1+), so the signal reaches the process
that was checked, never a pid reused meanwhile, and the kernel refuses (EINVAL) a process outside
our pid namespace's descendants (an agent without ``hostPID`` cannot reach the host's).

**Starting** (revert, ``enabled: true``) the way the host starts it, never with a command line
read from ``/proc`` (any process can write its own): ``systemctl enable --now irqbalance.service``
under systemd; else the distribution's init script (``/etc/init.d/irqbalance start``); else the
binary at its standard path, detaching itself, with the defaults of the host's environment file
(``IRQBALANCE_*`` variables and ``IRQBALANCE_ARGS`` of ``/etc/default/irqbalance`` (Debian) or
``/etc/sysconfig/irqbalance`` (Fedora), as the packaged unit's ``EnvironmentFile=``). The command
runs inside the host PID 1's namespaces (``nsenter`` with the files of ``<host-root>/proc/1/ns``,
so from a container it starts on the host, not in the pod) and is waited for. The journal holds
only ``running`` or ``stopped``; the tail of an older ``running <command line>`` entry is ignored.

Coming back (a package upgrade, a restarted unit) is drift: ``verify`` reports it, ``enforce``
stops it again. Subprocesses run only when something is written, never on a read.
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.tuning.base import TuningError, TuningItem
from host.paths import HostPaths

STOPPED, RUNNING = "stopped", "running"
# Where distributions install the daemon (Debian, Ubuntu, Fedora, RHEL: /usr/sbin; /sbin before usrmerge).
BINARIES = ("usr/sbin/irqbalance", "usr/bin/irqbalance", "sbin/irqbalance")
INIT_SCRIPT = "etc/init.d/irqbalance"
ENV_FILES = ("etc/default/irqbalance", "etc/sysconfig/irqbalance")
# The namespaces a command enters to run as the host runs it (nsenter flag, /proc/PID/ns file).
HOST_NAMESPACES = (
    ("mount", "mnt"),
    ("uts", "uts"),
    ("ipc", "ipc"),
    ("net", "net"),
    ("pid", "pid"),
    ("cgroup", "cgroup"),
)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 60.0  # systemctl's own default job timeout is longer; a start or stop here takes < 1 s
SETTLE = 10.0  # how long a started or signalled daemon gets to show up or go


def irqbalance_pids(host: HostPaths) -> list[int]:
    """Every process named irqbalance, whoever's: what would move IRQs back (irq_affinity's test).
    Never a reason to signal or start anything (see :func:`scan`)."""
    pids = []
    proc = host.proc
    try:
        entries = list(os.scandir(proc))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            if (Path(entry.path) / "comm").read_text().strip() == "irqbalance":
                pids.append(int(entry.name))
        except OSError:
            continue  # exited meanwhile
    return sorted(pids)


@dataclass(frozen=True)
class Found:
    pid: int
    refused: str | None  # None: the host's irqbalance; else why it is left alone


def _read_at(dir_fd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    try:
        return os.read(fd, 65536).decode(errors="replace")
    finally:
        os.close(fd)


def _identity(path: Path | str, dir_fd: int | None = None) -> tuple[int, int]:
    st = os.stat(path, dir_fd=dir_fd)
    return st.st_dev, st.st_ino


def host_binaries(host: HostPaths) -> set[tuple[int, int]]:
    out = set()
    for rel in BINARIES:
        try:
            out.add(_identity(host.root / rel))
        except OSError:
            continue
    return out


def _refusal(dir_fd: int, binaries: set[tuple[int, int]], host_pidns: tuple[int, int] | None, why: str) -> str | None:
    try:
        exe = _identity("exe", dir_fd)
    except OSError:
        return "its executable is unreadable (exited, or a kernel thread)"
    if exe not in binaries:
        return "its executable is not the host's irqbalance binary"
    try:
        uids = next(line.split()[1:] for line in _read_at(dir_fd, "status").splitlines() if line.startswith("Uid:"))
    except (OSError, StopIteration):
        return "its owner is unreadable"
    if set(uids) != {"0"}:
        return f"it does not run as root (uids {' '.join(uids)})"
    if host_pidns is None:
        return why
    try:
        if _identity("ns/pid", dir_fd) != host_pidns:
            return "it runs in another pid namespace (a container's)"
    except OSError as e:
        return f"its pid namespace is unreadable ({e.strerror})"
    return None


def scan(host: HostPaths, on_host: Callable[[int, int], None] | None = None) -> list[Found]:
    """Every process named irqbalance under ``<host-root>/proc`` and whether it is the host's.
    ``on_host(pid, dir_fd)`` is called for each host one while its ``/proc/PID`` is held open."""
    proc = host.proc
    binaries = host_binaries(host)
    host_pidns, why = None, ""
    try:
        host_pidns = _identity(proc / "1/ns/pid")
    except OSError as e:
        why = f"the host's pid namespace is unknown ({proc}/1/ns/pid: {e.strerror})"
    found = []
    try:
        entries = [e.name for e in os.scandir(proc) if e.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        try:
            dir_fd = os.open(proc / name, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # exited meanwhile
        try:
            try:
                if _read_at(dir_fd, "comm").strip() != "irqbalance":
                    continue
            except OSError:
                continue
            refused = _refusal(dir_fd, binaries, host_pidns, why)
            found.append(Found(int(name), refused))
            if refused is None and on_host is not None:
                on_host(int(name), dir_fd)
        finally:
            os.close(dir_fd)
    return sorted(found, key=lambda f: f.pid)


def host_irqbalance(host: HostPaths) -> list[int]:
    """Pids of the host's own irqbalance processes (see the module's docstring)."""
    return [f.pid for f in scan(host) if f.refused is None]


def env_file(host: HostPaths) -> dict[str, str]:
    """``IRQBALANCE_*`` assignments of the host's irqbalance environment file (shell syntax, as
    the packaged unit's ``EnvironmentFile=`` and init script read it); refused unless root owns it
    and only root can write it, since what it says runs as root."""
    for rel in ENV_FILES:
        path = host.root / rel
        try:
            st = path.stat()
            text = path.read_text()
        except OSError:
            continue
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or not stat.S_ISREG(st.st_mode):
            raise TuningError(f"irqbalance: {path} is not a root-only regular file; not used to start irqbalance")
        out = {}
        try:
            for line in text.splitlines():
                words = shlex.split(line, comments=True)
                if len(words) == 1 and "=" in words[0]:
                    key, _, value = words[0].partition("=")
                    if key.startswith("IRQBALANCE_"):
                        out[key] = value
        except ValueError as e:
            raise TuningError(f"irqbalance: {path}: {e}") from None
        return out
    return {}


class IrqbalanceItem(TuningItem):
    name = "irqbalance"
    survives_reboot = True  # the item's default; each entry records ``survives`` at write time

    def __init__(self, host: HostPaths, enabled: bool | None) -> None:
        super().__init__(host)
        self.enabled = enabled

    def systemd(self) -> bool:
        return (self.host.root / "run/systemd/system").is_dir()

    def managed_keys(self) -> list[str]:
        return [] if self.enabled is None else ["service"]

    def journal_key_ok(self, key: str) -> bool:
        return key == "service"

    def journal_value_ok(self, key: str, value: str) -> bool:
        return value.split(" ", 1)[0] in (RUNNING, STOPPED)  # an older entry's command-line tail is ignored

    def survives(self, key: str) -> bool:
        """Stopped through systemd (``systemctl disable``), it stays stopped after a reboot; a
        SIGTERM'd daemon on a host without systemd is started again by the next boot."""
        return self.systemd()

    def read(self, key: str) -> str:
        return RUNNING if host_irqbalance(self.host) else STOPPED

    def same(self, key: str, current: str, value: str) -> bool:
        return current.split(" ", 1)[0] == value.split(" ", 1)[0]

    def wanted(self, key: str, current: str) -> str:
        return RUNNING if self.enabled else STOPPED

    def notes(self) -> list[str]:
        return [
            f"irqbalance: pid {f.pid} is named irqbalance but left alone: {f.refused}"
            for f in scan(self.host)
            if f.refused is not None
        ]

    # --- writing ------------------------------------------------------------------------------
    def in_host(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Run ``argv`` in the host PID 1's namespaces, wait for it; TuningError if it fails."""
        ns = self.host.proc / "1/ns"
        cmd = ["nsenter", *(f"--{flag}={ns / name}" for flag, name in HOST_NAMESPACES), "--", *argv]
        try:
            res = subprocess.run(
                cmd, capture_output=True, text=True, timeout=TIMEOUT, env={"PATH": PATH, "LANG": "C", **(env or {})}
            )
        except subprocess.TimeoutExpired:
            raise TuningError(f"irqbalance: {' '.join(argv)}: no answer in {TIMEOUT:.0f} s") from None
        if res.returncode != 0:
            raise TuningError(f"irqbalance: {' '.join(argv)} failed: {(res.stderr or res.stdout).strip()[-300:]}")

    def start_command(self) -> tuple[list[str], dict[str, str]]:
        """How the host starts irqbalance (paths inside the host's mount namespace)."""
        if self.systemd():
            return ["systemctl", "enable", "--now", "irqbalance.service"], {}
        script = self.host.root / INIT_SCRIPT
        if script.is_file():
            return ["/" + INIT_SCRIPT, "start"], {}
        binary = next((rel for rel in BINARIES if (self.host.root / rel).is_file()), None)
        if binary is None:
            raise TuningError("irqbalance: the host has no irqbalance unit, init script or binary to start")
        env = env_file(self.host)
        # As the unit's ExecStart, without --foreground (it detaches); a --debug also keeps it in
        # the foreground, so it is left out too (irqbalance.c: debug mode implies foreground).
        attached = ("-f", "--foreground", "-d", "--debug")
        args = [a for a in shlex.split(env.get("IRQBALANCE_ARGS", "")) if a not in attached]
        return ["/" + binary, *args], env

    def _settle(self, running: bool) -> bool:
        deadline = time.monotonic() + SETTLE
        while bool(host_irqbalance(self.host)) != running:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def write(self, key: str, value: str) -> None:
        if value.split(" ", 1)[0] == STOPPED:
            if self.systemd():
                self.in_host(["systemctl", "disable", "--now", "irqbalance.service"])

            def term(pid: int, dir_fd: int) -> None:
                try:
                    signal.pidfd_send_signal(dir_fd, signal.SIGTERM)
                except ProcessLookupError:
                    pass  # exited meanwhile
                except OSError as e:
                    raise TuningError(f"irqbalance: cannot signal pid {pid}: {e.strerror}") from None

            scan(self.host, on_host=term)
            self._settle(running=False)  # the engine's read-back says if it did not stop
            return
        argv, env = self.start_command()  # never the command line of a process: see the docstring
        self.in_host(argv, env)
        if not self._settle(running=True):
            raise TuningError(f"irqbalance: {' '.join(argv)} ran, but no host irqbalance runs {SETTLE:.0f} s later")
