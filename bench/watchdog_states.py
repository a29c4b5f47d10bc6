"""Latency cost of each watchdog state on a streamed model, measured through a real daemon.

    python -m bench.watchdog_states --store /path/to/store --budget 3GiB [--reps 3]

States, alternated in one run (A B C D A B C D ...):
  normal       the planner's plan (prefetch + resident stages)
  soft         thermal soft: prefetch paused, stages load on demand
  hard         thermal hard for HOLD_S seconds after the job starts, then cool: cost = hold + resume
  memory-low   memory low water: resident set released and prefetch paused

A hard-linked copy of the store gets a word-level tokenizer (random-weight stores have none), so a
prompt of PROMPT_TOKENS tokens runs as a real generate job with one new token.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon_support import save_tiny_tokenizer, start_daemon, write_config  # noqa: E402

from hermesd.store.manifest import Manifest  # noqa: E402

PROMPT_TOKENS = 128
HOLD_S = 2.0
STATES = ("normal", "soft", "hard", "memory-low")


def _linked_store(store: Path, root: Path) -> Path:
    """Hard links of the stage files (no copy of the weights), copies of the rest, plus a tokenizer.

    Only stage files are linked: the tokenizer written below must not truncate a file it shares.
    """
    def link_stages(src: str, dst: str) -> None:
        if Path(src).parent.name == "stages":
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    copy = root / "store"
    shutil.copytree(store, copy, copy_function=link_stages)
    config = Manifest.load(copy).config
    save_tiny_tokenizer(copy, int(config.get("vocab_size", 1000)))
    return copy


def _config(root: Path, store: Path, budget: str, sensor: Path, memory_low: bool) -> None:
    memory = {"low_water": 0.001, "critical": 0.999, "recover": 0.0005} if memory_low else {"enabled": False}
    write_config(root, {"m": {"store": store, "memory_budget": budget, "max_new_tokens": 4,
                              "max_prompt_tokens": PROMPT_TOKENS}},
                 thermal={"paths": [str(sensor)]}, memory=memory, log_level="info")


def _set_state(daemon, root, store, budget, sensor, client, state) -> None:
    """Put the daemon in ``state`` and wait until its status shows it."""
    memory_low = state == "memory-low"
    _config(root, store, budget, sensor, memory_low)
    daemon.send_signal(signal.SIGHUP)
    sensor.write_text("78000\n" if state == "soft" else "40000\n")
    wanted = ("soft" if state == "soft" else "normal", "low" if memory_low else "normal")
    deadline = time.monotonic() + 30
    while True:
        watch = client.status()["watchdogs"]
        model = client.models()[0]
        resident = [] if memory_low else sorted(model["plan"]["resident"])  # recovery restores it when idle
        if (watch["thermal"]["level"], watch["memory"]["level"]) == wanted and model["resident_now"] == resident:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon never reached state {state}: {watch}")
        time.sleep(0.2)


def _run_job(client, sensor: Path, state: str) -> dict:
    prompt = " ".join(f"w{i % 900 + 1}" for i in range(PROMPT_TOKENS))
    cooler = None
    if state == "hard":
        sensor.write_text("85000\n")
        time.sleep(1.5)  # the watchdog reads once a second: the hold is in force when the job starts
        cooler = threading.Timer(HOLD_S, lambda: sensor.write_text("40000\n"))
        cooler.start()
    started = time.perf_counter()
    result = client.generate("m", prompt, max_new_tokens=1, chat=False, timeout=600)
    latency = time.perf_counter() - started
    if cooler is not None:
        cooler.join()
    stats = result["stats"]
    return {"state": state, "latency_s": latency, "run_s": stats["wall_s"], "paused_s": stats["paused_s"],
            "wait_s": stats["wait_s"], "on_demand_loads": stats["on_demand_loads"],
            "prefetch_paused_stages": stats["prefetch_paused_stages"], "peak_rss_bytes": stats["peak_rss_bytes"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--budget", default="3GiB", help="memory budget of the plan (resident stages need room)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/watchdog_states.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.store.parent) as tmp:  # same filesystem: hard links work
        root = Path(tmp)
        store = _linked_store(args.store, root)
        sensor = root / "temp"
        sensor.write_text("40000\n")
        _config(root, store, args.budget, sensor, memory_low=False)
        daemon = start_daemon(root)
        try:
            client = daemon.client(timeout=600)
            plan = client.models()[0]["plan"]
            runs = []
            for rep in range(args.reps):
                for state in STATES:
                    _set_state(daemon, root, store, args.budget, sensor, client, state)
                    runs.append(_run_job(client, sensor, state) | {"rep": rep})
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        finally:
            daemon.stop()
    report = _summarise(runs, plan)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "summary": report, "plan": plan}, indent=1))
    print(json.dumps(report, indent=1))
    return 0


def _summarise(runs: list[dict], plan: dict) -> dict:
    medians = {state: {key: statistics.median(r[key] for r in runs if r["state"] == state)
                       for key in ("latency_s", "run_s", "paused_s", "wait_s", "on_demand_loads", "peak_rss_bytes")}
               for state in STATES}
    base = medians["normal"]["run_s"]
    for state, values in medians.items():
        values["run_vs_normal"] = round(values["run_s"] / base, 3)
        values["run_minus_pause_vs_normal"] = round((values["run_s"] - values["paused_s"]) / base, 3)
    return {"prompt_tokens": PROMPT_TOKENS, "hold_s": HOLD_S, "plan_prefetch": plan["prefetch"],
            "plan_resident": len(plan["resident"]), "medians": medians}


if __name__ == "__main__":
    sys.exit(main())
