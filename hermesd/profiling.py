"""The Layer Profiler: measure each stage's load and compute costs in a few passes over the model.

Passes (each reads the model once, page cache evicted before it):
1. warm-up: a short prompt (pays one-time kernel and allocator costs; causal LMs keep its KV cache);
2.-3. causal LMs only: two decode steps on that cache; the second gives each stage's decode compute
   (the first pays one-time kernel setup for one-token shapes: measured 2x slower on Llama-1B);
4. the reference prompt with no prefetch: each stage's cold O_DIRECT load and its compute, apart;
5. the reference prompt with one stage prefetched: how much compute slows while a loader reads.
Then a sample of stage files is read buffered, cold and warm, for the page-cache read speeds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from hermesd import memory
from hermesd.engine.engine import Engine
from hermesd.engine.reader import StageReader
from hermesd.engine.runstats import RunStats
from hermesd.plan.budget import compute_bytes, fit_plan
from hermesd.plan.profile import Profile, StageCost, fingerprint
from hermesd.store.manifest import Manifest

BUFFERED_SAMPLE_BYTES = 512 << 20
ProgressFn = Callable[[str], None]


def profile_passes(manifest: Manifest) -> int:
    """Passes over the model ``profile_store`` makes: five for causal LMs, three for the others."""
    return 5 if manifest.architecture.endswith(("ForCausalLM", "LMHeadModel")) else 3


def profile_store(store_dir: str | os.PathLike[str], reference_tokens: int = 128,
                  progress: ProgressFn | None = None, on_stage: Callable[[str], None] | None = None) -> Profile:
    """Measure a store on this machine in ``profile_passes`` passes over the model.

    progress: told what each pass is; on_stage: called with each stage's name as it runs (progress bars).
    """
    store_dir = Path(store_dir)
    say = progress or (lambda message: None)
    started = time.perf_counter()
    manifest = Manifest.load(store_dir)
    with _open(store_dir, manifest, prefetch=0, on_stage=on_stage) as engine:
        runtime = memory.rss_bytes() - engine.plan.pool_bytes
        causal = engine.manifest.architecture.endswith(("ForCausalLM", "LMHeadModel"))
        baseline = memory.rss_bytes()
        no_cache = {"use_cache": False} if causal else {}  # the KV cache is planned for separately
        passes = profile_passes(manifest)
        say(f"pass 1/{passes}: warm-up")
        warm_stats, cache = _pass(engine, store_dir, _inputs(engine, 8), **({"use_cache": True} if causal else {}))
        small_peak = warm_stats.peak_rss_bytes - baseline
        decode = {}
        if causal:
            next_token = {"input_ids": torch.ones((1, 1), dtype=torch.long)}
            for number in (2, 3):
                say(f"pass {number}/{passes}: a decode step")
                step, cache = _pass(engine, store_dir, next_token, past_key_values=cache, use_cache=True)
                small_peak = max(small_peak, step.peak_rss_bytes - baseline)  # a decode step may peak higher
            decode = {s.name: s.compute_s for s in step.stages}
        del cache
        say(f"pass {passes - 1}/{passes}: {reference_tokens}-token prompt, no prefetch")
        alone, _ = _pass(engine, store_dir, _inputs(engine, reference_tokens), **no_cache)
        reference_peak = alone.peak_rss_bytes - baseline
        spans = {entry.name: engine.reader.span(entry.name) for entry in manifest.stages}
        direct = engine.reader.direct
    say(f"pass {passes}/{passes}: {reference_tokens}-token prompt while a loader reads")
    with _open(store_dir, manifest, prefetch=1, on_stage=on_stage) as engine:
        overlapped, _ = _pass(engine, store_dir, _inputs(engine, reference_tokens), **no_cache)
    say("buffered read speed")
    buffered_cold, buffered_warm = _buffered_speeds(store_dir, manifest)
    per_token = max(reference_peak - small_peak, 0) / (reference_tokens - 8)
    by_name = {s.name: s for s in alone.stages}
    extra = compute_bytes(manifest)
    stages = [_stage_cost(entry, by_name.get(entry.name), decode, buffered_warm, spans[entry.name], extra[entry.name])
              for entry in manifest.stages]
    read_bytes = sum(s.bytes_read for s in alone.stages)
    return Profile(
        fingerprint=fingerprint(store_dir), reference_tokens=reference_tokens, runtime_bytes=runtime,
        activation_fixed_bytes=int(max(small_peak - 8 * per_token, 0)), activation_bytes_per_token=per_token,
        kv_bytes_per_token=_kv_bytes_per_token(manifest) if causal else 0,
        interference=max(1.0, overlapped.compute_s / max(alone.compute_s, 1e-9)),
        read_direct_gbps=read_bytes / max(alone.load_s, 1e-9) / 1e9 if direct else 0.0,
        read_buffered_gbps=buffered_cold, cores=len(os.sched_getaffinity(0)), causal=causal, stages=stages,
        profile_seconds=time.perf_counter() - started,
        notes=[f"read mode {'direct' if direct else 'buffered'}; page-cache read {buffered_warm:.2f} GB/s"])


def _open(store_dir: Path, manifest: Manifest, prefetch: int, on_stage: Callable[[str], None] | None = None) -> Engine:
    """The store with nothing resident and ``prefetch`` stages read ahead (the measuring setups)."""
    plan = fit_plan(manifest, StageReader(store_dir, manifest).span, memory.rss_bytes(), prefetch=prefetch)
    engine = Engine.open(store_dir, plan)
    engine.set_checkpoint(on_stage)
    return engine


def _pass(engine: Engine, store_dir: Path, inputs: dict, **options) -> tuple[RunStats, object]:
    """One forward with the store's pages evicted first; returns its stats and any KV cache."""
    _evict(store_dir)
    with torch.inference_mode():
        output = engine.model(**inputs, **options)
    return engine.stats, getattr(output, "past_key_values", None)


