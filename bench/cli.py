"""``hermesd bench``: hermesd against the alternatives a user would pick, under real memory caps.

    hermesd bench                      the full suite (about 40 minutes here), results into BENCHMARKS.md
    hermesd bench --quick              smoke run on the two small real models (under 5 minutes)
    hermesd bench --scenarios gpt2-xl,llama-1b --repeats 2 --json

Scenarios: GPT-2-XL fp32 prompt forward (1 GiB cap), Llama 1.1 B bf16 prompt + decode (cap 35% of
the weights), BERT-large and ViT-large batches, the real SmolLM2 and MiniLM. Contenders, each a
fresh process in a fresh capped cgroup, page cache evicted first, alternating by round: hermesd
with the planner's plan, hermesd without prefetch (k=0), transformers from_pretrained, transformers
+ accelerate disk offload, AirLLM (Llama family; found through --airllm-python). Bounds (uncapped):
io-only (read every stage), compute-only (every stage resident).

Outputs: one JSON file per run and one for the suite under bench/results/suite-STAMP/; a markdown
section in BENCHMARKS.md (full runs; --benchmarks FILE to choose, --no-benchmarks to skip); PNG plots
(latency vs cap per contender, a hermesd timeline) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import cgroup, plots, scenarios, suite_report
from bench.harness import machine_facts, median
from bench.prepare import REPO_ROOT, Prepared, prepare
from bench.suite import Options, find_airllm, run_scenario
from hermesd import progressbar

MIB = 1 << 20
DEFAULT_DATA = Path(os.environ.get("HERMESD_BENCH_DATA", "/work/benchdata"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hermesd bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small real models, one round, short inputs")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (transformers' included); the "
                                                             "per-run lines still go to stderr")
    parser.add_argument("--scenarios", help="comma-separated subset (default: all of the mode)")
    parser.add_argument("--contenders", help="comma-separated subset of contenders and bounds")
    parser.add_argument("--repeats", type=int, help="rounds per scenario (default: each scenario's own)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the extra caps of the latency-vs-cap plot")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder of stores and twins, made when missing (default $HERMESD_BENCH_DATA or %(default)s)")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--plots", type=Path, help="folder for PNGs (default: bench/plots for full runs, the "
                                                   "results folder for --quick)")
    parser.add_argument("--benchmarks", type=Path, help="markdown file to write the section into "
                                                        "(default: BENCHMARKS.md for full runs, none for --quick)")
    parser.add_argument("--no-benchmarks", action="store_true", help="do not write any markdown file")
    parser.add_argument("--airllm-python", default=os.environ.get("HERMESD_AIRLLM_PYTHON"),
                        help="interpreter of a venv with airllm (default $HERMESD_AIRLLM_PYTHON, else this one)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads in every contender (default: usable cores, %(default)s)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run (default %(default)s)")
    parser.add_argument("--uncapped", action="store_true", help="run without cgroup caps even where they work")
    parser.add_argument("--report", type=Path, metavar="SUITE_JSON",
                        help="no runs: rebuild the report, plots and markdown of a finished run from its suite.json")
    return parser


def _plan_text(prepared: Prepared) -> str:
    plan = prepared.plans.get("hermesd", {})
    if "plan" not in plan:
        return f"none ({plan.get('error', '?')})"
    body = plan["plan"]
    return (f"prefetch k={body.get('prefetch')}, {len(body.get('resident', []))} resident stage(s), "
            f"{len(body.get('streamed', []))} streamed; predicted {plan['predicted_latency_s']:.2f} s, "
            f"peak {plan['predicted_peak_bytes'] / MIB:,.0f} MiB ({plan.get('bound')}-bound)")


def _uncapped_peak(sweep: list[dict[str, Any]], name: str) -> float | None:
    """The peak of ``name`` at the sweep's largest cap where it stayed below the cap (in effect uncapped)."""
    free = [r for r in sweep if r["name"] == name and r.get("ok")
            and r.get("cgroup_peak_bytes", 0) < 0.95 * (r.get("cap_bytes") or float("inf"))]
    return max((r["peak_rss_bytes"] for r in free), default=None)


