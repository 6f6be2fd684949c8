"""connect probe: port-allocation failures and search time per workload, on network namespaces
and cgroups made by the tests (the seed-000 scenario: a pod's port range exhausted towards one
upstream)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from probes import bpfsys
from probes.base import KernelFacts
from probes.btf import BTFError, Member
from probes.connect import FAILURES_WORD, HIST, STATE_SOCKOPS, ConnectProbe
from probes.histogram import NSLOTS
from tests.probes.test_runqlat import IdLabeler


class FakeBTF:
    def __init__(self, protocol_size: int = 2) -> None:
        self.protocol_size = protocol_size

    def has_function(self, name: str) -> bool:
        return name in ("bpf_get_current_task_btf", "__traceiter_inet_sock_set_state")

    def member(self, struct: str, name: str) -> Member:
        table = {("sock", "sk_protocol"): Member(532, self.protocol_size), ("sock_common", "skc_num"): Member(14, 2)}
        if (struct, name) not in table:
            raise BTFError(f"struct {struct} has no member {name!r}")
        return table[(struct, name)]


def fake_probe(tmp_path: Path, cgroup2: Path | None, btf: FakeBTF | None) -> ConnectProbe:
    k = KernelFacts(release="6.18.0-test", cache_dir=tmp_path, cgroup2_root=cgroup2)
    k.__dict__["btf"] = btf
    return ConnectProbe(k, IdLabeler(), search_slots=256)


def test_render_uses_btf_offsets_and_a_bounded_slot_array(tmp_path: Path) -> None:
    text, cflags = fake_probe(tmp_path, tmp_path, FakeBTF()).render(STATE_SOCKOPS)
    assert "RAW_TRACEPOINT_PROBE(inet_sock_set_state)" in text and "int connect_sockops(" in text
    assert "BPF_ARRAY(connect_searches, struct search, SEARCH_SLOTS);" in text
    assert {"-DSEARCH_SLOTS=256", "-DSK_PROTOCOL_OFF=532", "-DSKC_NUM_OFF=14", f"-DFAILURES_WORD={NSLOTS + 1}"} <= set(
        cflags
    )


def test_unavailable_without_cgroup2_or_readable_sock_layout(tmp_path: Path) -> None:
    assert "cgroup v2" in fake_probe(tmp_path, None, FakeBTF()).unsupported(STATE_SOCKOPS)
    assert "unexpected sizes" in fake_probe(tmp_path, tmp_path, FakeBTF(protocol_size=1)).unsupported(STATE_SOCKOPS)
    assert "no kernel BTF" in fake_probe(tmp_path, tmp_path, None).unsupported(STATE_SOCKOPS)


def test_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="power of two"):
        ConnectProbe(KernelFacts(cache_dir=tmp_path), search_slots=1000)


# --- on the real kernel --------------------------------------------------------------------------


def loaded(cache: Path, cgroup2: Path) -> ConnectProbe:
    probe = ConnectProbe(KernelFacts(cache_dir=cache, cgroup2_root=cgroup2), IdLabeler())
    probe.load()
    assert probe.attach == STATE_SOCKOPS
    return probe


def row(probe: ConnectProbe, cgroup_id: int) -> list[int]:
    return probe.series(HIST).get((str(cgroup_id),), [0] * (FAILURES_WORD + 1))


@pytest.mark.bpf
def test_exhausted_range_counts_each_failed_connect_of_the_cgroup(
    header_cache: Path, cgroup_v2_root: Path, make_cgroup, netns
) -> None:
    """The seed: 10 ports, 10 connections held to one listener, then 5 more connects fail with
    EADDRNOTAVAIL (the holder reports it): exactly 5 failures and 15 searches for that cgroup."""
    cg = make_cgroup("connect")
    ns = netns("40000 40009")
    probe = loaded(header_cache, cgroup_v2_root)
    try:
        before = row(probe, cg.id)
        _, out = ns.hold(10, "127.0.0.1:30000", extra=5, cgroup=str(cg.path))
        after = row(probe, cg.id)
        stats = probe.read_stats()
    finally:
        probe.close()
    assert out == "ok 10 EADDRNOTAVAIL=5", out
    assert after[FAILURES_WORD] - before[FAILURES_WORD] == 5
    assert sum(after[:NSLOTS]) - sum(before[:NSLOTS]) == 15  # 10 successful searches, 5 failed
    assert stats["slot_busy"] == 0


@pytest.mark.bpf
def test_crowded_range_searches_slower_and_others_are_not_charged(
    header_cache: Path, cgroup_v2_root: Path, make_cgroup, netns
) -> None:
    """1000 of 1024 ports held towards 127.0.0.1:30000 by one cgroup; another cgroup then connects
    20 times to the same destination there, and a third 20 times in an empty namespace. Each
    cgroup is charged exactly its own connects, and the crowded searches take far longer."""
    fill, crowded, empty = make_cgroup("fill"), make_cgroup("crowded"), make_cgroup("empty")
    ns_crowded, ns_empty = netns("40000 41023"), netns("40000 41023")
    probe = loaded(header_cache, cgroup_v2_root)
    try:
        _, out = ns_crowded.hold(1000, "127.0.0.1:30000", cgroup=str(fill.path))
        assert out == "ok 1000", out
        _, out_c = ns_crowded.hold(0, "127.0.0.1:30000", extra=20, cgroup=str(crowded.path))
        _, out_e = ns_empty.hold(0, "127.0.0.1:30000", extra=20, cgroup=str(empty.path))
        rows = {name: row(probe, cg.id) for name, cg in (("fill", fill), ("crowded", crowded), ("empty", empty))}
    finally:
        probe.close()
    assert out_c == "ok 0 ok=20" and out_e == "ok 0 ok=20", (out_c, out_e)
    counts = {name: sum(r[:NSLOTS]) for name, r in rows.items()}
    assert counts == {"fill": 1000, "crowded": 20, "empty": 20}
    assert all(r[FAILURES_WORD] == 0 for r in rows.values())
    mean_crowded = rows["crowded"][NSLOTS] / 20
    mean_empty = rows["empty"][NSLOTS] / 20
    print(f"port search: crowded {mean_crowded / 1e3:.1f} us vs empty {mean_empty / 1e3:.1f} us per connect")
    assert mean_crowded > 3 * mean_empty


@pytest.mark.bpf
def test_close_detaches_the_sock_ops_link(header_cache: Path, cgroup_v2_root: Path) -> None:
    """The program is linked to the cgroup root next to whatever else is there, and gone on close."""

    def attached() -> int:
        fd = os.open(cgroup_v2_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return bpfsys.attached_count(fd, bpfsys.BPF_CGROUP_SOCK_OPS)
        finally:
            os.close(fd)

    baseline = attached()
    probe = loaded(header_cache, cgroup_v2_root)
    try:
        assert attached() == baseline + 1
        second = loaded(header_cache, cgroup_v2_root)  # another user of the hook (BPF_F_ALLOW_MULTI)
        assert attached() == baseline + 2
        second.close()
        assert attached() == baseline + 1
    finally:
        probe.close()
    assert attached() == baseline
