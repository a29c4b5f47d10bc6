"""GPT-2-XL (1.56 B params, fp32, random weights): one cold 128-token prompt forward per contender.

    python -m bench.gpt2xl --store /work/benchdata/gpt2xl-fp32 --twin /work/benchdata/gpt2xl-fp32-hf \\
        [--repeats 3] [--contenders a,b,c] [--markdown FILE]

Rounds of all contenders alternate; each run is a fresh process started with the weight files
(store stages and twin shards) evicted from the page cache. Raw runs and the summary go to
bench/results/gpt2xl-<timestamp>.json; the table and target ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.harness import cpu_steal_s, machine_facts, make_cold, run_json_child, weight_files

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CONFIG = BENCH_DIR / "configs" / "gpt2-xl.json"
CONTENDERS = ["hermesd", "hermesd-k2", "hermesd-k0", "standard", "accelerate", "io-only", "compute-only"]


def ensure_store(store: Path, timeout: float) -> None:
    """Convert the GPT-2-XL random-weight store with the hermesd CLI unless it exists."""
    if (store / "manifest.json").is_file():
        return
    cli = shutil.which("hermesd", path=str(Path(sys.executable).parent)) or shutil.which("hermesd")
    if cli is None:
        raise SystemExit("hermesd CLI not found; install hermesd into this environment")
    print(f"creating store {store} ...", file=sys.stderr)
    subprocess.run([cli, "convert", "--random-config", str(CONFIG), str(store), "--dtype", "fp32"],
                   check=True, timeout=timeout)


def ensure_twin(store: Path, twin: Path, timeout: float) -> dict[str, Any]:
    """Export (and verify) the Hugging Face twin in a subprocess unless a complete one exists."""
    from bench.twin import is_complete

    if is_complete(store, twin):
        return {"exported": False, "twin": str(twin)}
    print(f"exporting twin {twin} and verifying it ...", file=sys.stderr)
    result = run_json_child([sys.executable, "-m", "bench.twin", str(store), str(twin), "--verify"],
                            timeout=timeout, cwd=REPO_ROOT)
    if not result.get("ok"):
        raise SystemExit(f"twin export failed: {result.get('error')}\n{result.get('stderr_tail', '')}")
    return result


def contender_cmd(name: str, args: argparse.Namespace, logits_file: Path) -> list[str]:
    """The command line of one contender run."""
    cmd = [sys.executable, "-m", "bench.contenders", name, "--store", str(args.store), "--twin", str(args.twin),
           "--tokens", str(args.tokens), "--seed", str(args.seed), "--logits-out", str(logits_file)]
    return cmd + (["--threads", str(args.threads)] if args.threads else [])


def run_rounds(args: argparse.Namespace, names: list[str], run_dir: Path, save: Any) -> list[dict[str, Any]]:
    """All rounds; each run starts cold. ``save(runs)`` is called after every run (partial results)."""
    files = weight_files(args.store / "stages", args.twin)
    runs: list[dict[str, Any]] = []
    for round_no in range(args.repeats):
        for name in names:
            logits_file = run_dir / f"{name}-r{round_no}.npy"
            resident = make_cold(files)
            steal = cpu_steal_s()
            result = run_json_child(contender_cmd(name, args, logits_file), timeout=args.timeout, cwd=REPO_ROOT)
            result.update(name=name, round=round_no, resident_before_bytes=resident, steal_s=cpu_steal_s() - steal)
            if result.get("ok") and logits_file.is_file():
                result["logits_file"] = str(logits_file)
            runs.append(result)
            save(runs)
            print(_progress(result), file=sys.stderr, flush=True)
    return runs


def _progress(result: dict[str, Any]) -> str:
    where = f"round {result['round']} {result['name']:<12}"
    if not result.get("ok"):
        return f"{where} FAILED: {result.get('error')}\n{result.get('stderr_tail', '')[-1500:]}"
    times = ", ".join(f"{k} {result[k]:.2f}" for k in ("total_s", "forward_s", "load_s") if k in result)
    return (f"{where} {times}; peak {result['peak_rss_bytes'] / 2**20:,.0f} MiB; "
            f"cache before {result['resident_before_bytes']} B; cpu steal {result['steal_s']:.1f} s")


def _notes(args: argparse.Namespace, runs: list[dict[str, Any]], twin_info: dict[str, Any]) -> list[str]:
    threads = sorted({r["threads"] for r in runs if r.get("ok")})
    resident = max((r["resident_before_bytes"] for r in runs), default=0)
    return [
        f"model: GPT-2-XL shape, fp32 random weights; store {args.store}; twin {args.twin}",
        f"workload: one forward of a [1, {args.tokens}] prompt (seed {args.seed}), use_cache=False",
        f"torch threads in every contender: {', '.join(map(str, threads)) or 'n/a'}",
        f"page cache cold before each run: max resident weight bytes (fincore) {resident}",
        f"CPU steal during runs (/proc/stat): max {max((r['steal_s'] for r in runs), default=0):.1f} s in one run",
        f"rounds: {args.repeats}; each contender a fresh process; peak RSS = process VmHWM",
        "accelerate: device_map='auto', max_memory={'cpu': '1GiB'}, offload_folder=tmp "
        "(transformers 5 reads disk-offloaded weights straight from the twin's safetensors)",
    ] + (["twin exported in this run"] if twin_info.get("exported") else [])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpt2xl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("/work/benchdata/gpt2xl-fp32"))
    parser.add_argument("--twin", type=Path, default=Path("/work/benchdata/gpt2xl-fp32-hf"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset, in run order")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads for every contender (default: torch's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per contender run")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--markdown", type=Path, help="also write the table and machine facts here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and ratios; write the JSON (and markdown) report."""
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; choose from {CONTENDERS}")
    ensure_store(args.store, args.timeout)
    twin_info = ensure_twin(args.store, args.twin, timeout=3 * args.timeout)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.results.mkdir(parents=True, exist_ok=True)
    json_path, run_dir = args.results / f"gpt2xl-{stamp}.json", args.results / f"gpt2xl-{stamp}"
    run_dir.mkdir()
    facts = machine_facts()
    document: dict[str, Any] = {"benchmark": "gpt2xl", "args": {k: str(v) for k, v in vars(args).items()},
                                "machine": facts, "twin": twin_info}

    def save(runs: list[dict[str, Any]]) -> None:
        document["runs"] = runs
        json_path.write_text(json.dumps(document, indent=1), encoding="utf-8")

    runs = run_rounds(args, names, run_dir, save)
    summary = report.summarize(runs, names)
    ratio_list, agree = report.ratios(summary), report.agreement(runs)
    notes = _notes(args, runs, twin_info)
    document.update(summary=summary, ratios=[vars(r) | {"verdict": r.verdict} for r in ratio_list],
                    agreement=agree, notes=notes)
    save(runs)
    text = report.markdown("hermesd vs transformers/accelerate: GPT-2-XL fp32, cold 128-token forward",
                           summary, ratio_list, agree, facts, notes)
    print(text)
    print(f"results: {json_path}")
    if args.markdown:
        report.write_markdown(args.markdown, text)
    return 0 if all(s["runs"] for s in summary.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
