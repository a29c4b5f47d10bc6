"""Do resident stages read at disk speed? Issue 15: at least 0.9x the cold read bandwidth.

    python -m bench.resident_read --store DIR [--rounds 5] [--json]

Each measurement is a fresh process on a cold page cache, the two modes alternating round by round:
- ``io-only``: every stage read once with O_DIRECT into one reused pre-faulted buffer (the suite's io-only);
- ``resident``: ``hermesd.load(store, resident="all")`` then ``wait_resident()``: the whole model read
  the way a plan's resident stages are (one thread: fault a stage's own memory in, read it, next), from
  the start of load() to the last stage in memory.
Reported: the medians' GB/s and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("io-only", "resident")


def child(mode: str, store: Path) -> dict[str, Any]:
    """One measurement in this process (the parent evicted the store from the page cache)."""
    import hermesd
    from bench.contenders import run_io_only

    if mode == "io-only":
        result = run_io_only(argparse.Namespace(store=store, loaders=1), None)
        return {"seconds": result["total_s"], "bytes": result["bytes_read"]}
    load = hermesd.load
    started = time.perf_counter()
    with load(store, resident="all") as engine:
        engine.wait_resident()
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "bytes": engine.open_stats.resident_bytes,
                "load_s": engine.open_stats.wall_s}


def measure(store: Path, rounds: int) -> dict[str, Any]:
    from bench.harness import evict

    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for number in range(rounds):
        for mode in MODES if number % 2 == 0 else tuple(reversed(MODES)):
            evict(sorted((store / "stages").glob("*.safetensors")))
            done = subprocess.run([sys.executable, "-m", "bench.resident_read", "--child", mode, "--store", str(store)],
                                  capture_output=True, text=True, check=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs[mode].append(run)
            print(f"[round {number}] {mode:9s} {run['seconds']:.3f} s, {run['bytes'] / run['seconds'] / 1e9:.2f} GB/s",
                  file=sys.stderr, flush=True)
    gbps = {mode: statistics.median(r["bytes"] / r["seconds"] / 1e9 for r in values) for mode, values in runs.items()}
    return {"gbps": gbps, "ratio": gbps["resident"] / gbps["io-only"], "rounds": rounds, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resident_read", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.store)))
        return 0
    report = measure(args.store, args.rounds)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        verdict = "PASS" if report["ratio"] >= 0.9 else "MISS"
        print(f"io-only {report['gbps']['io-only']:.2f} GB/s, resident {report['gbps']['resident']:.2f} GB/s: "
              f"{report['ratio']:.2f}x the cold read bandwidth (target >= 0.9): {verdict} "
              f"({report['rounds']} rounds, medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
