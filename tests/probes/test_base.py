"""KernelFacts finds the kernel's files through the host's HostPaths: BTF and the kheaders archive
under the host's /sys (--host-root), BTF from an injected file when a test gives one."""

from __future__ import annotations

from pathlib import Path

from host.paths import HostPaths
from probes.base import KernelFacts
from tests.probes.test_headers import write_kheaders


def test_btf_is_the_hosts_unless_a_file_is_given(tmp_path: Path) -> None:
    host = HostPaths(tmp_path / "host")
    assert KernelFacts(host=host).btf_path == tmp_path / "host/sys/kernel/btf/vmlinux"
    assert KernelFacts(host=host).btf is None  # nothing there: no BTF, not this machine's
    assert KernelFacts(host=host, btf_path=tmp_path / "vmlinux").btf_path == tmp_path / "vmlinux"
    assert KernelFacts().btf_path == Path("/sys/kernel/btf/vmlinux")


def test_headers_are_searched_under_the_host_root(tmp_path: Path) -> None:
    data = b"#define FROM_THE_HOST 1\n"
    write_kheaders(tmp_path / "host", data)
    kernel = KernelFacts(release="6.18.0-test", host=HostPaths(tmp_path / "host"), cache_dir=tmp_path / "cache")
    headers = kernel.headers
    assert not isinstance(headers, Exception), headers
    assert headers.origin == "kheaders"
    assert Path(headers.path, "include/linux/x.h").read_bytes() == data
