"""The suite's numbers: medians per contender, derived metrics, target ratios, markdown for BENCHMARKS.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.harness import median
from bench.report import Ratio


class Comparison(Ratio):
    """A ratio reported without a target (``target`` is ignored)."""

    @property
    def verdict(self) -> str:
        return "info"

    def line(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.3f}"
        return f"- {self.label} = {shown}"

MIB = 1 << 20
METRICS = ("total_s", "latency_s", "load_s", "prefill_s", "decode_s", "prefill_tokens_per_s", "decode_tokens_per_s",
           "items_per_s", "peak_rss_bytes", "cgroup_peak_bytes", "bytes_read", "streamed_bytes", "bytes_per_pass",
           "gb_per_s", "foreign_cpu_s")
START = "<!-- hermesd-bench:start -->"
END = "<!-- hermesd-bench:end -->"


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per contender: ok/failed runs, OOM kills, failure reasons and the median of every metric."""
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [r for r in runs if r.get("name") == name]
        ok = [r for r in mine if r.get("ok")]
        entry: dict[str, Any] = {"runs": len(ok), "failed": len(mine) - len(ok),
                                 "oom_kills": sum(r.get("oom_kills", 0) for r in mine),
                                 "errors": sorted({_short_error(r) for r in mine if not r.get("ok")})}
        for run in ok:  # the engine's own account of where its time went (same run, same noise)
            if isinstance(run.get("stats"), dict):
                run.setdefault("stage_wait_s", run["stats"].get("wait_s"))
                run.setdefault("stage_compute_s", run["stats"].get("compute_s"))
        for metric in METRICS + ("stage_wait_s", "stage_compute_s"):
            values = [r[metric] for r in ok if r.get(metric) is not None]
            if values:
                entry[metric] = median(values)
        digests = {r["output_sha256"] for r in ok if r.get("output_sha256")}
        entry["outputs"] = sorted(digests)
        summary[name] = entry
    return summary


def _short_error(run: dict[str, Any]) -> str:
    error = str(run.get("error", "failed"))
    if run.get("oom_kills"):
        return f"OOM-killed ({error})"
    tail = [line for line in str(run.get("stderr_tail", "")).splitlines() if line.strip()]
    return f"{error}: {tail[-1][:160]}" if tail else error


