"""Issue 15's targets on the suite's scenarios: are loads hidden, is the plan right, is load() cheap?

    python -m bench.loaders [--scenarios bert-large,gpt2-xl,vit-large,llama-1b] [--repeats 3]

Runs hermesd (the planner's one-shot plan for the cap), hermesd-k0, accelerate and the two bounds
(io-only, compute-only) alternately, cold, each in a fresh capped process, through the suite's own
machinery (bench.prepare, bench.suite), and reports per scenario, from medians:
- hermesd load+run against max(io-only, compute-only) (target <= 1.05), io-only scaled by the passes
  hermesd's run reads (a capped decode reads the streamed stages once per token);
- for generate workloads also against the phase bound: the same maximum taken per phase (the prompt
  pass, then the decode passes), because a decode pass's reads cannot hide behind the prompt's compute
  when the weights do not fit in memory;
- hermesd against hermesd-k0 and accelerate, load+run (target: not slower than either);
- hermesd's own compute time (the stages' compute in its run) against compute-only (target <= 1.05);
- hermesd's load() time and its resident read speed; peak RSS and cgroup peak against the cap;
- whether every contender's output is bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import cgroup, scenarios
from bench.cli import DEFAULT_DATA
from bench.harness import machine_facts, median
from bench.prepare import REPO_ROOT, prepare
from bench.suite import Options, run_scenario

CONTENDERS = ("hermesd", "hermesd-k0", "accelerate")
BOUNDS = ("io-only", "compute-only")
DEFAULT_SCENARIOS = "gpt2-xl,bert-large,vit-large,llama-1b"
MIB = 1 << 20


def _ok(runs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in runs if r["name"] == name and r.get("ok")]


def _med(runs: list[dict[str, Any]], name: str, key: str) -> float | None:
    return median(r[key] for r in _ok(runs, name) if r.get(key) is not None)


def io_bound(runs: list[dict[str, Any]]) -> float | None:
    """Seconds the disk needs for what hermesd reads: io-only's one cold pass, times the passes hermesd's
    run reads (a capped decode re-reads every streamed stage per token: 32 passes for the Llama workload)."""
    one_pass = _med(runs, "io-only", "latency_s")
    pass_bytes, hermesd_bytes = _med(runs, "io-only", "bytes_read"), _med(runs, "hermesd", "bytes_read")
    if one_pass is None or not pass_bytes or not hermesd_bytes:
        return one_pass
    return one_pass * max(1.0, hermesd_bytes / pass_bytes)


def phase_bound(runs: list[dict[str, Any]]) -> float | None:
    """For a generate workload: max(io, compute) of the prompt pass plus max(io, compute) of the decode
    passes, from the same io-only and compute-only runs; None for a single forward.

    The whole run's max(io, compute) assumes every read can overlap any compute. Under a cap the decode
    passes must re-read the streamed stages, so only the prompt pass's reads (the whole model, io-only's
    one pass) overlap the prompt's compute; the rest is read while the decode passes run."""
    one_pass, prefill, decode = (_med(runs, "io-only", "latency_s"), _med(runs, "compute-only", "prefill_s"),
                                 _med(runs, "compute-only", "decode_s"))
    pass_bytes, hermesd_bytes = _med(runs, "io-only", "bytes_read"), _med(runs, "hermesd", "bytes_read")
    if None in (one_pass, prefill, decode) or not pass_bytes or not hermesd_bytes:
        return None
    decode_reads = one_pass * max(0.0, hermesd_bytes - pass_bytes) / pass_bytes
    return max(one_pass, prefill) + max(decode_reads, decode)


