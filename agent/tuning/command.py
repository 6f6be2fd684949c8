"""``nodetune tune plan|apply|verify|revert``: the tuning engine from the command line.

Exit codes (DESIGN.md contract): 0 done / in sync; 1 changes pending or drift (plan, verify);
2 invalid input (bad profile, corrupt journal): nothing touched; 3 apply (or revert) failed and
what this run wrote was put back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.tuning.base import TuningError
from agent.tuning.engine import ApplyFailed, Engine
from agent.tuning.journal import JournalError
from agent.tuning.lock import DEFAULT_TIMEOUT_S
from agent.tuning.profile import ProfileError, parse, read_profile_text, select
from agent.tuning.validate import build
from host.paths import HostPaths

OK, PENDING, INVALID, FAILED = 0, 1, 2, 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser("tune", help="plan, apply, verify or revert a tuning profile")
    tune.add_argument("action", choices=("plan", "apply", "verify", "revert"))
    tune.add_argument("--profile", help="profile YAML file (required except for revert)")
    tune.add_argument("--host-root", default="/", help="where the host's / is mounted (default: /)")
    tune.add_argument("--state-dir", default=None, help="journal directory (default: <host-root>/var/lib/nodetune)")
    tune.add_argument(
        "--node-labels", default=None, help="k=v,... this node's labels for profile selectors (default: none known)"
    )
    tune.add_argument(
        "--lock-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds to wait for the host's tuning lock held by another writer (default: {DEFAULT_TIMEOUT_S:g});"
        " then exit 3, nothing changed",
    )


def parse_labels(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    labels = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ProfileError(f"--node-labels: {part!r} is not key=value")
        labels[key] = value
    return labels


def run(args: argparse.Namespace, out=sys.stdout, err=sys.stderr) -> int:
    host = HostPaths(Path(args.host_root), Path(args.state_dir) if args.state_dir else None)
    try:
        labels = parse_labels(args.node_labels)
        if args.profile is None and args.action != "revert":
            raise ProfileError(f"tune {args.action}: --profile FILE is required")
        items, warnings, name, unsafe = [], [], "", []
        if args.profile is not None:
            try:
                text = read_profile_text(Path(args.profile))
            except OSError as e:
                raise ProfileError(f"{args.profile}: {e.strerror}") from None
            profile = select(parse(text), labels)
            if profile is None:
                raise ProfileError(f"{args.profile}: no profile matches this node's labels")
            items, warnings = build(profile, host)
            name, unsafe = profile.name, profile.unsafe
        lock_timeout = getattr(args, "lock_timeout", None)  # None: the lock's default
        if lock_timeout is not None and not lock_timeout >= 0:  # also NaN
            raise ProfileError(f"--lock-timeout {lock_timeout}: must be 0 or more seconds")
        engine = Engine(host, items, name, lock_timeout_s=lock_timeout, unsafe=unsafe)
        for w in warnings:
            print(f"warning: {w}", file=err)
        if args.action in ("plan", "verify"):
            if args.action == "verify":  # finishes an interrupted run first; plan stays pure
                engine.load()
            changes = engine.plan()
            for note in [*engine.messages, *engine.notes()]:
                print(f"note: {note}", file=err)
            for c in changes:
                print(("drift: " if args.action == "verify" else "change: ") + c.describe(), file=out)
            if not changes:
                print(f"profile {name}: in sync", file=out)
            return PENDING if changes else OK
        if args.action == "apply":
            changes = engine.apply()
            for note in [*engine.messages, *engine.notes()]:
                print(f"note: {note}", file=err)
            for c in changes:
                print("applied: " + c.describe(), file=out)
            if not changes:
                print(f"profile {name}: in sync, nothing to do", file=out)
            return OK
        restored = engine.revert()
        for note in engine.messages:
            print(f"note: {note}", file=err)
        for c in restored:
            print("restored: " + c.describe(), file=out)
        print(f"reverted {len(restored)} key(s); journal cleared", file=out)
        return OK
    except (ProfileError, JournalError) as e:
        print(f"nodetune: {e}", file=err)
        return INVALID
    except ApplyFailed as e:
        print(f"nodetune: {e}; {e.outcome()}", file=err)
        return FAILED
    except (OSError, TuningError) as e:
        print(f"nodetune: {e}", file=err)
        return FAILED