def _inputs(engine: Engine, tokens: int) -> dict[str, torch.Tensor]:
    """Reference inputs: token ids for text models; for image models, ``tokens`` images."""
    config = engine.model.config
    if engine.model.main_input_name == "pixel_values":
        size = config.image_size
        return {"pixel_values": torch.randn(max(tokens // 64, 1), config.num_channels, size, size)}
    vocab = getattr(config, "vocab_size", 1000)
    ids = torch.randint(1, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids}


def _stage_cost(entry, stats, decode: dict[str, float], warm_gbps: float, span: int, extra: int) -> StageCost:
    load_s = stats.load_s / max(stats.loads, 1) if stats else 0.0
    return StageCost(name=entry.name, kind=entry.kind, bytes=span, load_cold_s=load_s,
                     load_warm_s=span / (warm_gbps * 1e9) if warm_gbps else 0.0,
                     compute_prompt_s=stats.compute_s if stats else 0.0, compute_decode_s=decode.get(entry.name, 0.0),
                     compute_bytes=extra)


def _kv_bytes_per_token(manifest: Manifest) -> int:
    cfg = manifest.config
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 1
    kv_heads = cfg.get("num_key_value_heads") or heads
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or 0
    head_dim = cfg.get("head_dim") or hidden // heads
    element = 4 if manifest.dtype == "float32" else 2
    return 2 * layers * kv_heads * head_dim * element


def _buffered_speeds(store_dir: Path, manifest: Manifest) -> tuple[float, float]:
    """GB/s of buffered reads of a sample of stage files: cold (from disk), then warm (page cache)."""
    sample, total = [], 0
    for entry in sorted(manifest.stages, key=lambda s: -s.bytes):
        if total >= BUFFERED_SAMPLE_BYTES:
            break
        sample.append(store_dir / entry.file)
        total += entry.bytes
    _evict(store_dir)
    speeds = []
    for _ in range(2):
        started = time.perf_counter()
        for path in sample:
            with open(path, "rb", buffering=0) as handle:
                while handle.read(16 << 20):
                    pass
        speeds.append(total / max(time.perf_counter() - started, 1e-9) / 1e9)
    _evict(store_dir)
    return speeds[0], speeds[1]


def _evict(store_dir: Path) -> None:
    for path in (store_dir / "stages").glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
