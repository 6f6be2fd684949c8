"""The report's plots (bench/report.py), one PNG per family, from report.json's figures:

* ``per_event.png``: BPF ns per context switch of the runqlat probe, runqlat-bpfcc and an empty
  program (median, min..max bars), per workload;
* ``ratios.png``: every per-round on/off cost ratio (agent or probe) as a box per figure, and the
  storms' bounds from the programs' own time (bpf_stats), with the 1.0 and 1.05 lines;
* ``idle.png``: RSS, scrape time and cumulative CPU of the agent and node_exporter over the idle run;
* ``scrape.png``: the scrape times at 500 pod cgroups, sorted, with the 50 and 100 ms budgets.

matplotlib (Agg, no display) is imported here only; without it no plot is drawn and the report says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render_plots(report: dict[str, Any], out: Path) -> tuple[list[str], str]:
    """Writes the plots it has figures for into ``out``; (paths, note)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib not installed (make bench-deps): no plots"
    out.mkdir(parents=True, exist_ok=True)
    by_id = {f["id"]: f for f in report["figures"]}
    paths = []
    for name, draw in (("per_event", per_event), ("ratios", ratios), ("idle", idle), ("scrape", scrape)):
        fig = draw(plt, report, by_id)
        if fig is None:
            continue
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(str(path))
    return paths, ""


def _bar(ax: Any, x: float, s: dict[str, Any], label: str, color: str) -> None:
    v = s["median"]
    ax.bar(x, v, width=0.25, color=color, label=label)
    ax.errorbar(x, v, yerr=[[v - s["min"]], [s["max"] - v]], color="black", capsize=3)


def per_event(plt: Any, report: dict[str, Any], by_id: dict[str, Any]) -> Any:
    figs = [f for f in report["figures"] if f["id"].startswith("runqlat.") and f["id"].endswith(".ns")]
    if not figs:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, f in enumerate(figs):
        parts = [("nodetune", f["summary"], "tab:blue")]
        parts += [
            (f[k]["label"], f[k]["summary"], c) for k, c in (("peer", "tab:red"), ("floor", "tab:gray")) if k in f
        ]
        for j, (label, s, color) in enumerate(parts):
            _bar(ax, i + (j - 1) * 0.27, s, label if i == 0 else "_", color)
    ax.set_xticks(range(len(figs)), [f["id"].split(".")[1] for f in figs])
    ax.set_ylabel("BPF ns per context switch (median, min..max)")
    ax.set_title("runqlat: per-event cost against runqlat-bpfcc and an empty program")
    ax.legend()
    fig.tight_layout()
    return fig


def ratios(plt: Any, report: dict[str, Any], by_id: dict[str, Any]) -> Any:
    # on/off cost ratios only (not the ratios of a figure to its peer's, e.g. runqlat / runqlat-bpfcc)
    onoff = ("workloads.", "locks.", "runqlat.pipe_throughput")
    figs = [
        f for f in report["figures"] if f["id"].startswith(onoff) and f["unit"] == "×" and len(f["values"]) > 1
    ]  # "×": not the BPF ns per operation the workloads also report
    rows: list[tuple[str, list[float]]] = []
    for f in figs:
        name = f["id"].split(".", 1)[1]
        name = name.removesuffix("_bpf")[:28] + " (bpf_stats bound)" if f.get("upper_bound") else name[:40]
        rows.append((name, f["values"]))
        if "floor" in f:
            rows.append(("  " + f["floor"]["label"][:38], f["floor"]["values"]))
        if "peer" in f:
            rows.append(("  " + f["peer"]["label"][:38], f["peer"]["values"]))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
    ax.boxplot([v for _, v in rows][::-1], vert=False, whis=(0, 100))
    ax.set_yticks(range(1, len(rows) + 1), [n for n, _ in rows][::-1], fontsize=8)
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.axvline(1.05, color="red", lw=0.8, ls="--")
    ax.set_xlabel("cost ratio per round (on/off; boxes: quartiles, whiskers: min..max)")
    ax.set_title("Workload and storm ratios, interleaved rounds")
    fig.tight_layout()
    return fig


def idle(plt: Any, report: dict[str, Any], by_id: dict[str, Any]) -> Any:
    run = report["runs"].get("idle", {})
    if not run.get("ok"):
        return None
    samples = run["raw"]["samples"]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for name, rows in samples.items():
        t = [s["t"] for s in rows]
        axes[0].plot(t, [s["rss_mib"] for s in rows], label=name)
        axes[1].plot(t, [s["scrape_s"] * 1e3 for s in rows], label=name)
        axes[2].plot(t, [s["cpu_s"] - rows[0]["cpu_s"] for s in rows], label=name)
    axes[0].axhline(150, color="red", ls="--", lw=0.8)
    axes[0].set_ylabel("RSS (MiB)")
    axes[1].set_ylabel("scrape (ms)")
    axes[2].set_ylabel("CPU since start (s)")
    axes[2].set_xlabel(f"seconds (a scrape every {run['raw']['interval_s']:.0f} s)")
    axes[0].legend()
    axes[0].set_title("Idle node: nodetune and prometheus-node-exporter")
    fig.tight_layout()
    return fig


def scrape(plt: Any, report: dict[str, Any], by_id: dict[str, Any]) -> Any:
    f = by_id.get("scrape.median")
    if f is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    values = sorted(f["values"])
    ax.plot([100 * (i + 0.5) / len(values) for i in range(len(values))], values, marker=".")
    ax.axhline(50, color="orange", ls="--", lw=0.8, label="median budget 50 ms")
    ax.axhline(100, color="red", ls="--", lw=0.8, label="p99 budget 100 ms")
    ax.set_xlabel("percentile of scrapes")
    ax.set_ylabel("scrape time (ms)")
    ax.set_title(f["label"])
    ax.legend()
    fig.tight_layout()
    return fig
