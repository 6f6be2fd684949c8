"""A fixture host tree for the tuning tests: the sysctl, THP and boot-id files of a host, in a
temporary directory used as ``--host-root``; ``snapshot()`` gives every file's bytes."""

from __future__ import annotations

from pathlib import Path

FILES = {
    "proc/sys/net/core/somaxconn": "4096\n",
    "proc/sys/net/core/rmem_max": "212992\n",
    "proc/sys/fs/file-max": "9223372036854775807\n",
    "proc/sys/vm/max_map_count": "65530\n",
    "proc/sys/net/ipv4/ip_local_port_range": "32768\t60999\n",
    "proc/sys/net/ipv4/tcp_max_syn_backlog": "512\n",
    "proc/sys/kernel/random/boot_id": "11111111-2222-3333-4444-555555555555\n",
    "sys/kernel/mm/transparent_hugepage/enabled": "always [madvise] never\n",
    "sys/kernel/mm/transparent_hugepage/defrag": "always defer defer+madvise [madvise] never\n",
    "proc/cmdline": "console=ttyS0 quiet\n",
    "proc/sys/kernel/osrelease": "6.18.0-test\n",
    "sys/devices/system/cpu/online": "0-1\n",
    # eth0: a virtio NIC whose MSI-X vectors belong to the PCI function above the virtio device
    "sys/devices/pci0000:00/0000:00:03.0/msi_irqs/37": "msix\n",
    "sys/devices/pci0000:00/0000:00:03.0/msi_irqs/38": "msix\n",
    "sys/devices/pci0000:00/0000:00:03.0/msi_irqs/39": "msix\n",
    "sys/devices/pci0000:00/0000:00:03.0/virtio2/vendor": "0x1af4\n",
    "proc/irq/37/smp_affinity_list": "0-1\n",
    "proc/irq/38/smp_affinity_list": "0-1\n",
    "proc/irq/39/smp_affinity_list": "0-1\n",
    "lib/modules/6.18.0-test/modules.builtin": "kernel/net/netfilter/nf_conntrack.ko\n",
}


def make_host(root: Path, **overrides: str) -> Path:
    for rel, text in {**FILES, **{k.replace("__", "/"): v for k, v in overrides.items()}}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "proc/sys/kernel/random/boot_id").chmod(0o444)
    net = root / "sys/class/net/eth0"
    net.mkdir(parents=True, exist_ok=True)
    if not (net / "device").is_symlink():
        (net / "device").symlink_to("../../../devices/pci0000:00/0000:00:03.0/virtio2")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def value(root: Path, rel: str) -> str:
    return " ".join((root / rel).read_text().split())
