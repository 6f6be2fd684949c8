"""A fixed node for the doctor's pure tests: two readings of an agent's metrics ten seconds apart,
per-CPU times and tuning facts, written out by hand (no machine data). The pattern of each seed is
in it: a Redis container throttled while its usage is low (000), an nginx pod whose namespace ran
out of ports towards one upstream (000), a listener overflowing (001, 003), softirqs on cpu0 (001),
spinning in the port search (000), THP not ``never`` (001); CPU pressure below the levels."""

from __future__ import annotations

from agent.doctor.cpu import CpuTimes
from agent.doctor.reading import Reading
from agent.doctor.tuning import KeyState, TuningFacts
from metrics.histogram import BUCKET_LE

REDIS = 'namespace="shop",pod="redis-0",container="redis",cgroup=""'
NGINX = 'namespace="shop",pod="nginx-7d9f",container="nginx",cgroup=""'
HOSTSVC = 'namespace="",pod="",container="",cgroup="/system.slice/cron.service"'
NGINX_NS = 'namespace="shop",pod="nginx-7d9f",netns=""'
HOST_NS = 'namespace="",pod="",netns="host"'


def _hist(name: str, labels: str, slots: dict[int, int]) -> list[str]:
    lines, total = [], 0
    for s, le in enumerate(BUCKET_LE):
        total += slots.get(s, 0)
        sep = "," if labels else ""
        lines.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
    lines.append(f"{name}_count{{{labels}}} {total}")
    lines.append(f"{name}_sum{{{labels}}} 0")
    return lines


