"""Run one plan in this (fresh) process: ``python -m bench.plan_runner STORE PLAN_JSON PROMPT NEW``.

Prints one JSON line: the measured latency of the workload (page cache evicted first), the peak RSS
of the whole process, and the engine's stats. Used by bench.planner for every measured plan.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import hermesd
from bench.harness import emit_json_line, make_cold, vm_hwm_bytes, weight_files
from hermesd.plan.budget import Plan


def main() -> int:
    store, plan_file, prompt, new = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    plan = Plan.from_dict(json.loads(plan_file.read_text())["plan"])
    engine = hermesd.load(store, plan=plan)
    vocab = engine.model.config.vocab_size
    ids = torch.randint(1, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    make_cold(weight_files(store))
    started = time.perf_counter()
    with torch.inference_mode():
        if new:
            engine.model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        else:
            engine.model(ids, use_cache=False)
    latency = time.perf_counter() - started
    emit_json_line({"latency_s": latency, "peak_rss_bytes": vm_hwm_bytes(), "stats": engine.stats.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
