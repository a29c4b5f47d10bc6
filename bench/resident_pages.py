"""Resident stages as file mappings: do they read at disk speed, and does compute over them lose anything?

    python -m bench.resident_pages --store DIR [--rounds 5] [--threads N] [--json]

Each measurement is a fresh process on a cold page cache, modes alternating round by round; medians:
- ``io-only``: every stage read once with O_DIRECT into a reused pre-faulted buffer (the suite's io-only);
- ``resident-read``: ``hermesd.load(store, resident="all")`` then ``wait_resident()``: the whole model
  read into memory the way a plan's resident stages are (mapped, then populated on one thread);
- ``forward-mapped`` / ``forward-anon``: the first forward after that, with the weights where the engine
  keeps them (page-cache pages), and with every stage copied into anonymous huge-page memory first (where
  resident stages lived before they were mapped: the suite's compute-only bound used that layout).
Reported: resident GB/s against io-only GB/s (issue 15: at least 0.9x) and the mapped forward against
the anonymous one (the same outputs are checked bit for bit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("io-only", "resident-read", "forward-mapped", "forward-anon")


def _inputs(config: Any) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    if hasattr(config, "image_size"):
        return {"pixel_values": torch.randn(4, 3, config.image_size, config.image_size, generator=generator)}
    return {"input_ids": torch.randint(0, config.vocab_size, (4, 128), generator=generator)}


def _to_anonymous(engine: Any) -> list[Any]:
    """Copy every resident stage into anonymous huge-page memory and bind the copies (bench only: it
    reaches into the engine). Returns the memory, which must outlive the forward."""
    from hermesd.engine.bufferpool import map_memory

    kept = []
    for name in engine.plan.resident:
        memory = map_memory(engine.reader.span(name))
        tensors, _ = engine.reader.read(name, memoryview(memory))
        engine._runtime.bindings[name].bind(tensors)
        engine._resident._stages[name].drop()
        kept.append(memory)
    return kept


def child(mode: str, store: Path) -> dict[str, Any]:
    """One measurement in this process (the cache is evicted by the parent)."""
    import torch

    import hermesd
    from bench.contenders import run_io_only

    if mode == "io-only":
        result = run_io_only(argparse.Namespace(store=store, loaders=1), None)
        return {"seconds": result["total_s"], "bytes": result["bytes_read"]}
    load = hermesd.load
    started = time.perf_counter()
    engine = load(store, resident="all")
    engine.wait_resident()
    seconds = time.perf_counter() - started
    if mode == "resident-read":
        return {"seconds": seconds, "bytes": engine.open_stats.resident_bytes}
    kept = _to_anonymous(engine) if mode == "forward-anon" else []
    inputs = _inputs(engine.model.config)
    started = time.perf_counter()
    with torch.inference_mode():
        output = engine.model(**inputs)
    seconds = time.perf_counter() - started
    main = output.logits if hasattr(output, "logits") else output.last_hidden_state
    digest = hashlib.sha256(main.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    del kept
    return {"seconds": seconds, "output_sha256": digest}


def _evict(store: Path) -> None:
    from bench.harness import evict

    evict(sorted((store / "stages").glob("*.safetensors")))


def measure(store: Path, rounds: int, threads: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for number in range(rounds):
        order = MODES if number % 2 == 0 else tuple(reversed(MODES))
        for mode in order:
            _evict(store)
            done = subprocess.run([sys.executable, "-m", "bench.resident_pages", "--child", mode, "--store", str(store),
                                   "--threads", str(threads)], capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"[round {number}] {mode:15s} {runs[mode][-1]['seconds']:.3f} s", file=sys.stderr, flush=True)
    return summarise(runs)


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    median = {mode: statistics.median(r["seconds"] for r in values) for mode, values in runs.items()}
    gbps = {mode: statistics.median(r["bytes"] / r["seconds"] / 1e9 for r in runs[mode])
            for mode in ("io-only", "resident-read")}
    digests = {r["output_sha256"] for mode in ("forward-mapped", "forward-anon") for r in runs[mode]}
    return {"median_s": median, "gbps": gbps, "rounds": len(runs["io-only"]),
            "resident_vs_io": gbps["resident-read"] / gbps["io-only"],
            "mapped_vs_anon_forward": median["forward-mapped"] / median["forward-anon"],
            "outputs_identical": len(digests) == 1, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resident_pages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.store)))
        return 0
    report = measure(args.store, args.rounds, args.threads)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"io-only {report['gbps']['io-only']:.2f} GB/s, resident read {report['gbps']['resident-read']:.2f} GB/s: "
          f"{report['resident_vs_io']:.2f}x (target >= 0.9)")
    print(f"first forward: mapped {report['median_s']['forward-mapped']:.3f} s, anonymous huge pages "
          f"{report['median_s']['forward-anon']:.3f} s: {report['mapped_vs_anon_forward']:.3f}x; "
          f"outputs identical: {report['outputs_identical']} ({report['rounds']} rounds, medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