def _get(summary: dict[str, dict[str, Any]], name: str, metric: str) -> float | None:
    return summary.get(name, {}).get(metric)


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def derived(summary: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """hermesd's pipeline efficiency and the read bound behind it.

    The I/O bound is the bytes hermesd streamed divided by the cold read bandwidth of io-only; the
    compute bound is compute-only's latency (every stage resident, fresh process). Efficiency =
    max(both) / hermesd's latency (1.0: the pipeline hides the smaller of the two completely).
    """
    bandwidth = _get(summary, "io-only", "gb_per_s")
    streamed = _get(summary, "hermesd", "streamed_bytes")
    io_bound = streamed / (bandwidth * 1e9) if streamed is not None and bandwidth else None
    compute_bound = _get(summary, "compute-only", "latency_s")
    bound = max(v for v in (io_bound, compute_bound) if v is not None) if (io_bound or compute_bound) else None
    per_pass = _get(summary, "hermesd", "bytes_per_pass")
    latency = _get(summary, "hermesd", "latency_s")
    own_compute = _get(summary, "hermesd", "stage_compute_s")
    own_bound = max(v for v in (io_bound, own_compute) if v is not None) if (io_bound or own_compute) else None
    return {"read_gb_per_s": bandwidth, "io_bound_s": io_bound, "compute_bound_s": compute_bound,
            "efficiency": _div(bound, latency),
            # Same formula with the compute time hermesd measured in its own runs: immune to another
            # process slowing compute-only's runs and not hermesd's (or the other way round).
            "efficiency_in_run": _div(own_bound, latency), "hermesd_wait_s": _get(summary, "hermesd", "stage_wait_s"),
            "hermesd_compute_s": own_compute,
            "decode_tokens_per_s_read_bound": (bandwidth * 1e9 / per_pass) if bandwidth and per_pass else None}


def ratios(scenario: str, summary: dict[str, dict[str, Any]], extra: dict[str, float | None],
           standard_uncapped_peak: float | None = None) -> list[Ratio]:
    """Target ratios of the issue for the GPT-2-XL and Llama scenarios; plain comparisons elsewhere."""
    total = _get(summary, "hermesd", "total_s")
    if scenario == "gpt2-xl":
        return [
            Ratio("accelerate / hermesd, load+forward", _div(_get(summary, "accelerate", "total_s"), total), ">=", 3),
            Ratio("standard / hermesd, load+forward", _div(_get(summary, "standard", "total_s"), total), ">=", 2),
            Ratio("pipeline efficiency max(io-only, compute-only) / hermesd forward", extra.get("efficiency"), ">=", 0.9),
            Ratio("peak RSS hermesd / standard without a cap", _div(_get(summary, "hermesd", "peak_rss_bytes"),
                                                                    standard_uncapped_peak), "<=", 0.15),
        ]
    decode = _get(summary, "hermesd", "decode_tokens_per_s")
    if scenario == "llama-1b":
        return [
            Ratio("decode tokens/s hermesd / AirLLM", _div(decode, _get(summary, "airllm", "decode_tokens_per_s")), ">=", 3),
            Ratio("decode tokens/s hermesd / (cold read bandwidth / bytes streamed per token)",
                  _div(decode, extra.get("decode_tokens_per_s_read_bound")), ">=", 0.9),
            Comparison("standard / hermesd, load+generate", _div(_get(summary, "standard", "total_s"), total), "", 0),
            Comparison("accelerate / hermesd, load+generate", _div(_get(summary, "accelerate", "total_s"), total), "", 0),
        ]
    return [Comparison(f"{other} / hermesd, load+run", _div(_get(summary, other, "total_s"), total), "", 0)
            for other in ("standard", "accelerate", "airllm", "hermesd-k0") if other in summary]


def _mib(value: float | None) -> str:
    return f"{value / MIB:,.0f}" if value else "-"


def _num(value: float | None, digits: int = 2) -> str:
    return f"{value:,.{digits}f}" if value is not None else "-"


def table(summary: dict[str, dict[str, Any]]) -> str:
    """One row per contender: medians of time, throughput, memory and reads."""
    lines = ["| contender | ok/failed (OOM) | load+run s | run s | prefill tok/s | decode tok/s | peak RSS MiB "
             "| cgroup peak MiB | read MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in summary.items():
        throughput = _num(e.get("prefill_tokens_per_s"), 0)
        if e.get("items_per_s") is not None:  # images: a rate of images, not of tokens
            throughput = f"{e['items_per_s']:.2f} img/s"
        lines.append(f"| {name} | {e['runs']}/{e['failed']} ({e['oom_kills']}) | {_num(e.get('total_s'))} | "
                     f"{_num(e.get('latency_s'))} | {throughput} | {_num(e.get('decode_tokens_per_s'))} | "
                     f"{_mib(e.get('peak_rss_bytes'))} | {_mib(e.get('cgroup_peak_bytes'))} | "
                     f"{_mib(e.get('bytes_read'))} |")
    return "\n".join(lines)


def agreement(summary: dict[str, dict[str, Any]], reference: str = "standard") -> str:
    """Whether each contender's output digest equals the reference's (bit-identical outputs)."""
    ref = set(summary.get(reference, {}).get("outputs", []))
    if not ref:
        return f"outputs: no {reference} output to compare with"
    parts = []
    for name, e in summary.items():
        if name == reference or name == "io-only" or not e.get("outputs"):
            continue
        parts.append(f"{name} {'identical' if set(e['outputs']) == ref else 'DIFFERENT'}")
    return f"outputs vs {reference} (sha256 of the last-position output / generated ids): " + ", ".join(parts)


def scenario_section(result: dict[str, Any]) -> str:
    """Markdown for one scenario's result (title, setup, table, derived numbers, ratios, failures)."""
    extra = result["derived"]
    lines = [f"### {result['title']}", "", f"- workload: {result['workload']}; dtype {result['dtype']}; "
             f"weights {result['weight_bytes'] / MIB:,.0f} MiB; rounds {result['repeats']}",
             f"- memory cap: {result['cap_text']}",
             f"- hermesd plan: {result['plan_text']}", ""]
    lines += [table(result["summary"]), ""]
    bits = [f"cold read bandwidth (io-only) {_num(extra.get('read_gb_per_s'))} GB/s",
            f"I/O bound {_num(extra.get('io_bound_s'))} s", f"compute bound {_num(extra.get('compute_bound_s'))} s",
            f"pipeline efficiency {_num(extra.get('efficiency'), 3)}"]
    if extra.get("hermesd_compute_s") is not None:
        bits.append(f"hermesd's own runs: compute {_num(extra['hermesd_compute_s'])} s, waiting for loads "
                    f"{_num(extra.get('hermesd_wait_s'))} s, efficiency with its own compute time "
                    f"{_num(extra.get('efficiency_in_run'), 3)}")
    if extra.get("decode_tokens_per_s_read_bound") and result["summary"].get("hermesd", {}).get("decode_tokens_per_s"):
        bits.append(f"read-bound decode {_num(extra['decode_tokens_per_s_read_bound'])} tok/s")
    foreign = [e["foreign_cpu_s"] for e in result["summary"].values() if e.get("foreign_cpu_s") is not None]
    if foreign:
        bits.append(f"CPU used by other processes during a run: median over contenders {median(foreign):.1f} s, "
                    f"worst contender median {max(foreign):.1f} s")
    lines.append("- " + "; ".join(bits))
    lines += [r.line() for r in result["ratio_objects"]]
    lines.append(f"- {agreement(result['summary'])}")
    for name, e in result["summary"].items():
        for error in e["errors"]:
            lines.append(f"- {name} failed: {error}")
    return "\n".join(lines) + "\n"


def document(results: list[dict[str, Any]], facts: dict[str, Any], header: list[str]) -> str:
    """The whole suite section written into BENCHMARKS.md."""
    versions = ", ".join(f"{k} {v}" for k, v in facts["versions"].items() if v)
    head = ["## Suite: `hermesd bench`", "", f"- date: {facts['date']}",
            f"- machine: {facts['cpu_model']}, {facts['cores']} cores ({facts['cores_usable']} usable), "
            f"{facts['mem_total_gib']} GiB RAM, kernel {facts['kernel']}",
            f"- versions: python {facts['python']}, {versions}", *[f"- {line}" for line in header], ""]
    return "\n".join(head) + "\n" + "\n".join(scenario_section(r) for r in results)


def write_section(path: Path, text: str) -> None:
    """Put ``text`` between the suite markers of ``path``; without markers, insert it before the first
    ``## `` heading (or at the end)."""
    block = f"{START}\n{text.rstrip()}\n{END}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END) + r"\n?", re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old, count=1)
    else:
        match = re.search(r"^## ", old, re.MULTILINE)
        new = old[: match.start()] + block + "\n" + old[match.start():] if match else old.rstrip() + "\n\n" + block
    path.write_text(new, encoding="utf-8")
