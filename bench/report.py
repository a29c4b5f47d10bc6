"""Summaries of benchmark runs: medians per contender, target ratios, agreement, markdown."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import median

MIB = 1 << 20
# (row label, contender, metric) in table order; rows whose runs lack the metric are left out.
ROWS = [
    ("hermesd (load+forward)", "hermesd", "total_s"), ("hermesd (forward)", "hermesd", "forward_s"),
    ("hermesd (forward, warm process)", "hermesd", "warm_forward_s"),
    ("hermesd-k2 (forward)", "hermesd-k2", "forward_s"),
    ("hermesd-k2 (forward, warm process)", "hermesd-k2", "warm_forward_s"),
    ("hermesd-k0 (load+forward)", "hermesd-k0", "total_s"), ("hermesd-k0 (forward)", "hermesd-k0", "forward_s"),
    ("hermesd-k0 (forward, warm process)", "hermesd-k0", "warm_forward_s"),
    ("standard (load+forward)", "standard", "total_s"), ("standard (forward)", "standard", "forward_s"),
    ("accelerate (load+forward)", "accelerate", "total_s"), ("accelerate (forward)", "accelerate", "forward_s"),
    ("io-only (read all stages)", "io-only", "total_s"),
    ("compute-only (first forward, resident)", "compute-only", "first_forward_s"),
    ("compute-only (forward, warm process)", "compute-only", "forward_s"),
]


@dataclass(frozen=True)
class Ratio:
    """One target ratio: ``value`` compared with ``target`` by ``op`` (``<=`` or ``>=``)."""

    label: str
    value: float | None
    op: str
    target: float

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        met = self.value <= self.target if self.op == "<=" else self.value >= self.target
        return "PASS" if met else "MISS"

    def line(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.3f}"
        return f"- {self.label} = {shown} (target {self.op} {self.target:g}): {self.verdict}"


def _ok_runs(runs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in runs if r.get("name") == name and r.get("ok")]


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per contender: runs, failures, and median/min/max of each timing, median peak RSS."""
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        ok = _ok_runs(runs, name)
        entry: dict[str, Any] = {"runs": len(ok), "failed": sum(1 for r in runs if r.get("name") == name) - len(ok)}
        for metric in ("total_s", "forward_s", "warm_forward_s", "first_forward_s", "load_s"):
            values = [r[metric] for r in ok if metric in r]
            if values:
                entry[metric] = {"median": median(values), "min": min(values), "max": max(values)}
        entry["peak_rss_bytes"] = median(r["peak_rss_bytes"] for r in ok)
        summary[name] = entry
    return summary


def _med(summary: dict[str, dict[str, Any]], name: str, metric: str) -> float | None:
    return summary.get(name, {}).get(metric, {}).get("median")


def _bound(io: float | None, compute: float | None) -> float | None:
    return max(io, compute) if io is not None and compute is not None else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(summary: dict[str, dict[str, Any]]) -> list[Ratio]:
    """The benchmark's target ratios from the medians (None where a contender is missing)."""
    io = _med(summary, "io-only", "total_s")
    fresh = _bound(io, _med(summary, "compute-only", "first_forward_s"))
    warm = _bound(io, _med(summary, "compute-only", "forward_s"))
    h_total = _med(summary, "hermesd", "total_s")
    peak_h = summary.get("hermesd", {}).get("peak_rss_bytes")
    peak_s = summary.get("standard", {}).get("peak_rss_bytes")
    return [
        Ratio("hermesd forward / max(io-only, compute-only), fresh process",
              _div(_med(summary, "hermesd", "forward_s"), fresh), "<=", 1.10),
        Ratio("hermesd forward / max(io-only, compute-only), warm process",
              _div(_med(summary, "hermesd", "warm_forward_s"), warm), "<=", 1.10),
        Ratio("accelerate / hermesd (load+forward)", _div(_med(summary, "accelerate", "total_s"), h_total), ">=", 3),
        Ratio("standard / hermesd (load+forward)", _div(_med(summary, "standard", "total_s"), h_total), ">=", 2),
        Ratio("peak RSS hermesd / standard", _div(peak_h, peak_s), "<=", 0.15),
    ]


def agreement(runs: list[dict[str, Any]], reference: str = "standard", atol: float = 1e-4) -> dict[str, Any]:
    """Max |difference| of each contender's last-position logits from the reference's, same round."""
    refs = {r["round"]: r["logits_file"] for r in _ok_runs(runs, reference) if r.get("logits_file")}
    result: dict[str, Any] = {"reference": reference, "atol": atol, "by_contender": {}}
    for run in runs:
        if not run.get("ok") or not run.get("logits_file") or run["name"] == reference or run["round"] not in refs:
            continue
        ref = np.load(refs[run["round"]], allow_pickle=False)
        got = np.load(run["logits_file"], allow_pickle=False)
        entry = result["by_contender"].setdefault(run["name"], {"max_abs_diff": 0.0, "allclose": True, "rounds": 0})
        entry["max_abs_diff"] = max(entry["max_abs_diff"], float(np.abs(ref - got).max()))
        entry["allclose"] = entry["allclose"] and bool(np.allclose(got, ref, atol=atol))
        entry["rounds"] += 1
    return result


def table(summary: dict[str, dict[str, Any]]) -> str:
    """The markdown table: one row per contender and timing, with medians over rounds."""
    lines = ["| contender | median s | min | max | peak RSS MiB | runs ok/failed |", "|---|---:|---:|---:|---:|---|"]
    for label, name, metric in ROWS:
        entry = summary.get(name, {})
        stats, peak = entry.get(metric), entry.get("peak_rss_bytes")
        if stats is not None:
            peak_text = f"{peak / MIB:,.0f}" if peak else "-"
            lines.append(f"| {label} | {stats['median']:.2f} | {stats['min']:.2f} | {stats['max']:.2f} | "
                         f"{peak_text} | {entry['runs']}/{entry['failed']} |")
    for name, entry in summary.items():
        if entry["runs"] == 0:
            lines.append(f"| {name} | failed | | | | 0/{entry['failed']} |")
    return "\n".join(lines)


def agreement_line(agree: dict[str, Any]) -> str:
    """One line on whether outputs match the reference."""
    parts = [f"{name}: max|diff| {e['max_abs_diff']:.2e} {'OK' if e['allclose'] else 'DIFFERS'}"
             for name, e in sorted(agree["by_contender"].items())]
    return f"- last-position logits vs {agree['reference']} (atol {agree['atol']:g}): " + ("; ".join(parts) or "n/a")


def markdown(title: str, summary: dict[str, dict[str, Any]], ratio_list: list[Ratio], agree: dict[str, Any],
             facts: dict[str, Any], notes: list[str]) -> str:
    """The full report: machine facts, table, ratios, agreement and notes."""
    versions = ", ".join(f"{k} {v}" for k, v in facts["versions"].items() if v)
    head = [f"# {title}", "", f"- date: {facts['date']}", f"- CPU: {facts['cpu_model']}, {facts['cores']} cores "
            f"({facts['cores_usable']} usable), {facts['mem_total_gib']} GiB RAM, kernel {facts['kernel']}",
            f"- versions: python {facts['python']}, {versions}", *[f"- {n}" for n in notes], ""]
    body = [table(summary), "", "Ratios (medians):", *[r.line() for r in ratio_list], agreement_line(agree)]
    return "\n".join(head + body) + "\n"


def write_markdown(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
