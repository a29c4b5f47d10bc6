"""One benchmark contender per process: ``python -m bench.contenders NAME --store S --twin T ...``.

Prints one JSON line on stdout (everything else goes to stderr). Times are perf_counter seconds;
``peak_rss_bytes`` is the whole process's peak. hermesd resets VmHWM when a run starts, so the peak
is the larger of VmHWM read just before the forward and VmHWM at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import transformers.models.gpt2.modeling_gpt2  # noqa: F401  (imported before any clock starts)

from bench.harness import emit_json_line, make_cold, median, vm_hwm_bytes, weight_files


def input_ids(tokens: int, seed: int, vocab: int) -> torch.Tensor:
    """The prompt every contender runs: [1, tokens] ids drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, tokens), generator=generator)


def logits_record(logits: torch.Tensor, out_path: Path | None) -> dict[str, Any]:
    """Checksums of the logits; the last position's row is saved to ``out_path`` (.npy) if given."""
    last = logits[0, -1].detach().to(torch.float32).numpy()
    if out_path is not None:
        np.save(out_path, last, allow_pickle=False)
    return {"logits_sum": float(logits.sum(dtype=torch.float64)), "last_argmax": int(last.argmax()),
            "logits_shape": list(logits.shape)}


def _forward(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    with torch.inference_mode():
        started = time.perf_counter()
        logits = model(ids, use_cache=False).logits
        return logits, time.perf_counter() - started


def run_hermesd(args: argparse.Namespace, ids: torch.Tensor, prefetch: int | None) -> dict[str, Any]:
    """hermesd.load (no weights read) then ``--forwards`` streamed forwards, the page cache evicted
    before each: the first is a fresh process's latency, the later ones a long-lived daemon's."""
    import hermesd

    started = time.perf_counter()
    engine = hermesd.load(args.store, prefetch=prefetch)
    load_s = time.perf_counter() - started
    peak_before = vm_hwm_bytes()
    logits, forward_s = _forward(engine.model, ids)
    total_s = time.perf_counter() - started
    result = {"total_s": total_s, "load_s": load_s, "forward_s": forward_s, "plan": engine.plan.to_dict(),
              "stats": engine.stats.to_dict()}
    result.update(logits_record(logits, args.logits_out))
    del logits  # the warm forwards' peaks should not include the first forward's output
    peaks, warm = [peak_before, engine.stats.peak_rss_bytes], []
    for _ in range(args.forwards - 1):
        make_cold(weight_files(args.store))
        warm.append(_forward(engine.model, ids)[1])
        peaks.append(engine.stats.peak_rss_bytes)
    if warm:
        result.update(warm_forward_s=median(warm), warm_forward_times_s=warm, warm_stats=engine.stats.to_dict())
    result["peak_before_forward"] = max(peaks)
    engine.close()
    return result


def run_io_only(args: argparse.Namespace, ids: torch.Tensor) -> dict[str, Any]:
    """Every stage read once with hermesd's reader on ``--loaders`` threads (alternate stages), no compute."""
    from hermesd.engine.bufferpool import map_memory
    from hermesd.engine.reader import StageReader
    from hermesd.store.manifest import Manifest

    manifest = Manifest.load(args.store)
    reader = StageReader(args.store, manifest)
    names = [s.name for s in manifest.stages]
    counts = [0] * args.loaders
    errors: list[BaseException] = []

    def loader(slot: int) -> None:
        # One pre-faulted buffer per thread, reused, as the engine's pool is.
        largest = max(reader.span(name) for name in names[slot :: args.loaders])
        view = memoryview(map_memory(largest))
        try:
            for name in names[slot :: args.loaders]:
                counts[slot] += reader.read(name, view)[1]
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=loader, args=(slot,)) for slot in range(args.loaders)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    read = sum(counts)
    return {"total_s": seconds, "bytes_read": read, "read_mode": reader.read_mode, "loaders": args.loaders,
            "gb_per_s": read / seconds / 1e9}


