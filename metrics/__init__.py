"""Prometheus metric families shared by the probes and the collectors: the log2 histogram layout,
per-workload series accounting, top-N label bounding and families that render their own text."""
