"""The suite driver: prepared scenarios in, alternating cold capped runs out (one JSON file per run).

For each round, every contender runs once in a fresh process (A B C … A B C …). Before each run every
weight file of the scenario is evicted from the page cache (checked with fincore). Contenders run in
a fresh cgroup capped at the scenario's cap where the memory controller is writable; the bounds
(io-only, compute-only) run uncapped. A run that fails (OOM kill, error, timeout) is recorded and the
suite goes on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import cgroup
from bench.harness import children_cpu_s, cpu_busy_s, cpu_steal_s, make_cold, run_json_child
from bench.prepare import REPO_ROOT, Prepared, ensure_airllm_split, plans_for
from bench.scenarios import BOUNDS
from hermesd import progressbar

MIB = 1 << 20


@dataclass
class Options:
    """How the suite runs (from the command line)."""

    results: Path
    threads: int
    timeout: float
    airllm_python: str | None
    airllm_reason: str | None  # why AirLLM is skipped (None: it runs)
    capped: bool
    contenders: tuple[str, ...] | None = None  # a subset (None: each scenario's own list)
    repeats: int | None = None  # override of each scenario's rounds
    sweep: bool = True
    log: Any = field(default=sys.stderr)
    bars: bool = False  # a progress bar of each scenario's runs (on a terminal; hermesd.progressbar)
    bar: Any = None  # the scenario's bar while it runs


def find_airllm(python: str | None) -> tuple[str | None, str | None]:
    """The interpreter that can ``import airllm`` (given, or this one), or None and why not."""
    candidates = [python] if python else [sys.executable]
    for candidate in candidates:
        try:
            done = subprocess.run([candidate, "-c", "import airllm, torch, transformers; "
                                   "from importlib import metadata; print(metadata.version('airllm'))"],
                                  capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"AirLLM interpreter {candidate} did not start ({exc})"
        if done.returncode == 0:
            return candidate, None
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return None, (f"AirLLM is not importable by {candidate} ({last}); install it into its own venv and pass "
                      "--airllm-python or set HERMESD_AIRLLM_PYTHON (see BENCHMARKS.md)")
    return None, "no AirLLM interpreter"


def contender_names(prepared: Prepared, options: Options) -> list[str]:
    """The scenario's contenders in run order, minus unavailable AirLLM, then the bounds."""
    names = [n for n in prepared.scenario.contenders if options.contenders is None or n in options.contenders]
    if options.airllm_reason:
        names = [n for n in names if n != "airllm"]
    bounds = [n for n in prepared.scenario.bounds if options.contenders is None or n in options.contenders]
    return names + bounds


