"""The host's kernel interfaces below the agent and the probes: where its files are (``paths``),
the one libc handle (``libc``) and sock_diag netlink dumps (``sockdiag``)."""
