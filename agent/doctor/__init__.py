"""``nodetune doctor``: a one-shot verdict on a node (OK / WARN / CRIT per resource), for a person at
a terminal or a script (``--json``).

The doctor reads what the agent exports, twice, ``--duration`` seconds apart: either by running the
agent's own probes and collectors in this process (``sources.LiveSource``) or from a running
agent's ``/metrics`` (``sources.RemoteSource``). Per-CPU times come from ``psutil`` (``cpu.py``),
the tuning state from the tuning engine (``tuning.py``). ``analyse.py`` turns the two readings into
findings (pure), ``render.py`` and ``report_json.py`` print them; the thresholds live in
``thresholds.py``.
"""
