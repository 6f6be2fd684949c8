"""Node tuning: a declared profile (``profile.py``), validated against the host (``validate.py``),
turned into items (``sysctl.py``, ``thp.py``) that an engine (``engine.py``) plans, applies with a
journal of originals on the host's disk (``journal.py``), verifies and reverts."""