def analyse(name: str, cap: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's ratios for one scenario, from the medians of its runs."""
    total = {n: _med(runs, n, "total_s") for n in CONTENDERS}
    io, compute = io_bound(runs), _med(runs, "compute-only", "latency_s")
    own = median(r["stats"]["compute_s"] for r in _ok(runs, "hermesd"))
    hermesd = total["hermesd"]
    bound = max(io or 0.0, compute or 0.0) or None
    outputs = {r["name"]: r.get("output_sha256") for r in runs if r.get("ok") and r["name"] != "io-only"}
    peaks = [r.get("cgroup_peak_bytes") or r.get("peak_rss_bytes", 0) for r in _ok(runs, "hermesd")]
    result = {
        "scenario": name, "cap_mib": cap / MIB, "load_run_s": total, "io_only_s": _med(runs, "io-only", "latency_s"),
        "io_bound_s": io, "compute_only_s": compute, "phase_bound_s": phase_bound(runs),
        "hermesd_compute_s": own, "hermesd_wait_s": median(r["stats"]["wait_s"] for r in _ok(runs, "hermesd")),
        "hermesd_load_s": _med(runs, "hermesd", "load_s"),
        "plan": next((r["plan"] for r in _ok(runs, "hermesd")), None),
        "peak_mib": max(peaks) / MIB if peaks else None,
        "outputs_identical": len(set(outputs.values())) == 1 and None not in outputs.values(),
        "rounds": len(_ok(runs, "hermesd")),
    }
    result["checks"] = {
        "load+run <= 1.05 x max(io-only, compute-only)": _ratio(hermesd, bound, 1.05),
        **({"load+run <= 1.05 x phase bound (prompt, then decode)": _ratio(hermesd, result["phase_bound_s"], 1.05)}
           if result["phase_bound_s"] else {}),
        "plan <= hermesd-k0": _ratio(hermesd, total["hermesd-k0"], 1.0),
        "plan <= accelerate": _ratio(hermesd, total["accelerate"], 1.0),
        # the issue asks it of compute-bound scenarios; where the disk is clearly the bound (compute-only
        # under 80 % of it), loads set the pace and compute may stretch into the waits at no cost
        "own compute <= 1.05 x compute-only": _ratio(own, compute, 1.05) if (compute or 0) >= 0.8 * (io or 0)
        else {"pass": None, "ratio": round(own / compute, 3) if own and compute else None, "note": "I/O-bound"},
        "peak <= cap": _ratio(result["peak_mib"], cap / MIB, 1.0),
        "outputs bit-identical": {"pass": result["outputs_identical"]},
    }
    return result


def _ratio(value: float | None, reference: float | None, limit: float) -> dict[str, Any]:
    if value is None or not reference:
        return {"pass": None, "ratio": None}
    ratio = value / reference
    return {"pass": ratio <= limit, "ratio": round(ratio, 3)}


def markdown(results: list[dict[str, Any]]) -> str:
    """One table of medians, then PASS/MISS lines per scenario."""
    lines = ["| scenario | hermesd load+run | k=0 | accelerate | io bound | compute-only | phase bound "
             "| hermesd compute | load() | peak / cap MiB | plan |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        t, plan = r["load_run_s"], r["plan"] or {}
        plan_text = (f"k={plan.get('prefetch')}, {len(plan.get('resident', []))} resident, "
                     f"{plan.get('loader_priority', '?')} loader") if plan else "-"
        lines.append(f"| {r['scenario']} | {_s(t['hermesd'])} | {_s(t['hermesd-k0'])} | {_s(t['accelerate'])} "
                     f"| {_s(r['io_bound_s'])} | {_s(r['compute_only_s'])} | {_s(r.get('phase_bound_s'))} "
                     f"| {_s(r['hermesd_compute_s'])} "
                     f"| {_s(r['hermesd_load_s'])} | {_n(r['peak_mib'])} / {r['cap_mib']:,.0f} | {plan_text} |")
    for r in results:
        lines.append("")
        lines.append(f"{r['scenario']} ({r['rounds']} round(s)):")
        for check, verdict in r["checks"].items():
            state = {True: "PASS", False: "MISS", None: "n/a"}[verdict["pass"]]
            state += f" ({verdict['note']})" if verdict.get("note") else ""
            ratio = f" ({verdict['ratio']})" if verdict.get("ratio") is not None else ""
            lines.append(f"- {check}{ratio}: {state}")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return f"{value:.2f} s" if value is not None else "-"


def _n(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "-"


def reanalyse(folder: Path) -> list[dict[str, Any]]:
    """The analysis of a finished run, from the per-run JSON files its scenario folders keep."""
    results = []
    for scenario in sorted(p for p in folder.iterdir() if p.is_dir()):
        runs = [json.loads(f.read_text()) for f in sorted(scenario.glob("r*-*.json"))]
        if runs:
            cap = next((r["cap_bytes"] for r in runs if r.get("cap_bytes")), 0)
            results.append(analyse(scenario.name, cap, runs))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loaders", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--analyse", type=Path, metavar="FOLDER",
                        help="print the report of a finished run again from its per-run files (runs nothing)")
    args = parser.parse_args(argv)
    if args.analyse:
        print(markdown(reanalyse(args.analyse)))
        return 0
    folder = args.results / f"loaders-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    options = Options(results=folder, threads=args.threads, timeout=args.timeout, airllm_python=None,
                      airllm_reason="not a contender here", capped=cgroup.unavailable_reason() is None,
                      contenders=CONTENDERS + BOUNDS, repeats=args.repeats, sweep=False)
    results = []
    for scenario in scenarios.select(scenarios.FULL, args.scenarios):
        prepared = prepare(scenario, args.data, folder)
        outcome = run_scenario(prepared, options, folder / scenario.name)
        results.append(analyse(scenario.name, prepared.cap_bytes, outcome["runs"]))
        (folder / "loaders.json").write_text(json.dumps({"machine": machine_facts(), "results": results},
                                                        indent=1, default=str), encoding="utf-8")
    print(markdown(results))
    print(f"results: {folder / 'loaders.json'}" + ("" if options.capped else " (UNCAPPED: no cgroup controller)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
