"""Collectors: non-BPF sources (cgroupfs, procfs, sock_diag), one module each, ``collect()`` only."""
