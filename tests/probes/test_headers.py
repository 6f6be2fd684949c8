"""Kernel header discovery over fake host trees (never the real /lib/modules)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from probes.headers import HeadersNotFound, find_headers, resolve_in_root

R = "6.18.44-1-test"  # Debian-style release: <version>-<abi>-<flavour>


def touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def debian_headers(root: Path, version: str = "6.1.0-56", flavour: str = "cloud-amd64") -> None:
    touch(root / f"usr/src/linux-headers-{version}-common/include/linux/sched.h", "common")
    touch(root / f"usr/src/linux-headers-{version}-common/arch/x86/include/asm/a.h", "common-a")
    touch(root / f"usr/src/linux-headers-{version}-{flavour}/include/generated/autoconf.h", "flavour")
    touch(root / f"usr/src/linux-headers-{version}-{flavour}/arch/x86/include/asm/a.h", "flavour-a")


def tree_snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_host_split_build_and_source_under_a_host_root_is_merged(tmp_path: Path) -> None:
    host = tmp_path / "host"
    debian_headers(host, "6.18.44-1", "test")
    mods = host / f"lib/modules/{R}"
    mods.mkdir(parents=True)
    # Absolute links as on a real host: they must resolve inside the host root, not the container.
    os.symlink("/usr/src/linux-headers-6.18.44-1-test", mods / "build")
    os.symlink("/usr/src/linux-headers-6.18.44-1-common", mods / "source")
    before = tree_snapshot(host / "lib")
    h = find_headers(R, host_root=host, sys_root=tmp_path / "sys", cache_dir=tmp_path / "cache")
    assert (h.origin, h.exact) == ("host", True)
    assert Path(h.path, "include/linux/sched.h").read_text() == "common"
    assert Path(h.path, "include/generated/autoconf.h").read_text() == "flavour"
    assert tree_snapshot(host / "lib") == before  # nothing written under /lib/modules


def test_host_complete_build_tree_is_used_in_place(tmp_path: Path) -> None:
    touch(tmp_path / f"lib/modules/{R}/build/include/linux/sched.h")
    h = find_headers(R, host_root=tmp_path, sys_root=tmp_path / "sys", cache_dir=tmp_path / "cache")
    assert h.path == str(tmp_path / f"lib/modules/{R}/build") and h.exact
    assert not (tmp_path / "cache").exists()


def test_kheaders_archive_is_extracted_once(tmp_path: Path) -> None:
    data = b"#define X 1\n"
    archive = tmp_path / "sys/kernel/kheaders.tar.xz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:xz") as tar:
        info = tarfile.TarInfo("include/linux/x.h")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    kw = {"host_root": tmp_path / "host", "sys_root": tmp_path / "sys", "cache_dir": tmp_path / "cache"}
    h = find_headers(R, **kw)
    assert (h.origin, h.exact) == ("kheaders", True)
    header = Path(h.path, "include/linux/x.h")
    assert header.read_bytes() == data
    mtime = header.stat().st_mtime_ns
    assert find_headers(R, **kw) == h and header.stat().st_mtime_ns == mtime  # cached, not re-extracted


def test_distribution_set_merged_newest_first_flavour_wins(tmp_path: Path) -> None:
    debian_headers(tmp_path, "6.1.0-40")
    debian_headers(tmp_path, "6.1.0-56")
    h = find_headers(R, host_root=tmp_path, sys_root=tmp_path / "sys", cache_dir=tmp_path / "cache")
    assert (h.origin, h.release, h.exact) == ("distribution", "6.1.0-56-cloud-amd64", False)
    assert Path(h.path, "arch/x86/include/asm/a.h").read_text() == "flavour-a"
    assert Path(h.path, "include/linux/sched.h").is_symlink()
    assert "mismatched" in h.describe()
    again = find_headers(R, host_root=tmp_path, sys_root=tmp_path / "sys", cache_dir=tmp_path / "cache")
    assert again == h
    assert [p.name for p in (tmp_path / "cache/headers").iterdir()] == ["distribution-6.1.0-56-cloud-amd64"]


def test_exact_distribution_release_preferred(tmp_path: Path) -> None:
    debian_headers(tmp_path, "6.1.0-56")
    debian_headers(tmp_path, "6.18.44-1", "test")
    h = find_headers(R, host_root=tmp_path, sys_root=tmp_path / "sys", cache_dir=tmp_path / "cache")
    assert (h.release, h.exact) == (R, True)


def test_nothing_found_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(HeadersNotFound, match=r"kheaders\.tar\.xz absent"):
        find_headers(R, host_root=tmp_path / "h", sys_root=tmp_path / "sys", cache_dir=tmp_path / "c", src_dirs=[])


def test_resolve_in_root_keeps_absolute_links_inside(tmp_path: Path) -> None:
    (tmp_path / "usr/src/x").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    os.symlink("/usr/src/x", tmp_path / "a/link")
    os.symlink("../../..", tmp_path / "usr/src/x/up")
    assert resolve_in_root(tmp_path, "/a/link") == (tmp_path / "usr/src/x").resolve()
    assert resolve_in_root(tmp_path, "/a/link/up/../..") == tmp_path.resolve()


def test_half_built_or_stale_cache_is_rebuilt(tmp_path: Path) -> None:
    debian_headers(tmp_path)
    cache = tmp_path / "cache"
    h = find_headers(R, host_root=tmp_path, sys_root=tmp_path / "sys", cache_dir=cache)
    tree = Path(h.path)
    # A tree left by an interrupted build or an older version: no stamp, missing files.
    (tree / ".nodetune-tree").unlink()
    (tree / "include/generated/autoconf.h").unlink()
    h = find_headers(R, host_root=tmp_path, sys_root=tmp_path / "sys", cache_dir=cache)
    assert Path(h.path, "include/generated/autoconf.h").read_text() == "flavour"
    # The distribution set was upgraded in place: the stamp no longer matches, the tree is rebuilt.
    flavour = tmp_path / "usr/src/linux-headers-6.1.0-56-cloud-amd64"
    touch(flavour / "include/generated/new.h", "new")
    os.utime(flavour, ns=(1, 1))
    h = find_headers(R, host_root=tmp_path, sys_root=tmp_path / "sys", cache_dir=cache)
    assert Path(h.path, "include/generated/new.h").read_text() == "new"
    assert [p.name for p in (cache / "headers").iterdir()] == ["distribution-6.1.0-56-cloud-amd64"]
