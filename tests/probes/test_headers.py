"""Kernel header discovery over fake host trees: never the machine's /lib/modules or /usr/src
(every call names its own host root, sys root, cache and image directory); the cache's tidying
against real builder processes killed midway."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from host.paths import HostPaths
from probes.headers import BUILDING, LOCK, STAMP, HeadersNotFound, find_headers, resolve_in_root
from tests.conftest import REPO

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


def cached(cache: Path) -> list[str]:
    """What the header cache holds, but its lock file."""
    return sorted(p.name for p in (cache / "headers").iterdir() if p.name != LOCK)


def own(tmp_path: Path, **extra: object) -> dict[str, object]:
    """find_headers() arguments that keep it inside ``tmp_path``: the image's header directory
    (searched when the host root is not /) is the test's own, empty unless the test fills it."""
    return {
        "cache_dir": tmp_path / "cache",
        "image_src": tmp_path / "image/usr/src",
        **extra,
    }


def test_host_split_build_and_source_under_a_host_root_is_merged(tmp_path: Path) -> None:
    host = tmp_path / "host"
    debian_headers(host, "6.18.44-1", "test")
    mods = host / f"lib/modules/{R}"
    mods.mkdir(parents=True)
    # Absolute links as on a real host: they must resolve inside the host root, not the container.
    os.symlink("/usr/src/linux-headers-6.18.44-1-test", mods / "build")
    os.symlink("/usr/src/linux-headers-6.18.44-1-common", mods / "source")
    before = tree_snapshot(host / "lib")
    h = find_headers(R, host=HostPaths(host), **own(tmp_path))
    assert (h.origin, h.exact) == ("host", True)
    assert Path(h.path, "include/linux/sched.h").read_text() == "common"
    assert Path(h.path, "include/generated/autoconf.h").read_text() == "flavour"
    assert tree_snapshot(host / "lib") == before  # nothing written under /lib/modules


def test_host_complete_build_tree_is_used_in_place(tmp_path: Path) -> None:
    touch(tmp_path / f"lib/modules/{R}/build/include/linux/sched.h")
    h = find_headers(R, host=HostPaths(tmp_path), **own(tmp_path))
    assert h.path == str(tmp_path / f"lib/modules/{R}/build") and h.exact
    assert not (tmp_path / "cache").exists()


def test_host_headers_in_place_still_tidy_what_killed_builds_left(tmp_path: Path) -> None:
    """Headers installed on the host after a start was killed mid-build: the cache is not used,
    but what the killed build left there is removed all the same."""
    touch(tmp_path / f"lib/modules/{R}/build/include/linux/sched.h")
    touch(tmp_path / f"cache/headers/{BUILDING}distribution-6.1.0-56-cloud-amd64.a1b2c3d4/include/x.h")
    touch(tmp_path / "cache/headers/.stale.kheaders-6.18.44-1-test.e5f6a7b8/tree/include/x.h")  # removal cut short
    for name in (f"{BUILDING}kheaders-{R}.c9d8e7f6", f"kheaders-{R}.c9d8e7f6"):  # killed after the stamp
        touch(tmp_path / f"cache/headers/{name}/{STAMP}")
    h = find_headers(R, host=HostPaths(tmp_path), **own(tmp_path))
    assert (h.origin, h.path) == ("host", str(tmp_path / f"lib/modules/{R}/build"))
    assert cached(tmp_path / "cache") == []


def write_kheaders(host_root: Path, data: bytes) -> Path:
    """A kernel's /sys/kernel/kheaders.tar.xz under ``host_root``, holding include/linux/x.h."""
    archive = host_root / "sys/kernel/kheaders.tar.xz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:xz") as tar:
        info = tarfile.TarInfo("include/linux/x.h")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return archive


def test_kheaders_archive_is_extracted_once(tmp_path: Path) -> None:
    data = b"#define X 1\n"
    write_kheaders(tmp_path / "host", data)
    kw = own(tmp_path, host=HostPaths(tmp_path / "host"))
    h = find_headers(R, **kw)
    assert (h.origin, h.exact) == ("kheaders", True)
    header = Path(h.path, "include/linux/x.h")
    assert header.read_bytes() == data
    mtime = header.stat().st_mtime_ns
    assert find_headers(R, **kw) == h and header.stat().st_mtime_ns == mtime  # cached, not re-extracted


