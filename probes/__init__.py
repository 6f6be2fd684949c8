"""BPF probes and their loaders. Never imports ``agent``: labels come in through CgroupLabeler."""

from __future__ import annotations

from probes.base import Probe
from probes.connect import ConnectProbe
from probes.lockstat import LockstatProbe
from probes.runqlat import RunqlatProbe

PROBES: dict[str, type[Probe]] = {cls.name: cls for cls in (RunqlatProbe, LockstatProbe, ConnectProbe)}