def command(name: str, prepared: Prepared, options: Options, cap: int, plans: dict[str, dict[str, Any]],
            output: Path) -> list[str] | str:
    """The command of one run, or the reason it cannot run (a plan the planner refused)."""
    python = options.airllm_python if name == "airllm" else sys.executable
    cmd = [python, "-m", "bench.runner", name, "--scenario", prepared.scenario.to_json(), "--store",
           str(prepared.store), "--twin", str(prepared.twin), "--dtype", prepared.dtype,
           "--threads", str(options.threads), "--output-out", str(output)]
    if name in ("hermesd", "hermesd-k0"):
        plan = plans.get(name, {})
        if "file" not in plan:
            return f"the planner gave no plan for a {cap / MIB:,.0f} MiB cap: {plan.get('error', '?')}"
        cmd += ["--plan", plan["file"]] + (["--timeline"] if prepared.scenario.timeline else [])
    if name == "accelerate":
        cmd += ["--cpu-memory", str(cap // 2)]  # the other half: runtime, activations, page cache
    if name == "airllm":
        cmd += ["--airllm-shards", str(prepared.airllm_shards)]
    return cmd


def run_one(name: str, prepared: Prepared, options: Options, cap: int, plans: dict[str, dict[str, Any]],
            folder: Path, tag: str) -> dict[str, Any]:
    """One cold run of one contender, capped unless it is a bound; its JSON is written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / f"{tag}-{name}.npy"
    cmd = command(name, prepared, options, cap, plans, output)
    capped = options.capped and name not in BOUNDS
    base = {"name": name, "tag": tag, "cap_bytes": cap if capped else None, "capped": capped}
    if isinstance(cmd, str):
        result = base | {"ok": False, "error": cmd}
    else:
        resident = make_cold(prepared.weight_files())
        steal, busy, mine = cpu_steal_s(), cpu_busy_s(), children_cpu_s()
        if capped:
            with cgroup.MemoryGroup(cap) as group:
                result = run_json_child(cmd, options.timeout, cwd=REPO_ROOT, preexec_fn=group.join)
                record = group.record()
            result.update(cgroup_peak_bytes=record.peak_bytes, oom_kills=record.oom_kills)
        else:
            result = run_json_child(cmd, options.timeout, cwd=REPO_ROOT)
        # CPU time other processes on this machine used meanwhile: the noise behind a slow run.
        foreign = (cpu_busy_s() - busy) - (children_cpu_s() - mine)
        result.update(base, resident_before_bytes=resident, steal_s=cpu_steal_s() - steal,
                      foreign_cpu_s=max(foreign, 0.0))
    (folder / f"{tag}-{name}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    if options.bar is not None:
        options.bar.write(progress(prepared.scenario.name, result))
        options.bar.advance(f"{tag} {name}")
    else:
        print(progress(prepared.scenario.name, result), file=options.log, flush=True)
    return result


def progress(scenario: str, result: dict[str, Any]) -> str:
    """One line per run for the person watching."""
    where = f"[{scenario} {result['tag']}] {result['name']:<12}"
    if not result.get("ok"):
        oom = f", {result['oom_kills']} OOM kill(s)" if result.get("oom_kills") else ""
        return f"{where} FAILED{oom}: {result.get('error')}"
    parts = [f"load+run {result['total_s']:.2f} s" if "total_s" in result else "",
             f"decode {result['decode_tokens_per_s']:.2f} tok/s" if result.get("decode_tokens_per_s") else "",
             f"peak {result.get('peak_rss_bytes', 0) / MIB:,.0f} MiB",
             f"cgroup {result['cgroup_peak_bytes'] / MIB:,.0f} MiB" if result.get("cgroup_peak_bytes") else "",
             f"cache before {result.get('resident_before_bytes', 0)} B",
             f"others' CPU {result['foreign_cpu_s']:.1f} s" if "foreign_cpu_s" in result else ""]
    return f"{where} " + "; ".join(p for p in parts if p)


def run_scenario(prepared: Prepared, options: Options, folder: Path) -> dict[str, Any]:
    """All rounds at the scenario's cap, then one round at each sweep cap (contenders only)."""
    scenario = prepared.scenario
    names = contender_names(prepared, options)
    if "airllm" in names:
        split = ensure_airllm_split(prepared, options.airllm_python, timeout=3600)
        if not split.get("ok"):
            names.remove("airllm")
            options.log.write(f"[{scenario.name}] AirLLM could not split the model: {split.get('error')}\n")
    repeats = options.repeats or scenario.repeats
    swept = [n for n in names if n not in BOUNDS and n != "airllm"]  # AirLLM has no budget knob
    caps = scenario.sweep_caps if options.sweep and options.capped else []
    if options.bars:
        options.bar = progressbar.StageBar(scenario.name, repeats * len(names) + len(caps) * len(swept), unit="run")
    try:
        runs = [run_one(name, prepared, options, prepared.cap_bytes, prepared.plans, folder, f"r{round_no}")
                for round_no in range(repeats) for name in names]
        sweep: list[dict[str, Any]] = []
        for cap in caps:
            plans = plans_for(prepared.store, scenario, cap, folder)
            sweep += [run_one(name, prepared, options, cap, plans, folder, f"sweep{cap // MIB}M") for name in swept]
    finally:
        if options.bar is not None:
            options.bar.close()
            options.bar = None
    return {"names": names, "repeats": repeats, "runs": runs, "sweep": sweep}
