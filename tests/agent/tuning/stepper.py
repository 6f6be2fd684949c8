"""A second process for the tuning tests: applies (or reverts) a profile on a fixture host and, at a
named engine step, either SIGKILLs itself or pauses holding the host lock until the test lets it go.

    python -m tests.agent.tuning.stepper HOST apply|revert PROFILE|- [--kill-at STEP]
        [--pause-at STEP --gate DIR]   # writes DIR/paused, waits for DIR/go

Used by the concurrency and crash-recovery tests, which need real processes (a flock is per open
file description; SIGKILL is a real process dying). ``killed_in_child`` does the SIGKILL case in a
forked child (no interpreter start-up: the crash tests kill dozens of runs).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from agent.tuning.engine import Engine
from agent.tuning.profile import parse
from agent.tuning.validate import build
from host.paths import HostPaths

REPO = Path(__file__).resolve().parents[3]


def argv(host: Path, action: str, profile: Path | None, **opts: str) -> list[str]:
    extra = [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", v)]
    return [sys.executable, "-m", "tests.agent.tuning.stepper", str(host), action, str(profile or "-"), *extra]


def engine(host: Path, profile_text: str | None, on_step) -> Engine:
    th = HostPaths(host)
    if profile_text is None:
        return Engine(th, [], on_step=on_step)
    (profile,) = parse(profile_text)
    return Engine(th, build(profile, th)[0], profile.name, on_step=on_step)


def killed_in_child(host: Path, action: str, profile_text: str | None, kill_at: str) -> int:
    """Run ``action`` in a forked child that SIGKILLs itself after step ``kill_at``; its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test
        try:

            def step(label: str) -> None:
                if label == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            getattr(engine(host, profile_text, step), action)()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("action", choices=("apply", "revert"))
    p.add_argument("profile")
    p.add_argument("--kill-at", default="")
    p.add_argument("--pause-at", default="")
    p.add_argument("--gate", default="")
    args = p.parse_args()
    host = HostPaths(Path(args.host))
    items, name = [], ""
    if args.profile != "-":
        (profile,) = parse(Path(args.profile).read_text())
        items, _ = build(profile, host)
        name = profile.name

    def step(label: str) -> None:
        if label == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if label == args.pause_at:
            gate = Path(args.gate)
            (gate / "paused").touch()
            deadline = time.monotonic() + 60  # the test lets go long before; never hang forever
            while not (gate / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)

    engine = Engine(host, items, name, on_step=step)
    getattr(engine, args.action)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
