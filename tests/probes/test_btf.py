"""BTF reader: a hand-built blob (exact layout known) and the running kernel's vmlinux."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from probes.btf import BTF, BTFError, Member


class BlobBuilder:
    """Writes BTF type records by the rules of Documentation/bpf/btf.rst."""

    def __init__(self) -> None:
        self.strings = b"\0"
        self.types = b""
        self.next_id = 1

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", kind_flag: int = 0) -> int:
        info = (kind_flag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + extra
        self.next_id += 1
        return self.next_id - 1

    def int_(self, name: str, size: int) -> int:
        return self.add(name, 1, 0, size, struct.pack("<I", size * 8))

    def struct_(
        self, name: str, size: int, members: list[tuple[str, int, int]], kind: int = 4, bitfields: bool = False
    ) -> int:
        extra = b"".join(struct.pack("<III", self.s(n), t, off) for n, t, off in members)
        return self.add(name, kind, len(members), size, extra, kind_flag=int(bitfields))

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def sample_blob() -> bytes:
    b = BlobBuilder()
    u32 = b.int_("unsigned int", 4)
    u64 = b.int_("long unsigned int", 8)
    arr = b.add("", 3, 0, 0, struct.pack("<III", u32, u32, 4))  # unsigned int[4]
    b.add("task_struct", 7, 0, 0)  # a forward declaration first: must be skipped
    inner = b.struct_("", 8, [("pid", u32, 0), ("tgid", u32, 32)])
    union = b.struct_("", 8, [("state", u64, 0)], kind=5)
    b.struct_(
        "task_struct",
        64,
        [("flags", u32, 0), ("", inner, 64), ("", union, 128), ("words", arr, 192), ("bits", u32, (3 << 24) | 320)],
        bitfields=True,
    )
    proto = b.add("", 13, 1, u64, struct.pack("<II", 0, u32))
    b.add("bpf_get_current_task_btf", 12, 0, proto)  # FUNC -> FUNC_PROTO
    named = b.add("", 13, 2, u32, struct.pack("<IIII", b.s("death_row"), u64, b.s("sk"), u64))
    b.add("__inet_hash_connect", 12, 0, named)
    b.add("not_a_function", 8, 0, u32)  # a typedef of the same kind of name
    return b.blob()


def test_members_through_anonymous_struct_and_union() -> None:
    btf = BTF(sample_blob())
    assert btf.member("task_struct", "flags") == Member(0, 4)
    assert btf.member("task_struct", "pid") == Member(8, 4)
    assert btf.member("task_struct", "tgid") == Member(12, 4)
    assert btf.member("task_struct", "state") == Member(16, 8)
    assert btf.member("task_struct", "words") == Member(24, 16)


def test_bitfield_offsets_are_refused() -> None:
    btf = BTF(sample_blob())
    assert btf.member("task_struct", "words").offset == 24  # kind_flag: low 24 bits are the bit offset
    with pytest.raises(BTFError, match="bitfield"):
        BTF(sample_blob().replace(struct.pack("<I", (3 << 24) | 320), struct.pack("<I", (3 << 24) | 321))).member(
            "task_struct", "bits"
        )


def test_has_function_finds_func_records_only() -> None:
    btf = BTF(sample_blob())
    assert btf.has_function("bpf_get_current_task_btf")
    assert not btf.has_function("not_a_function") and not btf.has_function("missing")


def test_function_params_in_order_from_the_prototype() -> None:
    btf = BTF(sample_blob())
    assert btf.function_params("__inet_hash_connect") == ("death_row", "sk")
    assert btf.function_params("bpf_get_current_task_btf") == ("",)  # an unnamed parameter
    for name in ("not_a_function", "missing"):  # a typedef is no function
        with pytest.raises(BTFError, match="not found"):
            btf.function_params(name)


def test_errors() -> None:
    with pytest.raises(BTFError, match="magic"):
        BTF(b"\0" * 32)
    with pytest.raises(BTFError, match="not found"):
        BTF(sample_blob()).member("mm_struct", "pgd")
    with pytest.raises(BTFError, match="no member"):
        BTF(sample_blob()).member("task_struct", "comm")
    with pytest.raises(BTFError, match="cannot read"):
        BTF.from_file("/nonexistent/vmlinux")


VMLINUX = Path("/sys/kernel/btf/vmlinux")


@pytest.mark.skipif(not VMLINUX.exists(), reason="kernel without CONFIG_DEBUG_INFO_BTF")
def test_running_kernel() -> None:
    btf = BTF.from_file(VMLINUX)
    pid = btf.member("task_struct", "pid")
    assert pid.size == 4 and 0 < pid.offset < 16384
    assert btf.member("task_struct", "tgid").offset == pid.offset + 4  # declared right after pid
    assert btf.member("task_struct", "sched_info").size >= 16
    assert btf.has_function("schedule")
    assert btf.function_params("tcp_v4_connect") == ("sk", "uaddr", "addr_len")  # unchanged since 2.6


@pytest.mark.parametrize("cut", [0, 10, 24, 1000, -5])
def test_truncated_blob_is_a_btf_error(tmp_path: Path, cut: int) -> None:
    data = Path("/sys/kernel/btf/vmlinux").read_bytes() if Path("/sys/kernel/btf/vmlinux").exists() else None
    if data is None:
        pytest.skip("no kernel BTF")
    with pytest.raises(BTFError):
        BTF(data[:cut])


def test_garbled_records_are_a_btf_error_on_lookup_too() -> None:
    path = Path("/sys/kernel/btf/vmlinux")
    if not path.exists():
        pytest.skip("no kernel BTF")
    data = bytearray(path.read_bytes())
    hdr_len = int.from_bytes(data[4:8], "little")
    type_off = int.from_bytes(data[8:12], "little")
    for i in range(hdr_len + type_off + 200, hdr_len + type_off + 4000, 7):
        data[i] = 0xFF  # vlen / kind / offsets of early records turn to garbage
    try:
        btf = BTF(bytes(data))
    except BTFError:
        return  # rejected while parsing: fine
    with pytest.raises(BTFError):
        btf.member("task_struct", "sched_info")
        btf.enum_value("cgroup_subsys_id", "cpu_cgrp_id")


def test_enum_value_of_the_running_kernel() -> None:
    path = Path("/sys/kernel/btf/vmlinux")
    if not path.exists():
        pytest.skip("no kernel BTF")
    btf = BTF.from_file(path)
    order = [line.split()[0] for line in Path("/proc/cgroups").read_text().splitlines()[1:]]
    assert btf.enum_value("cgroup_subsys_id", "cpu_cgrp_id") == order.index("cpu")  # same order as the kernel's
    with pytest.raises(BTFError):
        btf.enum_value("cgroup_subsys_id", "no_such_cgrp_id")
