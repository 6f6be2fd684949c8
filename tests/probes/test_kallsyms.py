"""Kernel symbols: text symbols named by the function an address lies in, bounded by the next
symbol and by the region (core text, module), re-read when a module comes or goes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from probes.kallsyms import PAGE, KernelSymbols, find_addresses

KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81000100 t helper_a
ffffffff81000200 T caller_b
ffffffff81000300 T _etext
ffffffff81000300 D some_data_after_text
ffffffffc0001000 t bpf_prog_1234_handler\t[bpf]
ffffffffc0100000 t ipvs_start\t[ip_vs]
ffffffffc0100400 T ip_vs_conn_new\t[ip_vs]
"""
MODULES = "ip_vs 8192 0 - Live 0xffffffffc0100000\n"


def write(tmp_path: Path, kallsyms: str = KALLSYMS, modules: str | None = MODULES) -> KernelSymbols:
    (tmp_path / "kallsyms").write_text(kallsyms)
    if modules is not None:
        (tmp_path / "modules").write_text(modules)
    return KernelSymbols(tmp_path / "kallsyms")


def test_return_addresses_are_named_by_the_byte_before_them(tmp_path: Path) -> None:
    syms = write(tmp_path)
    assert syms.caller(0xFFFFFFFF81000150) == "helper_a"
    assert syms.caller(0xFFFFFFFF81000200) == "helper_a"  # a call as helper_a's last instruction
    assert syms.caller(0xFFFFFFFF81000201) == "caller_b"
    assert syms.caller(0xFFFFFFFF80000000) is None  # below the first symbol


def test_no_symbol_is_stretched_past_its_region(tmp_path: Path) -> None:
    syms = write(tmp_path)
    assert syms.function(0xFFFFFFFF810002FF) == "caller_b"
    assert syms.function(0xFFFFFFFF81000310) is None  # past _etext: data, not any function
    assert syms.function(0xFFFFFFFFA0000000) is None  # between the kernel and the modules
    assert syms.function(0xFFFFFFFFC0001000 + PAGE - 1) == "bpf_prog_1234_handler"
    assert syms.function(0xFFFFFFFFC0001000 + PAGE) is None  # a BPF program: no size, one page
    assert syms.function(0xFFFFFFFFC0101FFF) == "ip_vs_conn_new"  # up to the module's end (8 KiB)
    assert syms.function(0xFFFFFFFFC0102000) is None


def test_addresses_by_exact_name_and_hidden_addresses(tmp_path: Path) -> None:
    syms = write(tmp_path)
    assert syms.address("caller_b") == 0xFFFFFFFF81000200
    assert syms.address("caller") is None and syms.address("b") is None  # whole names only
    assert syms.address("some_data_after_text") is None  # text symbols only
    hidden = "".join("0" * 16 + line[16:] + "\n" for line in KALLSYMS.splitlines())
    assert not write(tmp_path, hidden).available  # kptr_restrict: every address zero


def test_a_scan_finds_core_symbols_by_whole_name_only(tmp_path: Path) -> None:
    """``find_addresses``: the load-time lookup without the table. A module's symbol of the same
    name, a longer name ending the same, a name absent and hidden addresses are all left out."""
    kallsyms = KALLSYMS + "ffffffffc0100800 t _etext\t[ip_vs]\nffffffff81000400 T x_caller_b\n"
    (tmp_path / "kallsyms").write_text(kallsyms)
    assert find_addresses(tmp_path / "kallsyms", ("_stext", "_etext", "caller_b", "absent")) == {
        "_stext": 0xFFFFFFFF81000000,
        "_etext": 0xFFFFFFFF81000300,  # the core one, not the module's
        "caller_b": 0xFFFFFFFF81000200,  # not x_caller_b
    }
    hidden = "".join("0" * 16 + line[16:] + "\n" for line in kallsyms.splitlines())
    (tmp_path / "kallsyms").write_text(hidden)
    assert find_addresses(tmp_path / "kallsyms", ("_stext", "caller_b")) == {}
    with pytest.raises(OSError):
        find_addresses(tmp_path / "absent", ("_stext",))


def test_a_module_loaded_later_is_named_after_a_refresh_and_not_before(tmp_path: Path) -> None:
    syms = write(tmp_path)
    assert not syms.refresh()  # nothing changed: not read again
    late = 0xFFFFFFFFC0200010
    assert syms.function(late) is None  # not named after whatever came below it
    (tmp_path / "kallsyms").write_text(KALLSYMS + "ffffffffc0200000 t nf_conntrack_in\t[nf_conntrack]\n")
    (tmp_path / "modules").write_text(MODULES + "nf_conntrack 4096 1 - Live 0xffffffffc0200000\n")
    assert syms.refresh()
    assert syms.function(late) == "nf_conntrack_in"


def test_a_kernel_without_modules(tmp_path: Path) -> None:
    syms = write(tmp_path, modules=None)  # CONFIG_MODULES off: no /proc/modules
    assert syms.function(0xFFFFFFFF81000150) == "helper_a"
    assert syms.function(0xFFFFFFFFC0100500) == "ip_vs_conn_new"  # no region known: one page
    assert not syms.refresh()


def test_this_machine_has_the_locking_code_bounds_in_a_compact_table() -> None:
    if os.geteuid() != 0:
        pytest.skip("kallsyms addresses need root")
    syms = KernelSymbols()
    assert syms.address("__sched_text_start") and syms.address("__lock_text_end")
    bounds = ("__sched_text_start", "__lock_text_end")
    assert find_addresses(Path("/proc/kallsyms"), bounds) == {name: syms.address(name) for name in bounds}
    spin = syms.address("_raw_spin_lock")
    assert spin is not None and syms.caller(spin + 4) == "_raw_spin_lock"
    with open("/proc/kallsyms") as f:
        text = sum(1 for line in f if line.split()[1] in ("t", "T"))
    assert syms.nbytes() < 64 * text  # about 50 B a symbol (no Python object per symbol)
