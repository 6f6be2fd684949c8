"""What the doctor knows of the node's tuning: each managed key in or out of the profile, transparent
hugepages, irqbalance. Through the tuning engine (``agent/tuning``): a live run asks the agent's
tuning unit (``Engine.plan``/``verify``: current and wanted values, reads only); a ``--from`` run
takes ``nodetune_tuning_in_sync{item,key}`` and the profile's name from the agent's metrics. THP and
irqbalance are read on this host by the tuning items' own readers (``ThpItem.read``,
``irqbalance_pids``) in both modes: the doctor runs on the node it diagnoses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.doctor.reading import Reading
from agent.tuning.base import TuningError
from agent.tuning.engine import Engine
from agent.tuning.irqbalance import irqbalance_pids
from agent.tuning.profile import THP
from agent.tuning.thp import ThpItem
from agent.tuning.unit import TuningUnit
from host.paths import HostPaths


@dataclass(frozen=True)
class KeyState:
    item: str
    key: str
    in_sync: bool
    current: str = ""  # known in a live run
    wanted: str = ""


@dataclass
class TuningFacts:
    profile: str = ""  # name of the profile in force ("" none)
    mode: str = ""
    valid: bool = True
    judged: bool = False  # keys out of the profile are a WARN (someone asked for it), else only listed
    not_judged: str = ""  # why not, for the summary
    keys: list[KeyState] = field(default_factory=list)
    thp_enabled: str | None = None  # None: unreadable (no THP in this kernel)
    thp_reason: str = ""
    irqbalance_running: bool = False


def host_facts(host: HostPaths, facts: TuningFacts) -> TuningFacts:
    """THP's ``enabled`` mode and whether irqbalance runs, read on this host."""
    try:
        facts.thp_enabled = ThpItem(host, THP()).read("enabled")
    except OSError as e:
        facts.thp_enabled, facts.thp_reason = None, f"{host.thp}/enabled: {e.strerror or e}"
    facts.irqbalance_running = bool(irqbalance_pids(host))
    return facts


def from_unit(unit: TuningUnit, judged: bool = False) -> TuningFacts:
    """A live run: the agent's tuning unit (observe mode: it has only read the host). ``judged``:
    the profile was given (``--profile``), not the built-in default."""
    facts = TuningFacts(unit.profile.name if unit.profile else "", unit.mode, unit.valid, judged)
    facts.not_judged = "" if judged else "no --profile given"
    if unit.profile is not None:
        engine = Engine(unit.host, unit.items, unit.profile.name)
        try:
            pending = {(c.item, c.key): c for c in engine.plan()}
            in_sync = engine.verify()
        except (OSError, TuningError):  # a key unreadable now: the unit's last verify, without values
            pending, in_sync = {}, dict(unit.in_sync)
        for (item, key), ok in sorted(in_sync.items()):
            change = pending.get((item, key))
            facts.keys.append(KeyState(item, key, ok, change.old if change else "", change.new if change else ""))
    return host_facts(unit.host, facts)


def from_metrics(reading: Reading, host: HostPaths) -> TuningFacts:
    """A ``--from`` run: the running agent's view of the profile, plus this host's THP and irqbalance."""
    facts = TuningFacts()
    for labels in reading.get("nodetune_tuning_profile_info"):
        d = dict(labels)
        facts.profile, facts.mode = d.get("profile", ""), d.get("mode", "")
    valid = reading.get("nodetune_tuning_profile_valid")
    facts.valid = all(v == 1 for v in valid.values())
    facts.judged = facts.mode == "enforce"  # as NodetuneTuningOutOfSync: observing, drift is the report
    facts.not_judged = "" if facts.judged else "the agent only observes"
    for labels, value in sorted(reading.get("nodetune_tuning_in_sync").items()):
        d = dict(labels)
        facts.keys.append(KeyState(d.get("item", ""), d.get("key", ""), value == 1))
    return host_facts(host, facts)