def test_distribution_set_merged_newest_first_flavour_wins(tmp_path: Path) -> None:
    debian_headers(tmp_path, "6.1.0-40")
    debian_headers(tmp_path, "6.1.0-56")
    h = find_headers(R, host=HostPaths(tmp_path), **own(tmp_path))
    assert (h.origin, h.release, h.exact) == ("distribution", "6.1.0-56-cloud-amd64", False)
    assert Path(h.path, "arch/x86/include/asm/a.h").read_text() == "flavour-a"
    assert Path(h.path, "include/linux/sched.h").is_symlink()
    assert "mismatched" in h.describe()
    again = find_headers(R, host=HostPaths(tmp_path), **own(tmp_path))
    assert again == h
    assert cached(tmp_path / "cache") == ["distribution-6.1.0-56-cloud-amd64"]


def test_exact_distribution_release_preferred(tmp_path: Path) -> None:
    debian_headers(tmp_path, "6.1.0-56")
    debian_headers(tmp_path, "6.18.44-1", "test")
    h = find_headers(R, host=HostPaths(tmp_path), **own(tmp_path))
    assert (h.release, h.exact) == (R, True)


def test_nothing_found_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(HeadersNotFound, match=r"kheaders\.tar\.xz absent"):
        find_headers(R, host=HostPaths(tmp_path / "h"), cache_dir=tmp_path / "c", src_dirs=[])


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
    h = find_headers(R, host=HostPaths(tmp_path), **own(tmp_path))
    tree = Path(h.path)
    # A tree left by an interrupted build or an older version: no stamp, missing files.
    (tree / ".nodetune-tree").unlink()
    (tree / "include/generated/autoconf.h").unlink()
    h = find_headers(R, host=HostPaths(tmp_path), **own(tmp_path))
    assert Path(h.path, "include/generated/autoconf.h").read_text() == "flavour"
    # The distribution set was upgraded in place: the stamp no longer matches, the tree is rebuilt.
    flavour = tmp_path / "usr/src/linux-headers-6.1.0-56-cloud-amd64"
    touch(flavour / "include/generated/new.h", "new")
    os.utime(flavour, ns=(1, 1))
    h = find_headers(R, host=HostPaths(tmp_path), **own(tmp_path))
    assert Path(h.path, "include/generated/new.h").read_text() == "new"
    assert cached(cache) == ["distribution-6.1.0-56-cloud-amd64"]


def test_the_images_header_sets_are_read_from_the_directory_given(tmp_path: Path) -> None:
    """Inside a container (host root not /) the image's own /usr/src is searched too: here the
    test's directory, never the machine's; None searches the host's alone."""
    host = tmp_path / "host"
    debian_headers(host, "6.1.0-40")
    debian_headers(tmp_path / "image", "6.1.0-56")  # the image's set is newer: it wins
    h = find_headers(R, host=HostPaths(host), **own(tmp_path))
    assert (h.origin, h.release, h.exact) == ("distribution", "6.1.0-56-cloud-amd64", False)
    assert Path(h.path, "include/linux/sched.h").resolve().is_relative_to(tmp_path / "image")
    h = find_headers(R, host=HostPaths(host), **own(tmp_path, image_src=None))
    assert h.release == "6.1.0-40-cloud-amd64"
    with pytest.raises(HeadersNotFound) as e:
        find_headers(R, host=HostPaths(tmp_path / "empty"), **own(tmp_path, image_src=None))
    assert str(e.value).endswith(f"under {tmp_path / 'empty/usr/src'}")