def run_compute_only(args: argparse.Namespace, ids: torch.Tensor) -> dict[str, Any]:
    """Every stage resident (loaded untimed), then ``--forwards`` timed forwards."""
    import hermesd

    started = time.perf_counter()
    engine = hermesd.load(args.store, resident="all")
    engine.wait_resident()  # every weight in memory before the forwards are timed
    load_s = time.perf_counter() - started
    peak_before = vm_hwm_bytes()
    times, peaks = [], []
    for _ in range(args.forwards):
        logits, seconds = _forward(engine.model, ids)
        times.append(seconds)
        peaks.append(engine.stats.peak_rss_bytes)
    # The first forward of a process pays one-time costs (kernel selection, allocator warm-up), as a
    # fresh hermesd process does; later forwards are a long-lived process's compute time.
    result = {"first_forward_s": times[0], "forward_s": median(times[1:] or times), "forward_times_s": times,
              "load_s": load_s, "peak_before_forward": max([peak_before, *peaks])}
    result.update(logits_record(logits, args.logits_out))
    engine.close()
    return result


def run_standard(args: argparse.Namespace, ids: torch.Tensor) -> dict[str, Any]:
    """transformers from_pretrained of the twin (all in memory), then one forward."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.twin, dtype=torch.float32)
    load_s = time.perf_counter() - started
    logits, forward_s = _forward(model, ids)
    result = {"total_s": time.perf_counter() - started, "load_s": load_s, "forward_s": forward_s}
    result.update(logits_record(logits, args.logits_out))
    return result


def run_accelerate(args: argparse.Namespace, ids: torch.Tensor) -> dict[str, Any]:
    """transformers + accelerate: device_map="auto" under a 1 GiB CPU cap, the rest offloaded to disk."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="bench-offload-") as offload:
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            args.twin, dtype=torch.float32, device_map="auto", max_memory={"cpu": args.cpu_memory},
            offload_folder=offload)
        load_s = time.perf_counter() - started
        logits, forward_s = _forward(model, ids)
        total_s = time.perf_counter() - started
        offload_bytes = sum(p.stat().st_size for p in Path(offload).rglob("*") if p.is_file())
    placement: dict[str, int] = {}
    for device in getattr(model, "hf_device_map", {}).values():
        placement[str(device)] = placement.get(str(device), 0) + 1
    result = {"total_s": total_s, "load_s": load_s, "forward_s": forward_s, "placement": placement,
              "offload_folder_bytes": offload_bytes, "cpu_memory": args.cpu_memory}
    result.update(logits_record(logits, args.logits_out))
    return result


CONTENDERS: dict[str, Callable[[argparse.Namespace, torch.Tensor], dict[str, Any]]] = {
    "hermesd": lambda args, ids: run_hermesd(args, ids, prefetch=None),  # the engine's default plan
    "hermesd-k2": lambda args, ids: run_hermesd(args, ids, prefetch=2),
    "hermesd-k0": lambda args, ids: run_hermesd(args, ids, prefetch=0),
    "io-only": run_io_only,
    "compute-only": run_compute_only,
    "standard": run_standard,
    "accelerate": run_accelerate,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.contenders", description=__doc__)
    parser.add_argument("name", choices=sorted(CONTENDERS))
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--twin", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--logits-out", type=Path, help="write the last position's logits here (.npy)")
    parser.add_argument("--forwards", type=int, default=3, help="timed forwards of compute-only and hermesd")
    parser.add_argument("--loaders", type=int, default=1,
                        help="reader threads of io-only (1: one sequential reader, the fastest on the dev disk)")
    parser.add_argument("--cpu-memory", default="1GiB", help="accelerate's max_memory for the CPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one contender and print its JSON line."""
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = input_ids(args.tokens, args.seed, args.vocab)
    with contextlib.redirect_stdout(sys.stderr):
        result = CONTENDERS[args.name](args, ids)
    result["peak_rss_bytes"] = max(vm_hwm_bytes(), result.pop("peak_before_forward", 0))
    result.update(name=args.name, ok=True, threads=torch.get_num_threads(), tokens=args.tokens)
    emit_json_line(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
