"""A stock Debian kernel booted under qemu, running a command on this machine's own file system.

For the attach strategies this machine's kernel refuses (fentry/fexit programs get EPERM, and it
has no kprobes): tests that need them run inside a guest booted from Debian's generic
``linux-image-<abi>-amd64``, whose ``CONFIG_KPROBES``, ``CONFIG_DEBUG_INFO_BTF`` and
``CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS`` make both work.

How the guest is made (nothing of the host is changed):

- the kernel package is downloaded (``apt-get download``) and unpacked into the cache directory
  (``CACHE``), with ``depmod`` run there; its headers are the Debian package
  ``linux-headers-<abi>-amd64``, installed by ``scripts/bootstrap.sh test``;
- a small initramfs (busybox and the modules needed to reach the root: virtio-pci, 9p, overlay)
  mounts this machine's ``/`` read-only over virtio-9p, puts a tmpfs overlay on it (the guest
  writes only there) and switches to it;
- the command runs in the repository with the guest's own /proc, /sys, cgroup2, bpffs and
  loopback; its output and exit status come back through a second, writable 9p share (a
  temporary directory). Software emulation (``accelerator()`` says why not KVM).

``python -m tests.kernel_vm [--accel=icount|tcg-native] [--cpus=N] -- <command>`` runs a command
by hand (as root; ``make bench-guest`` runs the connect cost bench this way, ``make
bench-seed-guest`` seed 000 on native spinlocks); ``--prepare`` only downloads and unpacks the
kernel (``scripts/bootstrap.sh test`` does, so tests need no network).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NODETUNE_VM_CACHE", "/var/cache/nodetune-test/kernels"))
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
# Modules the initramfs loads, in this order, to mount the host's root (Debian builds them as
# modules; their dependencies come first, read from modules.dep).
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")


class VMUnavailable(Exception):
    """The guest cannot be made here (a package or qemu missing); says what to install."""


@dataclass(frozen=True)
class GuestKernel:
    release: str  # e.g. 6.1.0-56-amd64
    root: Path  # the unpacked package: boot/vmlinuz-<release>, lib/modules/<release>

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def generic_headers_release(usr_src: Path = Path("/usr/src")) -> str:
    """The newest ``linux-headers-<abi>-amd64`` installed: the guest runs that release, so that
    BCC in the guest compiles against matching headers (``/lib/modules/<release>/build``)."""
    pattern = re.compile(r"linux-headers-(\d[\w.]*-\d+-amd64)")  # not -cloud-amd64: it has no 9p
    found = [m.group(1) for p in usr_src.glob("linux-headers-*-amd64") if (m := pattern.fullmatch(p.name))]
    if not found:
        raise VMUnavailable("no linux-headers-<abi>-amd64 in /usr/src (scripts/bootstrap.sh test installs it)")
    return max(found, key=lambda r: [int(x) for x in re.findall(r"\d+", r)])


def guest_kernel(release: str | None = None, cache: Path = CACHE) -> GuestKernel:
    """The unpacked kernel package of ``release``, downloaded and unpacked once into ``cache``."""
    release = release or generic_headers_release()
    kernel = GuestKernel(release, cache / release)
    if (kernel.modules / "modules.dep").is_file() and kernel.vmlinuz.is_file():
        return kernel
    for tool in ("apt-get", "dpkg-deb", "depmod"):
        if shutil.which(tool) is None:
            raise VMUnavailable(f"{tool} not found (scripts/bootstrap.sh test installs kmod)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        package = f"linux-image-{release}"
        got = subprocess.run(["apt-get", "download", "-q", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if got.returncode != 0 or not debs:
            raise VMUnavailable(f"apt-get download {package} failed: {got.stderr.strip()[-300:]}")
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        subprocess.run(["depmod", "-b", str(unpacked), release], check=True)
        if kernel.root.exists():
            shutil.rmtree(kernel.root)
        unpacked.rename(kernel.root)  # whole or not at all
    return kernel


def module_load_order(modules: Path, wanted: tuple[str, ...]) -> list[str]:
    """Paths (relative to ``modules``) of ``wanted`` modules and their dependencies, each after
    what it depends on, from ``modules.dep`` ("path: dep dep ..." with the deepest last)."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name.replace("-", "_") not in by_name:
            raise VMUnavailable(f"module {name} not in {modules}")
        visit(by_name[name.replace("-", "_")])
    return order


INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m || echo "initramfs: insmod $m failed"; done
mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288 hostroot /lower || exec sh
mount -t tmpfs -o size=4g tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || exec sh
mkdir -p /newroot/run/vm-out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 vmout /newroot/run/vm-out
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh /run/vm-out/guest.sh
"""

GUEST = """set -u
exec >/run/vm-out/output 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
# No tmpfs on /tmp: the repository may live there (a CI clone); the overlay keeps writes in RAM.
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
# The kernel's own modules (the host's /lib/modules has only the headers' build/source links).
mkdir -p /lib/modules/{release}
for f in {modules}/*; do ln -sfn "$f" /lib/modules/{release}/; done
hostname nodetune-vm
ulimit -n 65536  # init starts with 1024; tests hold thousands of sockets, as on the host
ip link set lo up
echo 1 >/proc/sys/kernel/sysrq
cd {cwd}
echo "guest: $(uname -r), $(nproc) CPUs"
env -i {env} /bin/sh -c {command}
echo $? >/run/vm-out/rc
sync
echo o >/proc/sysrq-trigger
"""


def build_initramfs(kernel: GuestKernel, dest: Path) -> None:
    """A gzip'd newc cpio with busybox, INIT and the modules that reach the root."""
    if not BUSYBOX.is_file():
        raise VMUnavailable(f"{BUSYBOX} not found (scripts/bootstrap.sh test installs busybox-static)")
    order = module_load_order(kernel.modules, ROOT_MODULES)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "modules"):
            (root / d).mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        for rel in order:
            target = root / "modules" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(kernel.modules / rel, target)
        (root / "modules.order").write_text("\n".join(order) + "\n")
        names = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names.encode(), capture_output=True, check=True
        ).stdout
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1) as gz:
        gz.write(cpio)
    dest.write_bytes(buf.getvalue())


ACCELERATORS = ("tcg", "tcg-native", "icount", "kvm")


def accelerator(mode: str = "tcg") -> list[str]:
    """qemu's accelerator flags.

    - ``tcg`` (the tests): multi-threaded software emulation.
    - ``tcg-native``: the same, with the CPUID hypervisor bit cleared (``-cpu max,-hypervisor``),
      so that the guest locks as on bare metal. Under ``tcg`` it is a guest without PV spinlocks
      (no KVM to ask), and x86 then takes spinlocks with ``virt_spin_lock()``'s test-and-set loop
      (arch/x86/include/asm/qspinlock.h), which returns before ``queued_spin_lock_slowpath()``
      reaches its ``contention_begin`` tracepoint: no spinlock contention is seen at all.
    - ``icount`` (cost measurements): single-threaded emulation whose clock is the count of
      guest instructions, 1 ns each (``-icount shift=0``). Host load no longer moves the
      guest's timings, so a throughput ratio is a ratio of instructions executed: stable to a
      fraction of a per cent, blind to cache misses and to what an instruction costs. One CPU:
      with two, the guest hangs bringing up the second ("x86: Booting SMP configuration").
    - ``kvm``: opt-in. These machines' ``/dev/kvm`` is ``kvm_pvm`` (Pagetable-based Virtual
      Machine, no VT-x/SVM: ``/sys/module/kvm_pvm``), which runs only kernels built as PVM
      guests; a stock kernel hangs right after its real-mode setup ("Probing EDD ... ok"), and
      ``-cpu host`` fails on MSR 0x10a."""
    if mode == "kvm":
        return ["-enable-kvm", "-cpu", "host,-arch-capabilities"]
    if mode == "icount":
        return ["-accel", "tcg,thread=single", "-icount", "shift=0,sleep=on", "-cpu", "max"]
    if mode == "tcg":
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]
    if mode == "tcg-native":
        return ["-accel", "tcg,thread=multi", "-cpu", "max,-hypervisor"]
    raise ValueError(f"accelerator {mode!r}: one of {', '.join(ACCELERATORS)}")


def _die_with_parent() -> None:
    """In qemu's child before exec: SIGKILL when the parent dies (PR_SET_PDEATHSIG, prctl(2)), so
    an interrupted test run or a killed ``python -m tests.kernel_vm`` leaves no guest running."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


@dataclass
class GuestResult:
    returncode: int | None  # None: the guest never reported (crashed, timed out)
    output: str  # what the command printed
    console: str  # the kernel's console (boot messages, panics)


def run_in_guest(
    command: str,
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
    memory_mb: int = 3072,
    cpus: int = 2,
    kernel: GuestKernel | None = None,
    accel: str = "tcg",
) -> GuestResult:
    """Boot the guest, run ``command`` (sh syntax) in the repository, power off."""
    if shutil.which(QEMU) is None:
        raise VMUnavailable(f"{QEMU} not found (scripts/bootstrap.sh test installs qemu-system-x86)")
    kernel = kernel or guest_kernel()
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="nodetune-vm-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        initrd = Path(tmp) / "initrd.gz"
        build_initramfs(kernel, initrd)
        (out / "guest.sh").write_text(
            GUEST.format(
                release=kernel.release,
                modules=shlex.quote(str(kernel.modules)),
                cwd=shlex.quote(str(REPO)),
                env=" ".join(shlex.quote(f"{k}={v}") for k, v in env.items()),
                command=shlex.quote(command),
            )
        )
        argv = [
            QEMU, *accelerator(accel), "-m", str(memory_mb), "-smp", str(1 if accel == "icount" else cpus),
            "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init",
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={out},mount_tag=vmout,security_model=none",
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, preexec_fn=_die_with_parent
            )
            console = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired as e:  # qemu is killed by subprocess.run
            console = (e.stdout or b"").decode(errors="replace") + "\n[timed out]"
        rc_file, output = out / "rc", out / "output"
        return GuestResult(
            int(rc_file.read_text()) if rc_file.is_file() else None,
            output.read_text(errors="replace") if output.is_file() else "",
            console,
        )


def main(argv: list[str]) -> int:
    if argv == ["--prepare"]:  # scripts/bootstrap.sh test: download and unpack the kernel only
        kernel = guest_kernel()
        print(f"stock-kernel guest: {kernel.vmlinuz}")
        return 0
    accel, cpus = "tcg", 2
    while argv[:1] and argv[0].startswith("--") and argv[0] != "--":
        option, _, value = argv[0].partition("=")
        if option == "--accel":
            accel = value
            accelerator(accel)  # a bad name is refused before anything boots
        elif option == "--cpus" and value.isdigit() and int(value) >= 1:
            cpus = int(value)
        else:
            raise SystemExit(f"unknown or bad option {argv[0]!r}: --accel=MODE, --cpus=N, then -- command")
        argv = argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    command = " ".join(shlex.quote(a) for a in argv) or "uname -a"
    result = run_in_guest(command, accel=accel, cpus=cpus, timeout=7200)
    sys.stdout.write(result.output)
    if result.returncode is None:
        sys.stdout.write(result.console[-4000:])
        return 1
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