# A builder stopped halfway: its tree partly linked, no stamp, not renamed; prints the temporary
# tree's path and waits to be killed. Distribution sets from the test's own directory only.
HALFWAY_BUILDER = """
import signal, sys
from pathlib import Path
import probes.headers as headers
from host.paths import HostPaths

link_all = headers._link_all

def halfway(sources, tmp):
    link_all(sources, tmp)
    print(tmp, flush=True)
    signal.pause()

headers._link_all = halfway
release, host, cache = sys.argv[1:]
headers.find_headers(release, host=HostPaths(Path(host)), cache_dir=Path(cache), src_dirs=[Path(host, "usr/src")])
"""


def test_temporary_trees_of_killed_builds_are_removed_at_start_but_not_a_live_ones(tmp_path: Path) -> None:
    """Two builders SIGKILLed midway, and a tree left by an older version killed the same way
    (``<tree>.XXXXXXXX``), are removed by the next start; while a third builder lives, its
    temporary tree and theirs are left alone, and headers are still found."""
    debian_headers(tmp_path)
    cache = tmp_path / "cache"
    builders: list[subprocess.Popen[str]] = []

    def halfway() -> tuple[subprocess.Popen[str], Path]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HALFWAY_BUILDER, R, str(tmp_path), str(cache)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        builders.append(proc)
        line = proc.stdout.readline().strip()
        assert line, f"builder exited {proc.wait()} before halfway"
        return proc, Path(line)

    try:
        live, building = halfway()  # first: with it alive, the others' starts tidy nothing
        leftovers = []
        for _ in range(2):
            proc, tmp = halfway()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            leftovers.append(tmp)
        old = cache / "headers/distribution-6.1.0-56-cloud-amd64.k3j9x0qa"  # an older version's
        touch(old / "include/linux/sched.h", "half")
        leftovers.append(old)
        assert all(t.is_dir() and not (t / STAMP).exists() for t in [*leftovers, building])

        h = find_headers(R, host=HostPaths(tmp_path), **own(tmp_path))  # a start while one builds
        assert Path(h.path, "include/generated/autoconf.h").read_text() == "flavour"
        assert all(t.is_dir() for t in [*leftovers, building])

        live.send_signal(signal.SIGKILL)
        live.wait()
        again = find_headers(R, host=HostPaths(tmp_path), **own(tmp_path))  # a start with nobody building
        assert again == h
        assert cached(cache) == ["distribution-6.1.0-56-cloud-amd64"]
        assert Path(h.path, "include/generated/autoconf.h").read_text() == "flavour"
    finally:
        for proc in builders:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_cache_keeps_the_most_recently_used_trees(tmp_path: Path) -> None:
    """One tree per release asked for (each has its exact set); beyond ``keep_trees`` the least
    recently used go, and the tree being used always stays."""
    versions = ("6.1.0-40", "6.1.0-41", "6.1.0-42", "6.1.0-43")
    for v in versions:
        debian_headers(tmp_path, v)

    def use(v: str, keep: int) -> Path:
        h = find_headers(f"{v}-cloud-amd64", host=HostPaths(tmp_path), **own(tmp_path, keep_trees=keep))
        assert h.exact and Path(h.path, "include/generated/autoconf.h").read_text() == "flavour"
        return Path(h.path)

    trees = {v: use(v, keep=3) for v in versions[:3]}
    assert cached(tmp_path / "cache") == [f"distribution-{v}-cloud-amd64" for v in versions[:3]]
    for age, v in enumerate(versions[:3]):  # last used long ago, 40 first (timestamps are coarse)
        os.utime(trees[v] / STAMP, ns=(10**9 * (age + 1),) * 2)
    use("6.1.0-40", keep=3)  # used again: now the most recent
    use("6.1.0-43", keep=2)
    assert cached(tmp_path / "cache") == ["distribution-6.1.0-40-cloud-amd64", "distribution-6.1.0-43-cloud-amd64"]
    use("6.1.0-43", keep=1)
    assert cached(tmp_path / "cache") == ["distribution-6.1.0-43-cloud-amd64"]
    with pytest.raises(ValueError, match="keep_trees"):
        use("6.1.0-43", keep=0)
    assert not any(p.name.startswith(BUILDING) for p in (tmp_path / "cache/headers").iterdir())
