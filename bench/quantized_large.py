"""A model four times the memory cap: a Llama-2-7B-shape int4 store decoding in 900 MiB, and a 7B-shape
Q4_0 GGUF converting in 1.5 GiB.

    python -m bench.quantized_large [--work DIR] [--json]

Steps, each in a fresh process (the page cache evicted before each run):
1. ``hermesd convert --random-config llama2-7b.json --quantize int4`` (uncapped; its peak is reported);
2. the int4 store generates 8 tokens after a 16-token prompt under a 900 MiB cgroup cap (budget
   850 MiB): tokens/s, bytes streamed per step, peak, OOM kills;
3. the same store fully resident, uncapped: its tokens must equal step 2's;
4. a 7B-shape Q4_0 GGUF (random weights, ``gguf.quants``) converts under a 1.5 GiB cap: peak, OOM kills.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.cgroup import MemoryGroup, unavailable_reason
from bench.harness import emit_json_line, evict, machine_facts, weight_files
from bench.quantized import ROOT, _write_gguf, run_one
from hermesd.units import format_size, parse_size

CONFIG = ROOT / "bench" / "configs" / "llama2-7b.json"
PROMPT, NEW = 16, 8


def _convert(args: list[str], cap: int | None) -> dict[str, Any]:
    """``hermesd convert ... --json`` in a child (under ``cap`` when given): its report, peak and OOM kills."""
    command = [sys.executable, "-m", "hermesd.cli", "convert", *args, "--quiet", "--force", "--json"]
    started = time.perf_counter()
    if cap is None:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        record = {}
    else:
        with MemoryGroup(cap) as group:
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, preexec_fn=group.join)
            peak = group.record()
        record = {"group_peak_bytes": peak.peak_bytes, "oom_kills": peak.oom_kills}
    result: dict[str, Any] = {"ok": done.returncode == 0, "seconds": time.perf_counter() - started, **record}
    if done.returncode == 0:
        report = json.loads(done.stdout.strip().splitlines()[-1])
        result.update({k: report[k] for k in ("weight_bytes", "peak_rss_bytes")})
    else:
        result["error"] = (done.stderr.strip().splitlines() or ["killed"])[-1]
    return result


def run(work: Path, cap: int, budget: str, gguf_cap: int, skip_gguf: bool = False) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    store = work / "llama2-7b-int4"
    report: dict[str, Any] = {"machine": machine_facts(), "cap_bytes": cap, "budget": budget, "gguf_cap_bytes": gguf_cap}
    if not (store / "manifest.json").exists():
        print("converting the 7B shape with --quantize int4", file=sys.stderr, flush=True)
        report["int4_convert"] = _convert(["--random-config", str(CONFIG), str(store), "--dtype", "fp32",
                                           "--quantize", "int4"], None)
    report["store_bytes"] = sum(p.stat().st_size for p in weight_files(store))
    print(f"decoding under {format_size(cap)}", file=sys.stderr, flush=True)
    report["capped"] = run_one(store, budget, cap, timeout=3600, prompt=PROMPT, new=NEW, fit_workload=True)
    print("decoding fully resident, uncapped", file=sys.stderr, flush=True)
    report["resident"] = run_one(store, "auto", None, timeout=3600, prompt=PROMPT, new=NEW)
    capped, resident = report["capped"], report["resident"]
    report["tokens_equal"] = bool(capped.get("ok") and resident.get("ok") and capped["tokens"] == resident["tokens"])
    if skip_gguf:
        return report
    gguf = work / "llama2-7b-Q4_0.gguf"
    if not gguf.exists():
        print(f"writing {gguf} (random weights, Q4_0)", file=sys.stderr, flush=True)
        _write_gguf(gguf, "Q4_0", CONFIG)
    evict([gguf])
    print(f"converting {gguf.name} under {format_size(gguf_cap)}", file=sys.stderr, flush=True)
    report["gguf_bytes"] = gguf.stat().st_size
    report["gguf_convert"] = _convert([str(gguf), str(work / "llama2-7b-q4_0")], gguf_cap)
    return report


def render(report: dict[str, Any]) -> str:
    capped, resident = report["capped"], report["resident"]
    gconv = report.get("gguf_convert", {"ok": None, "seconds": 0})
    lines = [f"Llama-2-7B shape, int4 store {format_size(report['store_bytes'])}, {PROMPT}-token prompt + {NEW} tokens"]
    if capped.get("ok"):
        lines.append(f"capped {format_size(report['cap_bytes'])}: decode {capped['decode_tokens_per_s']:.3f} tok/s, "
                     f"{format_size(int(capped['bytes_per_pass']))} streamed per step, peak "
                     f"{format_size(capped['group_peak_bytes'])}, OOM kills {capped['oom_kills']}")
    else:
        lines.append(f"capped run failed: {capped.get('error')} (OOM kills {capped.get('oom_kills')})")
    if resident.get("ok"):
        lines.append(f"resident uncapped: decode {resident['decode_tokens_per_s']:.3f} tok/s; "
                     f"tokens equal: {report['tokens_equal']}")
    if "gguf_bytes" in report:
        lines.append(f"Q4_0 GGUF {format_size(report['gguf_bytes'])} convert under "
                     f"{format_size(report['gguf_cap_bytes'])}: ok={gconv['ok']} peak "
                     f"{format_size(gconv.get('group_peak_bytes', 0))} OOM kills {gconv.get('oom_kills')} "
                     f"in {gconv['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quantized_large", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "quantized-large")
    parser.add_argument("--cap", default="900MiB")
    parser.add_argument("--budget", default="850MiB")
    parser.add_argument("--gguf-cap", default="1.5GiB")
    parser.add_argument("--skip-gguf", action="store_true", help="only the int4 store's runs (step 4 left out)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if (why := unavailable_reason()) is not None:
        print(f"bench.quantized_large: {why}", file=sys.stderr)
        return 1
    report = run(args.work, parse_size(args.cap), args.budget, parse_size(args.gguf_cap), args.skip_gguf)
    if args.json:
        emit_json_line(report)
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