def scenario_meta(prepared: Prepared, cap_text: str) -> dict[str, Any]:
    """What the report says about a scenario's setup (kept in suite.json so a report can be rebuilt)."""
    scenario = prepared.scenario
    return {"scenario": scenario.name, "title": scenario.title, "workload": scenario.describe(),
            "dtype": prepared.dtype, "weight_bytes": prepared.weight_bytes, "cap_bytes": prepared.cap_bytes,
            "cap_text": cap_text, "plan_text": _plan_text(prepared)}


META_KEYS = ("scenario", "title", "workload", "dtype", "weight_bytes", "cap_bytes", "cap_text", "plan_text")


def analyse(meta: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
    """Summary, derived metrics and ratios of one scenario's runs."""
    summary = suite_report.summarize(outcome["runs"], outcome["names"])
    extra = suite_report.derived(summary)
    ratio_list = suite_report.ratios(meta["scenario"], summary, extra, _uncapped_peak(outcome["sweep"], "standard"))
    return {**{k: meta[k] for k in META_KEYS}, "repeats": outcome["repeats"], "summary": summary, "derived": extra,
            "ratio_objects": ratio_list,
            "ratios": [{"label": r.label, "value": r.value, "op": r.op, "target": r.target, "verdict": r.verdict}
                       for r in ratio_list]}


def budget_points(result: dict[str, Any], outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """(contender, cap, median latency or None) for the latency-vs-cap plot."""
    points = []
    for name, entry in result["summary"].items():
        if name in scenarios.BOUNDS:
            continue
        points.append({"contender": name, "cap_bytes": result["cap_bytes"], "latency_s": entry.get("total_s")})
    for run in outcome["sweep"]:
        points.append({"contender": run["name"], "cap_bytes": run["cap_bytes"],
                       "latency_s": run.get("total_s") if run.get("ok") else None})
    return points


def make_plots(results: list[dict[str, Any]], outcomes: list[dict[str, Any]], folder: Path) -> list[str]:
    """The two plots per scenario that has what they need; returns the files written."""
    written = []
    for result, outcome in zip(results, outcomes):
        name = result["scenario"]
        if outcome["sweep"]:
            written.append(str(plots.latency_vs_budget(budget_points(result, outcome), folder / f"{name}-latency-vs-cap.png",
                                                       f"{name} ({result['workload']}): latency vs memory cap")))
        hermesd_runs = [r for r in outcome["runs"] if r["name"] == "hermesd" and r.get("ok")
                        and r.get("stats", {}).get("timeline")]
        if hermesd_runs:
            middle = median(r["latency_s"] for r in hermesd_runs)
            run = min(hermesd_runs, key=lambda r: abs(r["latency_s"] - middle))
            written.append(str(plots.timeline(run["stats"]["timeline"], folder / f"{name}-hermesd-timeline.png",
                                              f"hermesd, {name}: per-stage load and compute ({run['tag']}, "
                                              f"{run['latency_s']:.2f} s" + (", first pass shown)" if
                                                                              run.get("decode_s") else ")"))))
    return written


def main(argv: list[str]) -> int:
    """Entry point of ``hermesd bench``; returns the exit status."""
    args = _parser().parse_args(argv)
    bars = progressbar.configure(args.quiet)  # bars only on a terminal; prepare's conversions load transformers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        chosen = scenarios.select(scenarios.quick() if args.quick else scenarios.FULL, args.scenarios)
    except ValueError as exc:
        print(f"hermesd bench: {exc}", file=sys.stderr)
        return 2
    if args.report:
        document = json.loads(args.report.read_text(encoding="utf-8"))
        results = [analyse(meta, outcome) for meta, outcome in zip(document["scenarios"], document["outcomes"])]
        return publish(args, document["machine"], document["header"], results, document["outcomes"],
                       args.report.parent)
    started = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = args.results / f"suite-{stamp}{'-quick' if args.quick else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    cap_reason = "uncapped on request (--uncapped)" if args.uncapped else cgroup.unavailable_reason()
    airllm_python, airllm_reason = find_airllm(args.airllm_python)
    options = Options(results=folder, threads=args.threads, timeout=args.timeout, airllm_python=airllm_python,
                      airllm_reason=airllm_reason, capped=cap_reason is None,
                      contenders=tuple(args.contenders.split(",")) if args.contenders else None,
                      repeats=args.repeats, sweep=not args.no_sweep, bars=bars)
    if airllm_reason:
        print(f"[bench] AirLLM skipped: {airllm_reason}", file=sys.stderr)
    facts = machine_facts()
    results, outcomes = [], []
    for scenario in chosen:
        prepared = prepare(scenario, args.data, folder)
        cap_text = (f"{prepared.cap_bytes / MIB:,.0f} MiB, cgroup {cgroup.controller_version()} per run "
                    f"(contenders; bounds uncapped)" if options.capped
                    else f"none: runs are UNCAPPED ({cap_reason}); planner budget {prepared.cap_bytes / MIB:,.0f} MiB")
        outcome = run_scenario(prepared, options, folder / scenario.name)
        outcomes.append(outcome)
        (folder / "outcomes.json").write_text(json.dumps(outcomes, default=str), encoding="utf-8")  # before analysis
        results.append(analyse(scenario_meta(prepared, cap_text), outcome))
    header = [f"suite wall time {(time.perf_counter() - started) / 60:.1f} min; mode "
              f"{'quick' if args.quick else 'full'}; torch threads {args.threads} in every contender",
              "every run a fresh process with all weight files evicted from the page cache first (fincore-checked);"
              " contenders alternate by round; numbers are medians",
              f"AirLLM: {'interpreter ' + airllm_python if airllm_python else 'skipped: ' + str(airllm_reason)}",
              f"raw results: {folder.relative_to(REPO_ROOT) if folder.is_relative_to(REPO_ROOT) else folder} "
              "(not committed)"]
    return publish(args, facts, header, results, outcomes, folder)


def publish(args: argparse.Namespace, facts: dict[str, Any], header: list[str], results: list[dict[str, Any]],
            outcomes: list[dict[str, Any]], folder: Path) -> int:
    """Markdown, plots, suite.json, BENCHMARKS.md and the printed summary; the exit status."""
    text = suite_report.document(results, facts, header)
    plot_reason = plots.available()
    plot_dir = args.plots or (folder if args.quick else REPO_ROOT / "bench" / "plots")
    written = [] if plot_reason else make_plots(results, outcomes, plot_dir)
    if written:
        rel = [Path(p).relative_to(REPO_ROOT) if Path(p).is_relative_to(REPO_ROOT) else Path(p) for p in written]
        text += "\nPlots:\n\n" + "\n".join(f"![{p.stem}]({p})" for p in rel) + "\n"
    elif plot_reason:
        text += f"\nPlots: {plot_reason}\n"
    document = {"machine": facts, "header": header, "args": {k: str(v) for k, v in vars(args).items()},
                "scenarios": [{k: v for k, v in r.items() if k != "ratio_objects"} for r in results],
                "outcomes": outcomes, "plots": written, "markdown": text}
    (folder / "suite.json").write_text(json.dumps(document, indent=1, default=str), encoding="utf-8")
    target = None if args.no_benchmarks else (args.benchmarks or (None if args.quick else REPO_ROOT / "BENCHMARKS.md"))
    if target is not None:
        suite_report.write_section(target, text)
    if args.json:
        print(json.dumps({"results": str(folder / "suite.json"), "markdown_written_to": str(target) if target else None,
                          "plots": written, "scenarios": document["scenarios"]}, indent=1, default=str))
    else:
        print(text)
        print(f"results: {folder / 'suite.json'}")
    failed = [r["scenario"] for r in results if not r["summary"].get("hermesd", {}).get("runs")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
