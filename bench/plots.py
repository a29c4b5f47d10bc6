"""PNG plots of suite results (matplotlib is optional: ``pip install -e .[bench]``).

1. latency vs memory cap per contender (failed runs marked with an x at the top);
2. the timeline of one hermesd run: per stage, when its load ran and when its compute ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

MIB = 1 << 20
COLORS = {"hermesd": "tab:blue", "hermesd-k0": "tab:cyan", "standard": "tab:red", "accelerate": "tab:orange",
          "airllm": "tab:purple"}


def available() -> str | None:
    """None when matplotlib can be imported, else the reason plots are skipped."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install -e .[bench]); plots skipped"
    return None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_vs_budget(points: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """``points``: dicts with contender, cap_bytes, latency_s (None: the run failed). One line per contender."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    names = list(dict.fromkeys(p["contender"] for p in points))
    ok_latencies = [p["latency_s"] for p in points if p["latency_s"] is not None]
    top = max(ok_latencies, default=1.0) * 1.1
    for name in names:
        mine = sorted((p for p in points if p["contender"] == name), key=lambda p: p["cap_bytes"])
        good = [(p["cap_bytes"] / MIB, p["latency_s"]) for p in mine if p["latency_s"] is not None]
        bad = [p["cap_bytes"] / MIB for p in mine if p["latency_s"] is None]
        color = COLORS.get(name)
        if good:
            ax.plot(*zip(*good), marker="o", label=name, color=color)
        if bad:
            ax.scatter(bad, [top] * len(bad), marker="x", color=color, label=f"{name} failed" if not good else None)
    caps = sorted({p["cap_bytes"] / MIB for p in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(caps, [f"{c:,.0f}" for c in caps])
    ax.minorticks_off()
    ax.set_xlabel("memory cap (MiB, cgroup; log scale)")
    ax.set_ylabel("load + run, seconds (median)")
    ax.set_ylim(0, top * 1.05)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def timeline(events: Sequence[Sequence[Any]], path: Path, title: str, max_stages: int = 60) -> Path:
    """``events``: (stage, "load"|"compute", t0, t1) from ``stats.to_dict(timeline=True)``.

    Each stage gets one row: its load (light bar, upper half) and compute (dark bar, lower half).
    Only the first pass over the stages is drawn when a run passes many times (generate).
    """
    plt = _pyplot()
    order: list[str] = []
    for stage, _, _, _ in events:
        if stage not in order:
            order.append(stage)
    order = order[:max_stages]
    row = {stage: i for i, stage in enumerate(order)}
    seen: dict[tuple[str, str], int] = {}
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=100)
    for stage, kind, t0, t1 in events:
        if stage not in row:
            continue
        count = seen[(stage, kind)] = seen.get((stage, kind), 0) + 1
        if count > 1:  # a later pass of generate: the first pass shows the pipeline
            continue
        y = row[stage] + (0.0 if kind == "load" else 0.45)
        ax.broken_barh([(t0, max(t1 - t0, 1e-4))], (y, 0.45),
                       facecolors="tab:orange" if kind == "load" else "tab:blue")
    ax.set_ylim(len(order), 0)
    ax.set_yticks([i + 0.45 for i in range(0, len(order), max(1, len(order) // 12))])
    ax.set_yticklabels([order[i] for i in range(0, len(order), max(1, len(order) // 12))], fontsize=7)
    ax.set_xlabel("seconds since the run started")
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:orange"), plt.Rectangle((0, 0), 1, 1, color="tab:blue")],
              labels=["load (loader thread)", "compute"], fontsize=8, loc="lower left")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