def metrics(after: bool) -> str:
    k = 1 if after else 0
    lines = [
        'nodetune_build_info{version="0.0.0"} 1',
        # CFS: redis throttled in 40 of 100 periods using 0.3 of 1 core; cron 30 of 100 at its limit
        f"nodetune_cpu_cfs_periods_total{{{REDIS}}} {1000 + 100 * k}",
        f"nodetune_cpu_cfs_throttled_periods_total{{{REDIS}}} {50 + 40 * k}",
        f"nodetune_cpu_usage_seconds_total{{{REDIS}}} {500 + 3 * k}",
        f"nodetune_cpu_limit_cores{{{REDIS}}} 1",
        f"nodetune_cpu_cfs_periods_total{{{HOSTSVC}}} {10 + 100 * k}",
        f"nodetune_cpu_cfs_throttled_periods_total{{{HOSTSVC}}} {0 + 30 * k}",
        f"nodetune_cpu_usage_seconds_total{{{HOSTSVC}}} {1 + 1.9 * k}",
        f"nodetune_cpu_limit_cores{{{HOSTSVC}}} 0.2",
        # ports: nginx's namespace holds 27,500 of 28,232 towards one upstream
        f"nodetune_ephemeral_port_range_size{{{NGINX_NS}}} 28232",
        f"nodetune_ephemeral_port_range_size{{{HOST_NS}}} 54761",
        f'nodetune_ephemeral_ports_in_use{{{NGINX_NS},destination="10.0.3.7:8080"}} {27000 + 500 * k}',
        f'nodetune_ephemeral_ports_in_use{{{HOST_NS},destination="127.0.0.1:6379"}} 12',
        f"nodetune_ephemeral_port_saturation_ratio{{{NGINX_NS}}} {(27000 + 500 * k) / 28232}",
        f"nodetune_ephemeral_port_saturation_ratio{{{HOST_NS}}} {12 / 54761}",
        f"nodetune_connect_port_allocation_failures_total{{{NGINX}}} {3 + 17 * k}",
        # listen: the host's redis on :6379 overflowed 25 times, backlog 128 below somaxconn 4096
        f"nodetune_tcp_listen_overflows_total{{{HOST_NS}}} {100 + 25 * k}",
        f"nodetune_tcp_listen_drops_total{{{HOST_NS}}} {100 + 25 * k}",
        f"nodetune_tcp_listen_overflows_total{{{NGINX_NS}}} 0",
        f"nodetune_tcp_listen_drops_total{{{NGINX_NS}}} 0",
        f"nodetune_tcp_listen_queue_saturation_ratio{{{HOST_NS}}} 0.5",
        f"nodetune_tcp_listen_queue_saturation_ratio{{{NGINX_NS}}} 0",
        f'nodetune_tcp_listen_backlog{{{HOST_NS},port="6379"}} 128',
        # locks: spinning in the port search, 1.5 s of 20 s of CPU
        f'nodetune_lock_contentions_total{{lock_type="spinlock",caller="__inet_hash_connect"}} {10 + 9000 * k}',
        f'nodetune_lock_contention_wait_seconds_total{{lock_type="spinlock",caller="__inet_hash_connect"}} '
        f"{0.1 + 1.4 * k}",
        f'nodetune_lock_contentions_total{{lock_type="mutex",caller="pipe_read"}} {5 + 300 * k}',
        f'nodetune_lock_contention_wait_seconds_total{{lock_type="mutex",caller="pipe_read"}} {0.01 + 0.2 * k}',
        f'nodetune_workload_lock_wait_seconds_total{{{NGINX},lock_type="spinlock"}} {0.1 + 1.4 * k}',
    ]
    lines += _hist(
        "nodetune_lock_contention_wait_seconds",
        'lock_type="spinlock"',
        {s: v * k for s, v in {3: 2000, 4: 5000, 5: 1500, 6: 500}.items()},
    )
    lines += _hist("nodetune_lock_contention_wait_seconds", 'lock_type="mutex"', {7: 250 * k, 9: 50 * k})
    # run-queue latency: 2 % of redis's waits take 8-16 ms (p99 12 ms), nginx's few; cron too few to judge
    lines += _hist(
        "nodetune_runqueue_latency_seconds", REDIS, {s: v * k for s, v in {2: 4000, 5: 800, 10: 100, 14: 100}.items()}
    )
    lines += _hist("nodetune_runqueue_latency_seconds", NGINX, {1: 5000 * k, 4: 300 * k, 8: 10 * k})
    lines += _hist("nodetune_runqueue_latency_seconds", HOSTSVC, {0: 5 * k})
    lines += [
        'nodetune_tuning_profile_info{profile="redis-latency",mode="observe"} 1',
        "nodetune_tuning_profile_valid 1",
        'nodetune_tuning_in_sync{item="sysctl",key="net.core.somaxconn"} 1',
        'nodetune_tuning_in_sync{item="thp",key="enabled"} 0',
    ]
    return "\n".join(lines) + "\n"


def readings() -> tuple[Reading, Reading]:
    return Reading.from_text(metrics(False), 100.0), Reading.from_text(metrics(True), 110.0)


def _cpu(user: float, system: float, idle: float, softirq: float) -> dict[str, float]:
    return {"user": user, "nice": 0.0, "system": system, "idle": idle, "iowait": 0.0, "irq": 0.0,
            "softirq": softirq, "steal": 0.0}  # fmt: skip


# cpu0: 95 % softirq over the 10 s; cpu1 mostly idle (seed 001); load 1.2 on 2 CPUs
# PSI: some task waited for a CPU 1.5 s of the 10 s (15 %)
CPU_BEFORE = CpuTimes((_cpu(100, 50, 1000, 10), _cpu(100, 50, 1000, 1)), 0.9, 5_000_000, 100.0)
CPU_AFTER = CpuTimes((_cpu(100.3, 50.2, 1000, 19.5), _cpu(102, 50.5, 1007.5, 1)), 1.2, 6_500_000, 110.0)

TUNING = TuningFacts(
    profile="redis-latency",
    mode="observe",
    keys=[
        KeyState("sysctl", "net.core.somaxconn", True),
        KeyState("thp", "enabled", False, "madvise", "never"),
    ],
    thp_enabled="madvise",
    irqbalance_running=True,
)
