"""One contender of one suite scenario, in this (fresh) process; prints one JSON line.

    python -m bench.runner CONTENDER --scenario JSON --store DIR [--twin DIR] [--plan FILE] ...

Contenders: ``hermesd`` / ``hermesd-k0`` (a plan from ``hermesd plan``), ``standard`` (transformers
``from_pretrained`` of the twin), ``accelerate`` (disk offload), ``airllm`` (run by AirLLM's own
interpreter), and the bounds ``io-only`` and ``compute-only``. hermesd is imported only where it
runs, so the AirLLM interpreter needs only torch, transformers and airllm.

Reported: ``total_s`` (load + workload), ``latency_s`` and the workload's timings, ``peak_rss_bytes``
(VmHWM; hermesd resets it when a run starts, so the larger of the values read before and after),
``bytes_read`` (/proc/self/io read_bytes from before the load to the end), and an output digest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.harness import emit_json_line, proc_read_bytes, vm_hwm_bytes
from bench.scenarios import Scenario
from bench.workloads import make_inputs, output_record, run_workload

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _timed_workload(model: Any, args: argparse.Namespace, started: float, dtype: torch.dtype,
                    config: Any) -> dict[str, Any]:
    """Make the inputs (untimed), run the workload, and record timings, peak and output."""
    scenario: Scenario = args.scenario
    inputs = make_inputs(scenario, getattr(config, "vocab_size", None), dtype)
    load_s = time.perf_counter() - started
    peak_before = vm_hwm_bytes()
    timings, output = run_workload(model, scenario, inputs)
    result = {"load_s": load_s, "total_s": time.perf_counter() - started, **timings,
              "peak_before_workload": peak_before}
    result.update(output_record(output, args.output_out))
    return result


def run_hermesd(args: argparse.Namespace) -> dict[str, Any]:
    """hermesd.load with the plan the planner chose (``--plan``), then the workload."""
    import hermesd
    from hermesd.plan.budget import Plan

    plan = Plan.from_dict(json.loads(args.plan.read_text(encoding="utf-8"))["plan"])
    load = hermesd.load  # imports hermesd's engine modules: outside the clock, as every contender's imports are
    started = time.perf_counter()
    engine = load(args.store, plan=plan)
    result = _timed_workload(engine.model, args, started, getattr(torch, engine.manifest.dtype),
                             engine.model.config)
    stats = engine.stats
    result.update(plan=engine.plan.to_dict(), stats=stats.to_dict(timeline=args.timeline),
                  open_stats=engine.open_stats.to_dict(),
                  streamed_bytes=stats.bytes_read - stats.gathered_bytes,
                  bytes_per_pass=(stats.bytes_read - stats.gathered_bytes) / max(stats.passes, 1),
                  peak_before_workload=max(result["peak_before_workload"], stats.peak_rss_bytes))
    engine.close()
    return result


def run_compute_only(args: argparse.Namespace) -> dict[str, Any]:
    """All stages resident (read before the clock starts), then the workload: the compute bound."""
    import hermesd

    engine = hermesd.load(args.store, resident="all")
    engine.wait_resident()  # every weight in memory before the clock starts
    started = time.perf_counter()
    result = _timed_workload(engine.model, args, started, getattr(torch, engine.manifest.dtype), engine.model.config)
    result["peak_before_workload"] = max(result["peak_before_workload"], engine.stats.peak_rss_bytes)
    engine.close()
    return result


def run_io_only(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage read once by hermesd's reader, no compute: the read bound and cold bandwidth."""
    from bench.contenders import run_io_only as read_all

    result = read_all(argparse.Namespace(store=args.store, loaders=1), None)
    return result | {"latency_s": result["total_s"]}


