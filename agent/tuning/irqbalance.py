"""irqbalance item: the irqbalance daemon stopped (and kept stopped) on the host.

Reading is a scan of the host's ``/proc/*/comm`` (no subprocess; the DaemonSet runs with
``hostPID: true`` and the host's ``/proc`` at ``<host-root>/proc``). Stopping:

* where the host runs systemd (``<host-root>/run/systemd/system`` exists), through the host's own
  service manager by entering PID 1's namespaces: ``nsenter -t 1 -m -u -i -n -p -- systemctl
  disable --now irqbalance.service`` (disable, or the next boot or a package upgrade starts it
  again). Reverting runs ``systemctl enable --now``;
* otherwise (no service manager: this development VM, minimal images) by SIGTERM to each
  irqbalance process, whose command line is kept in the journal; reverting starts that command
  line again, detached.

Coming back (a package upgrade, a restarted unit) is drift: ``verify`` reports it, ``enforce``
stops it again. Subprocesses run only when something is written, never on a read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from agent.tuning.base import TuningError, TuningHost, TuningItem

STOPPED, RUNNING = "stopped", "running"


def irqbalance_pids(host: TuningHost) -> list[int]:
    pids = []
    proc = host.root / "proc"
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


class IrqbalanceItem(TuningItem):
    name = "irqbalance"

    def __init__(self, host: TuningHost, enabled: bool | None) -> None:
        super().__init__(host)
        self.enabled = enabled

    def systemd(self) -> bool:
        return (self.host.root / "run/systemd/system").is_dir()

    def managed_keys(self) -> list[str]:
        return [] if self.enabled is None else ["service"]

    def read(self, key: str) -> str:
        pids = irqbalance_pids(self.host)
        if not pids:
            return STOPPED
        try:  # the command line, so that a revert without systemd can start it again
            argv = (self.host.root / f"proc/{pids[0]}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            return RUNNING + " " + " ".join(a.decode(errors="replace") for a in argv)
        except OSError:
            return RUNNING

    def same(self, key: str, current: str, value: str) -> bool:
        return current.split(" ", 1)[0] == value.split(" ", 1)[0]

    def wanted(self, key: str, current: str) -> str:
        if self.enabled:
            return current if current.startswith(RUNNING) else RUNNING
        return STOPPED

    def _systemctl(self, *args: str) -> None:
        cmd = ["nsenter", "-t", "1", "-m", "-u", "-i", "-n", "-p", "--", "systemctl", *args, "irqbalance.service"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise TuningError(f"irqbalance: {' '.join(cmd[9:])} failed: {res.stderr.strip()}")

    def write(self, key: str, value: str) -> None:
        if value.startswith(STOPPED):
            if self.systemd():
                self._systemctl("disable", "--now")
            for pid in irqbalance_pids(self.host):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
            deadline = time.monotonic() + 10
            while irqbalance_pids(self.host) and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        if self.systemd():
            self._systemctl("enable", "--now")
            return
        argv = value.split(" ")[1:]
        if not argv:
            raise TuningError("irqbalance: no command line recorded to start it again")
        subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while not irqbalance_pids(self.host) and time.monotonic() < deadline:
            time.sleep(0.05)
