"""Kernel header discovery for BCC, which compiles every probe against a kernel header tree.

Order of preference (first that exists wins):

1. the host's own headers: ``<host>/lib/modules/<release>/build`` (and ``source`` when the
   distribution splits them, as Debian does: build = arch part, source = common part);
2. the kernel's built-in archive ``/sys/kernel/kheaders.tar.xz`` (``CONFIG_IKHEADERS``),
   extracted once into the private cache;
3. a distribution header set for another release (``/usr/src/linux-headers-<ver>-common`` plus
   ``-<flavour>``), merged into one private tree of symlinks. The host's ``/usr/src`` is searched,
   and, when the host is mounted elsewhere (the agent in a container), the image's own ``/usr/src``
   (``image_src``): headers baked into the agent's image.

Where the tree is not where BCC looks by itself, it is named by ``BCC_KERNEL_SOURCE``, which BCC
reads on every compile (src/cc/frontends/clang/loader.cc). Nothing is ever written under
``/lib/modules``: trees we build live in the cache directory, made in a temporary directory and
renamed into place so that a half-built tree is never used. A mismatched set (case 3) is only safe
for programs that read tracepoint fields, helpers and BTF-derived offsets — which is all ours do.

The cache (``<cache_dir>/headers``) tidies itself when headers are looked for (once per agent
start). Every process that builds a tree holds a shared ``flock(2)`` on ``headers/.lock`` from the
temporary directory's creation to its rename; the kernel drops it when the process dies, SIGKILL
included. A process that gets the lock exclusively (without waiting) therefore knows that nobody is
building: it removes every entry that is not a finished tree (temporary trees of killed builds,
under their old ``<tree>.XXXXXXXX`` names too, and trees set aside to be removed), then keeps the
``keep_trees`` most recently used finished trees (the one it is about to use always among them) and
removes the others. If the lock is held, it tidies nothing: a later start will. A tree's last use
is its stamp's modification time, touched at every use.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from host.paths import HostPaths

# BCC uses only these subtrees (include paths in src/cc/frontends/clang/kbuild_helper.cc).
_TREES = ("include", "arch")
IMAGE_SRC = Path("/usr/src")  # the agent image's own header sets (used when the host is mounted elsewhere)
KEEP_TREES = 3  # finished trees kept in the cache (each up to ~60 MB and 16,000 entries)
LOCK = ".lock"  # headers/.lock: shared while building, exclusive while tidying
BUILDING = ".building."  # prefix of a tree being built: <BUILDING><tree>.XXXXXXXX
STALE = ".stale."  # prefix of a tree set aside to be removed
LOCK_WAIT = 300.0  # s to wait for another process's tidy (3 leftovers of 16,447 entries: 3 to 21 s here)


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

    A half-built tree is never visible; if another process won the race its tree is kept. The
    caller holds the cache lock shared (``_cache_lock``), so the temporary tree is not tidied away.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=BUILDING + dest.name + ".", dir=dest.parent))
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


def _discard(path: Path) -> None:
    """Remove ``path``: first renamed aside (atomic), so that a removal cut short never leaves a
    tree that still has its stamp but lacks files."""
    if path.is_dir() and not path.is_symlink() and not path.name.startswith(STALE):
        aside = Path(tempfile.mkdtemp(prefix=STALE + path.name + ".", dir=path.parent))
        os.rename(path, aside / "tree")
        path = aside
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# Temporary trees of versions before BUILDING: <tree>.XXXXXXXX (tempfile.mkdtemp's 8 characters).
# A release's last dot-separated part holds a "-" (6.1.0-57-amd64), so no finished tree matches.
OLD_TEMPORARY = re.compile(r"^(host|kheaders|distribution)-.+\.[a-z0-9_]{8}$")


def _finished(path: Path) -> bool:
    """A tree find_headers() built and may use: stamped (the stamp is written last) and named as
    a tree, not as a temporary one (a build killed between its stamp and its rename)."""
    name = path.name
    if name.startswith((BUILDING, STALE)) or OLD_TEMPORARY.match(name):
        return False
    return not path.is_symlink() and (path / STAMP).is_file()


def _last_use(tree: Path) -> int:
    try:
        return (tree / STAMP).stat().st_mtime_ns
    except OSError:
        return 0


def _tidy(headers: Path, current: str | None, keep: int) -> None:
    """Remove what is not a finished tree, and finished trees beyond the ``keep`` most recently
    used (``current``, the one about to be used, is always kept). Only with the lock exclusive."""
    trees = []
    for entry in headers.iterdir():
        if entry.name == LOCK:
            continue
        if _finished(entry):
            trees.append(entry)
            continue
        # A build killed midway (<BUILDING>…, or <tree>.XXXXXXXX before), a removal cut short. A
        # failure here is tried again at the next start, never a reason to fail the headers.
        with suppress(OSError):
            _discard(entry)
    others = sorted((t for t in trees if t.name != current), key=_last_use, reverse=True)
    for tree in others[max(keep - (current is not None), 0) :]:
        with suppress(OSError):
            _discard(tree)


@contextmanager
def _cache_lock(headers: Path, current: str | None, keep: int, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold ``headers/.lock`` shared for the body (trees may be built), after tidying the cache if
    nobody else holds it (see the module docstring)."""
    fd = None
    with suppress(OSError):  # a read-only cache: nothing can be built or tidied; a finished tree is still used
        headers.mkdir(parents=True, exist_ok=True)
        fd = os.open(headers / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # someone is building (or tidying): leave the cache as it is
        else:
            _tidy(headers, current, keep)
        # Shared from here (a conversion may let a tidy of another process in between: harmless,
        # ours is done). A tidy holds it exclusively for as long as a few removals take.
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HeadersNotFound(f"{headers / LOCK}: held exclusively for over {wait:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _identity(sources: list[Path]) -> str:
    """What a built tree depends on: each source's real path and modification time (a package
    upgrade replaces the directories, so their mtimes change)."""
    lines = []
    for src in sources:
        st = os.stat(src)
        lines.append(f"{os.path.realpath(src)} {st.st_mtime_ns} {st.st_size}")
    return "\n".join(lines) + "\n"


def _ensure_tree(dest: Path, sources: list[Path], build: Callable[[Path], None], keep: int = KEEP_TREES) -> None:
    """Build ``dest`` unless it exists with a stamp matching ``sources``. A tree without a stamp
    (left by an older version or an interrupted build) or with a stale one is moved aside, removed
    and rebuilt. The cache is tidied first (``_cache_lock``); a tree used as it is gets its stamp
    touched (its last use, for the tidy)."""
    identity = _identity(sources)
    with _cache_lock(dest.parent, dest.name, keep):
        stamp = dest / STAMP
        try:
            if stamp.read_text() == identity:
                with suppress(OSError):  # a read-only cache: still usable, only its tidy order suffers
                    os.utime(stamp)
                return
        except OSError:
            pass
        if dest.exists() or dest.is_symlink():
            _discard(dest)

        def build_and_stamp(tmp: Path) -> None:
            build(tmp)
            (tmp / STAMP).write_text(identity)

        _build_atomically(dest, build_and_stamp)


def _merge_trees(sources: list[Path], dest: Path, keep: int = KEEP_TREES) -> None:
    """Build ``dest`` as a tree of symlinks to the files of ``sources`` (later ones win).

    The equivalent of ``cp -as a/. b/. dest`` done in-process, limited to include/ and arch/.
    """
    _ensure_tree(dest, sources, lambda tmp: _link_all(sources, tmp), keep)


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


def _extract_kheaders(archive: Path, dest: Path, keep: int = KEEP_TREES) -> None:
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

    _ensure_tree(dest, [archive], extract, keep)


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
    host: HostPaths | None = None,
    cache_dir: Path = Path("/var/cache/nodetune"),
    src_dirs: list[Path] | None = None,
    image_src: Path | None = IMAGE_SRC,
    keep_trees: int = KEEP_TREES,
) -> KernelHeaders:
    """Find (or build in ``cache_dir``) a header tree for ``release``; see the module docstring.

    ``host``: the host's files (default: this machine's ``/``). ``src_dirs``: where distribution
    header sets are searched; by default the host's ``/usr/src`` and, when the host root is not
    ``/``, ``image_src`` (None: not searched). ``keep_trees``: finished trees the cache keeps (at
    least 1)."""
    if keep_trees < 1:
        raise ValueError(f"keep_trees must be at least 1, got {keep_trees}")
    host = host or HostPaths()
    host_root = host.root
    headers = Path(cache_dir) / "headers"
    modules = f"/lib/modules/{release}"
    build = resolve_in_root(host_root, modules + "/build")
    source = resolve_in_root(host_root, modules + "/source")
    in_place = None
    if build.is_dir():
        if source.is_dir() and source.resolve() != build.resolve():
            if host_root.resolve() == Path("/") and (build / "include").is_dir():
                in_place = KernelHeaders("", "host", release, exact=True)  # BCC's own search handles the split
            else:
                merged = headers / f"host-{release}"
                _merge_trees([source, build], merged, keep_trees)
                return KernelHeaders(str(merged), "host", release, exact=True)
        elif _is_tree(build):
            in_place = KernelHeaders(str(build), "host", release, exact=True)
    if in_place is not None:
        if headers.is_dir():  # trees built before these headers were installed: tidied all the same
            with _cache_lock(headers, None, keep_trees):
                pass
        return in_place

    archive = host.sys / "kernel" / "kheaders.tar.xz"
    if archive.is_file():
        dest = headers / f"kheaders-{release}"
        _extract_kheaders(archive, dest, keep_trees)
        return KernelHeaders(str(dest), "kheaders", release, exact=True)

    if src_dirs is None:
        src_dirs = [host_root / "usr/src"]
        if image_src is not None and host_root.resolve() != Path("/"):
            src_dirs.append(Path(image_src))  # headers baked into the agent's image
    sets = _distribution_sets(src_dirs)
    if not sets:
        raise HeadersNotFound(
            f"no kernel headers: {modules}/build absent, {archive} absent (CONFIG_IKHEADERS), "
            f"and no linux-headers-* under {', '.join(map(str, src_dirs))}"
        )
    exact_sets = [s for s in sets if s[0] == release]
    set_release, trees = (exact_sets or sets)[0]
    dest = headers / f"distribution-{set_release}"
    _merge_trees(trees, dest, keep_trees)
    return KernelHeaders(str(dest), "distribution", set_release, exact=set_release == release)