def _architecture_class(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def run_standard(args: argparse.Namespace) -> dict[str, Any]:
    """transformers ``from_pretrained`` of the twin (the whole model in memory), then the workload."""
    cls = _architecture_class(args.scenario.architecture)
    started = time.perf_counter()
    model = cls.from_pretrained(args.twin, dtype=args.dtype).eval()
    return _timed_workload(model, args, started, args.dtype, model.config)


def run_accelerate(args: argparse.Namespace) -> dict[str, Any]:
    """transformers + accelerate: device_map="auto" under ``--cpu-memory``, the rest offloaded to disk."""
    from hermesd.units import parse_size

    cls = _architecture_class(args.scenario.architecture)
    with tempfile.TemporaryDirectory(prefix="bench-offload-") as offload:
        started = time.perf_counter()
        model = cls.from_pretrained(args.twin, dtype=args.dtype, device_map="auto", offload_folder=offload,
                                    max_memory={"cpu": parse_size(args.cpu_memory)}).eval()
        result = _timed_workload(model, args, started, args.dtype, model.config)
    placement: dict[str, int] = {}
    for device in getattr(model, "hf_device_map", {}).values():
        placement[str(device)] = placement.get(str(device), 0) + 1
    return result | {"placement": placement, "cpu_memory": args.cpu_memory}


def run_airllm(args: argparse.Namespace) -> dict[str, Any]:
    """AirLLM (per-layer shards it splits itself, once, into ``--airllm-shards``) on the CPU."""
    import airllm
    from airllm.airllm_base import AirLLMBaseModel

    # The random-weight twins have no tokenizer and the workload passes token ids, so a missing
    # tokenizer must not stop AirLLM's constructor (it loads one unconditionally).
    original = AirLLMBaseModel.get_tokenizer

    def tokenizer_or_none(self: Any, hf_token: Any = None) -> Any:
        try:
            return original(self, hf_token=hf_token)
        except (OSError, ValueError, TypeError):
            return None

    AirLLMBaseModel.get_tokenizer = tokenizer_or_none
    started = time.perf_counter()
    model = airllm.AutoModel.from_pretrained(str(args.twin), device="cpu", dtype=args.dtype,
                                             layer_shards_saving_path=str(args.airllm_shards))
    if args.prepare:  # split only (untimed preparation, like hermesd convert)
        return {"prepared": True, "seconds": time.perf_counter() - started}
    result = _timed_workload(model, args, started, args.dtype, model.config)
    return result | {"airllm_version": getattr(airllm, "__version__", None) or _dist_version("airllm")}


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "hermesd": run_hermesd, "hermesd-k0": run_hermesd, "compute-only": run_compute_only, "io-only": run_io_only,
    "standard": run_standard, "accelerate": run_accelerate, "airllm": run_airllm,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("contender", choices=sorted(RUNNERS))
    parser.add_argument("--scenario", required=True, help="the scenario as JSON (Scenario.to_json)")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--twin", type=Path)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--plan", type=Path, help="hermesd contenders: JSON from `hermesd plan --json`")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--cpu-memory", default="1GiB", help="accelerate's max_memory for the CPU")
    parser.add_argument("--airllm-shards", type=Path, help="where AirLLM keeps its per-layer split")
    parser.add_argument("--prepare", action="store_true", help="airllm: split the checkpoint and stop")
    parser.add_argument("--timeline", action="store_true", help="hermesd: keep the per-stage timeline")
    parser.add_argument("--output-out", type=Path, help="save the output (.npy) here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one contender and print its JSON line."""
    args = _parser().parse_args(argv)
    args.scenario = Scenario.from_dict(json.loads(args.scenario))
    args.dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    read_before = proc_read_bytes()
    with contextlib.redirect_stdout(sys.stderr):
        # Import the model's transformers module before any clock starts, for every contender alike.
        _architecture_class(args.scenario.architecture)
        result = RUNNERS[args.contender](args)
    result["peak_rss_bytes"] = max(vm_hwm_bytes(), result.pop("peak_before_workload", 0))
    result.update(name=args.contender, ok=True, threads=torch.get_num_threads(),
                  bytes_read=proc_read_bytes() - read_before)
    emit_json_line(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
