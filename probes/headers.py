"""Kernel header discovery for BCC, which compiles every probe against a kernel header tree.

Order of preference (first that exists wins):

1. the host's own headers: ``<host>/lib/modules/<release>/build`` (and ``source`` when the
   distribution splits them, as Debian does: build = arch part, source = common part);
2. the kernel's built-in archive ``/sys/kernel/kheaders.tar.xz`` (``CONFIG_IKHEADERS``),
   extracted once into the private cache;
3. a distribution header set for another release (``/usr/src/linux-headers-<ver>-common`` plus
   ``-<flavour>``), merged into one private tree of symlinks.

Where the tree is not where BCC looks by itself, it is named by ``BCC_KERNEL_SOURCE``, which BCC
reads on every compile (src/cc/frontends/clang/loader.cc). Nothing is ever written under
``/lib/modules``: trees we build live in the cache directory, made in a temporary directory and
renamed into place so that a half-built tree is never used. A mismatched set (case 3) is only safe
for programs that read tracepoint fields, helpers and BTF-derived offsets — which is all ours do.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# BCC uses only these subtrees (include paths in src/cc/frontends/clang/kbuild_helper.cc).
_TREES = ("include", "arch")


class HeadersNotFound(Exception):
    """No usable kernel header tree could be found or built."""


@dataclass(frozen=True)
class KernelHeaders:
    """A header tree BCC can compile against."""

    path: str  # directory to give BCC (BCC_KERNEL_SOURCE), "" when BCC finds it alone
    origin: str  # "host", "kheaders" or "distribution"
    release: str  # kernel release the headers were made for
    exact: bool  # headers match the running kernel

    def describe(self) -> str:
        match = "matching" if self.exact else "mismatched: tracepoint fields and BTF offsets only"
        where = self.path or f"/lib/modules/{self.release}/build"
        return f"{self.origin} headers {self.release} at {where} ({match})"

    def apply_env(self) -> None:
        """Point BCC at this tree (or leave BCC to its own search when path is empty)."""
        if self.path:
            os.environ["BCC_KERNEL_SOURCE"] = self.path
        else:
            os.environ.pop("BCC_KERNEL_SOURCE", None)


def resolve_in_root(root: Path, path: str) -> Path:
    """Resolve ``path`` as seen from inside ``root``: absolute symlinks stay inside the root.

    The host's ``/lib/modules/<r>/build`` is an absolute symlink (``/usr/src/...``), which from
    inside a container with the host mounted at ``/host`` must be read as ``/host/usr/src/...``.
    """
    root = root.resolve()
    parts = [p for p in path.split("/") if p]
    current = root
    for _ in range(64):  # symlink loop bound
        if not parts:
            return current
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            target = os.readlink(candidate)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                current = root
            continue
        current = candidate
    raise HeadersNotFound(f"too many symlinks resolving {path} under {root}")


def _is_tree(path: Path) -> bool:
    return (path / "include" / "linux").is_dir() or (path / "include" / "generated").is_dir()


def _build_atomically(dest: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(tmp)`` in a temporary sibling of ``dest`` and rename it into place.

    A half-built tree is never visible; if another process won the race its tree is kept.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        build(tmp)
        os.rename(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(e, FileExistsError) or (dest.is_dir() and e.errno == errno.ENOTEMPTY)):
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


STAMP = ".nodetune-tree"  # written last inside a built tree: what it was built from


def _identity(sources: list[Path]) -> str:
    """What a built tree depends on: each source's real path and modification time (a package
    upgrade replaces the directories, so their mtimes change)."""
    lines = []
    for src in sources:
        st = os.stat(src)
        lines.append(f"{os.path.realpath(src)} {st.st_mtime_ns} {st.st_size}")
    return "\n".join(lines) + "\n"


def _ensure_tree(dest: Path, sources: list[Path], build: Callable[[Path], None]) -> None:
    """Build ``dest`` unless it exists with a stamp matching ``sources``. A tree without a stamp
    (left by an older version or an interrupted build) or with a stale one is moved aside, removed
    and rebuilt."""
    identity = _identity(sources)
    try:
        if (dest / STAMP).read_text() == identity:
            return
    except OSError:
        pass
    if dest.exists() or dest.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=dest.name + ".stale.", dir=dest.parent))
        os.rename(dest, aside / "tree")
        shutil.rmtree(aside, ignore_errors=True)

    def build_and_stamp(tmp: Path) -> None:
        build(tmp)
        (tmp / STAMP).write_text(identity)

    _build_atomically(dest, build_and_stamp)


def _merge_trees(sources: list[Path], dest: Path) -> None:
    """Build ``dest`` as a tree of symlinks to the files of ``sources`` (later ones win).

    The equivalent of ``cp -as a/. b/. dest`` done in-process, limited to include/ and arch/.
    """
    _ensure_tree(dest, sources, lambda tmp: _link_all(sources, tmp))


def _link_all(sources: list[Path], tmp: Path) -> None:
    for src in sources:
        for top in _TREES:
            base = src / top
            if not base.is_dir():
                continue
            for dirpath, _dirnames, filenames in os.walk(base, followlinks=True):
                rel = Path(dirpath).relative_to(src)
                (tmp / rel).mkdir(parents=True, exist_ok=True)
                for name in filenames:
                    link = tmp / rel / name
                    if link.is_symlink() or link.exists():
                        link.unlink()
                    link.symlink_to(Path(dirpath, name).resolve())


def _extract_kheaders(archive: Path, dest: Path) -> None:
    def extract(tmp: Path) -> None:
        with tarfile.open(archive, "r:xz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python < 3.11.4 (Debian bookworm's 3.11.2): refuse what the data filter would
                members = tar.getmembers()
                for m in members:
                    if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                        raise HeadersNotFound(f"{archive}: unsafe member {m.name!r}")
                tar.extractall(tmp, members=members)

    _ensure_tree(dest, [archive], extract)


_VERSION_RE = re.compile(r"^linux-headers-(\d+)\.(\d+)\.(\d+)(?:-(\d+))?")


def _version_key(name: str) -> tuple[int, ...]:
    m = _VERSION_RE.match(name)
    return tuple(int(g or 0) for g in m.groups()) if m else ()


def _distribution_sets(src_dirs: list[Path]) -> list[tuple[str, list[Path]]]:
    """Header sets found under /usr/src: (release, [trees to merge, lowest priority first])."""
    found: list[tuple[str, list[Path]]] = []
    for src in src_dirs:
        if not src.is_dir():
            continue
        names = sorted(p.name for p in src.iterdir() if p.name.startswith("linux-headers-"))
        for name in names:
            tree = src / name
            if name.endswith("-common") or not tree.is_dir():
                continue
            release = name.removeprefix("linux-headers-")
            # Debian: linux-headers-6.1.0-56-cloud-amd64 needs linux-headers-6.1.0-56-common.
            m = re.match(r"^(\d+\.\d+\.\d+-\d+)-", release)
            common = src / f"linux-headers-{m.group(1)}-common" if m else None
            if common is not None and common.is_dir():
                found.append((release, [common, tree]))
            elif _is_tree(tree) and (tree / "include" / "linux").is_dir():
                found.append((release, [tree]))
    found.sort(key=lambda item: _version_key("linux-headers-" + item[0]), reverse=True)
    return found


def find_headers(
    release: str,
    host_root: Path = Path("/"),
    sys_root: Path = Path("/sys"),
    cache_dir: Path = Path("/var/cache/nodetune"),
    src_dirs: list[Path] | None = None,
) -> KernelHeaders:
    """Find (or build in ``cache_dir``) a header tree for ``release``; see the module docstring."""
    host_root = Path(host_root)
    modules = f"/lib/modules/{release}"
    build = resolve_in_root(host_root, modules + "/build")
    source = resolve_in_root(host_root, modules + "/source")
    if build.is_dir():
        if source.is_dir() and source.resolve() != build.resolve():
            if host_root.resolve() == Path("/") and (build / "include").is_dir():
                return KernelHeaders("", "host", release, exact=True)  # BCC's own search handles the split
            merged = Path(cache_dir) / "headers" / f"host-{release}"
            _merge_trees([source, build], merged)
            return KernelHeaders(str(merged), "host", release, exact=True)
        if _is_tree(build):
            return KernelHeaders(str(build), "host", release, exact=True)

    archive = Path(sys_root) / "kernel" / "kheaders.tar.xz"
    if archive.is_file():
        dest = Path(cache_dir) / "headers" / f"kheaders-{release}"
        _extract_kheaders(archive, dest)
        return KernelHeaders(str(dest), "kheaders", release, exact=True)

    if src_dirs is None:
        src_dirs = [host_root / "usr/src"]
        if host_root.resolve() != Path("/"):
            src_dirs.append(Path("/usr/src"))  # headers baked into the agent's image
    sets = _distribution_sets(src_dirs)
    if not sets:
        raise HeadersNotFound(
            f"no kernel headers: {modules}/build absent, {archive} absent (CONFIG_IKHEADERS), "
            f"and no linux-headers-* under {', '.join(map(str, src_dirs))}"
        )
    exact_sets = [s for s in sets if s[0] == release]
    set_release, trees = (exact_sets or sets)[0]
    dest = Path(cache_dir) / "headers" / f"distribution-{set_release}"
    _merge_trees(trees, dest)
    return KernelHeaders(str(dest), "distribution", set_release, exact=set_release == release)
