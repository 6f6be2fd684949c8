"""The journal of original values, on the host's disk, written before every change.

One JSON file (``<state dir>/tuning-journal.json``), always replaced atomically: written to a
temporary file in the same directory, fsync'd, renamed over the old one, and the directory
fsync'd (rename(2) is atomic; the fsyncs make it durable across a power cut). It records:

* ``boot_id`` (``/proc/sys/kernel/random/boot_id``): after a reboot the kernel is back at its boot
  values, so the originals are current again and the entries are dropped, not restored;
* ``entries``: ``item/key`` -> the value before nodetune first changed it, and the run that did;
* ``applying``: the run in progress, or null. A run found in progress at start-up was cut short
  (SIGKILL, power): its entries are restored, so a node is never left with half a run.

A journal that cannot be parsed is an error that stops every action (nothing is written).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

NAME = "tuning-journal.json"
VERSION = 1


class JournalError(Exception):
    """The journal is unreadable or malformed: nothing is done until an operator looks."""


@dataclass
class Entry:
    original: str
    run: int


@dataclass
class Journal:
    path: Path
    boot_id: str
    profile: str = ""
    run: int = 0  # the last run number handed out
    applying: int | None = None
    entries: dict[str, Entry] = field(default_factory=dict)

    @staticmethod
    def key(item: str, key: str) -> str:
        return f"{item}/{key}"

    @classmethod
    def load(cls, directory: Path, boot_id: str) -> Journal:
        path = directory / NAME
        try:
            raw = path.read_text()
        except FileNotFoundError:
            return cls(path, boot_id)
        except OSError as e:
            raise JournalError(f"{path}: {e.strerror}") from None
        try:
            data = json.loads(raw)
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            entries = {str(k): Entry(str(v["original"]), int(v["run"])) for k, v in dict(data["entries"]).items()}
            applying = data["applying"]
            journal = cls(
                path,
                str(data["boot_id"]),
                str(data.get("profile", "")),
                int(data["run"]),
                None if applying is None else int(applying),
                entries,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise JournalError(f"{path}: corrupt journal ({e}); fix or remove it by hand") from None
        return journal

    def save(self) -> None:
        data = {
            "version": VERSION,
            "boot_id": self.boot_id,
            "profile": self.profile,
            "run": self.run,
            "applying": self.applying,
            "entries": {k: {"original": e.original, "run": e.run} for k, e in sorted(self.entries.items())},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".journal-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.entries.clear()
        self.applying = None
