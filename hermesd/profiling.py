"""The Layer Profiler: measure each stage's load and compute costs in a few passes over the model.

Passes (each reads the model once, page cache evicted before it):
1. warm-up: a short prompt (pays one-time kernel and allocator costs; causal LMs keep its KV cache);
2.-3. causal LMs only: two decode steps on that cache; the second gives each stage's decode compute
   (the first pays one-time kernel setup for one-token shapes: measured 2x slower on Llama-1B);
4. the reference prompt with no prefetch: each stage's cold O_DIRECT load and its compute, apart;
5. the reference prompt with one stage prefetched: how much compute slows while a loader reads, and
   the peak memory of a streamed run against the planner's model of it (the slack it misses);
6. the same with the loader on SCHED_IDLE: compute's slowdown then, and how much longer reads take;
   causal LMs run it with the KV cache on, and its extra peak over pass 5 is the cache's measured cost
   per token (GPT-2-XL: a 128-token forward with the cache peaked ~200 MiB higher, where the cache's
   own tensors are 75 MiB; the planner now takes the larger of the two).
Then a sample of stage files is read buffered, cold and warm, for the page-cache read speeds, and a
buffer is faulted in for load()'s cost of fresh memory. Before any pass, while the process is as fresh
as a one-shot run's, the largest stages are read the way a plan's resident stages first are, for the
CPU that costs.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from hermesd import memory
from hermesd.engine.bufferpool import prefault
from hermesd.engine.engine import Engine
from hermesd.engine.reader import StageReader
from hermesd.engine.runstats import RunStats
from hermesd.plan.budget import compute_bytes, fit_plan
from hermesd.plan.planner import evaluate
from hermesd.plan.profile import Profile, StageCost, fingerprint
from hermesd.plan.workload import Workload
from hermesd.store.manifest import Manifest
from hermesd.store.stages import model_class

BUFFERED_SAMPLE_BYTES = 512 << 20
FAULT_SAMPLE_BYTES = 256 << 20
FIRST_READ_SAMPLE = 3  # stages whose first read as a resident stage is timed
ProgressFn = Callable[[str], None]


def profile_passes(manifest: Manifest) -> int:
    """Passes over the model ``profile_store`` makes: six for causal LMs, four for the others."""
    return 6 if manifest.architecture.endswith(("ForCausalLM", "LMHeadModel")) else 4


def profile_store(store_dir: str | os.PathLike[str], reference_tokens: int = 128,
                  progress: ProgressFn | None = None, on_stage: Callable[[str], None] | None = None) -> Profile:
    """Measure a store on this machine in ``profile_passes`` passes over the model.

    progress: told what each pass is; on_stage: called with each stage's name as it runs (progress bars).
    """
    store_dir, say = Path(store_dir), progress or (lambda message: None)
    started, others, manifest = time.perf_counter(), OthersCpu(), Manifest.load(store_dir)
    model_class(manifest.architecture)  # imported before skeleton_s is timed (see Profile.skeleton_s)
    first_read_cpu = _first_read_cpu_s_per_gb(store_dir, manifest)
    with _open(store_dir, manifest, prefetch=0, on_stage=on_stage) as engine:
        runtime = memory.rss_bytes() - engine.plan.pool_bytes
        causal = engine.manifest.architecture.endswith(("ForCausalLM", "LMHeadModel"))
        baseline = memory.rss_bytes()
        no_cache = {"use_cache": False} if causal else {}  # the KV cache is planned for separately
        passes = profile_passes(manifest)
        skeleton_s = engine.open_stats.skeleton_s
        tokens = {"small": _token_count(engine, 8), "reference": _token_count(engine, reference_tokens)}
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
        say(f"pass {passes - 2}/{passes}: {reference_tokens}-token prompt, no prefetch")
        alone, _ = _pass(engine, store_dir, _inputs(engine, reference_tokens), **no_cache)
        reference_peak = alone.peak_rss_bytes - baseline
        spans = {entry.name: engine.reader.span(entry.name) for entry in manifest.stages}
        direct = engine.reader.direct
    overlapped, streamed_pool, idle = _loading_passes(store_dir, manifest, reference_tokens, causal, say, passes,
                                                     on_stage)
    say("buffered read speed, fault-in speed")
    buffered_cold, buffered_warm = _buffered_speeds(store_dir, manifest)
    fixed, per_token = _activations(small_peak, reference_peak, tokens["small"], tokens["reference"])
    by_name = {s.name: s for s in alone.stages}
    extra = compute_bytes(manifest)
    stages = [_stage_cost(entry, by_name.get(entry.name), decode, buffered_warm, spans[entry.name], extra[entry.name])
              for entry in manifest.stages]
    profile = Profile(
        fingerprint=fingerprint(store_dir), reference_tokens=tokens["reference"], runtime_bytes=runtime,
        activation_fixed_bytes=fixed, activation_bytes_per_token=per_token,
        kv_bytes_per_token=max(_kv_bytes_per_token(manifest), (idle.peak_rss_bytes - overlapped.peak_rss_bytes)
                               // tokens["reference"]) if causal else 0,
        interference=_slowdown(alone, overlapped),
        read_direct_gbps=sum(s.bytes_read for s in alone.stages) / max(alone.load_s, 1e-9) / 1e9 if direct else 0.0,
        read_buffered_gbps=buffered_cold, cores=len(os.sched_getaffinity(0)), causal=causal, stages=stages,
        profile_seconds=time.perf_counter() - started,
        interference_idle=_slowdown(alone, idle),
        idle_read_slowdown=max(1.0, idle.load_s / max(overlapped.load_s, 1e-9)),
        skeleton_s=skeleton_s, fault_gbps=_fault_gbps(), first_read_cpu_s_per_gb=first_read_cpu,
        notes=[f"read mode {'direct' if direct else 'buffered'}; page-cache read {buffered_warm:.2f} GB/s",
               *others.notes()])
    return replace(profile, peak_slack_bytes=_peak_slack(profile, overlapped.peak_rss_bytes, streamed_pool))


BUSY_NOTE = "busy machine"
BUSY_SHARE = 0.15  # of all CPUs used by other processes while profiling: the compute times are suspect


class OthersCpu:
    """CPU time other processes take from the moment this is made (``/proc/stat`` less our own).

    A profile measured beside another workload plans for a slower machine than it is: GPT-2-XL
    profiled during a benchmark measured 17.8 s of compute for a prompt that takes 4.1 s alone, and
    its planner then chose idle-priority loaders that starved the reads (load+run 8.5 s, 4.9 s with
    a quiet profile). The profile says so in its notes and ``hermesd profile`` warns.
    """

    def __init__(self) -> None:
        self.started, self.busy, self.own = time.perf_counter(), _busy_cpu_s(), time.process_time()

    def share(self) -> float:
        """Other processes' CPU time over all CPUs' time since creation (0 where /proc is missing)."""
        others = (_busy_cpu_s() - self.busy) - (time.process_time() - self.own)
        total = (time.perf_counter() - self.started) * (os.cpu_count() or 1)
        return max(0.0, others / total) if total > 0 else 0.0

    def notes(self) -> list[str]:
        """The profile note to record: one "busy machine" line above :data:`BUSY_SHARE`, else none."""
        share = self.share()
        if share < BUSY_SHARE:
            return []
        return [f"{BUSY_NOTE}: other processes used {share:.0%} of the CPUs while profiling, so the compute "
                f"times are likely too slow; run `hermesd profile --force` again when the machine is quiet"]


def _busy_cpu_s() -> float:
    """CPU seconds all CPUs have spent busy since boot (/proc/stat: all but idle and iowait)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:8]]
    except (OSError, ValueError):
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _loading_passes(store_dir: Path, manifest: Manifest, tokens: int, causal: bool, say: ProgressFn,
                    passes: int, on_stage: Callable[[str], None] | None) -> tuple[RunStats, int, RunStats]:
    """The reference prompt with a loader at normal priority (no KV cache), then at idle priority
    (the KV cache on for causal LMs); returns both runs' stats and the first one's ring size."""
    say(f"pass {passes - 1}/{passes}: {tokens}-token prompt while a loader reads")
    with _open(store_dir, manifest, prefetch=1, on_stage=on_stage) as engine:
        overlapped, _ = _pass(engine, store_dir, _inputs(engine, tokens), **({"use_cache": False} if causal else {}))
        streamed_pool = engine.plan.pool_bytes
    say(f"pass {passes}/{passes}: {tokens}-token prompt while an idle-priority loader reads")
    with _open(store_dir, manifest, prefetch=1, priority="idle", on_stage=on_stage) as engine:
        # With the KV cache on (causal LMs): its peak over pass 5's is what the cache really costs.
        idle, _ = _pass(engine, store_dir, _inputs(engine, tokens), **({"use_cache": True} if causal else {}))
    return overlapped, streamed_pool, idle


def _slowdown(alone: RunStats, loading: RunStats) -> float:
    """Compute's slowdown while loading: the median over stages of their compute time ratio (>= 1).

    Per stage, not in total: on a shared machine another process's burst lands on a few stages of one
    pass, and a ratio of totals took all of it as interference (1.29 measured for BERT-large on a loaded
    machine, the same with idle and normal loaders)."""
    before = {s.name: s.compute_s for s in alone.stages}
    ratios = sorted(s.compute_s / before[s.name] for s in loading.stages if before.get(s.name, 0) > 1e-3)
    if not ratios:
        return max(1.0, loading.compute_s / max(alone.compute_s, 1e-9))
    middle = len(ratios) // 2
    median = ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2
    return max(1.0, median)


def _peak_slack(profile: Profile, measured: int, pool_bytes: int) -> int:
    """What the planner's peak for the streamed reference pass (k=1, that pass's ring) misses of its
    measured peak; 0 when the model covered it."""
    pinned = [s.name for s in profile.stages if s.kind == "pinned"]
    model = evaluate(profile, Workload(prompt_tokens=profile.reference_tokens), 1, pinned, None)
    predicted = model.peak_bytes - model.plan.pool_bytes + pool_bytes
    return max(0, measured - predicted)


def _fault_gbps(size: int = FAULT_SAMPLE_BYTES) -> float:
    """GB/s at which fresh memory is faulted in on all cores, as load() does it."""
    with ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0)))) as executor:
        started = time.perf_counter()
        memory = prefault(size, executor).result()
        seconds = time.perf_counter() - started
    memory.close()
    return size / max(seconds, 1e-9) / 1e9


def _first_read_cpu_s_per_gb(store_dir: Path, manifest: Manifest) -> float:
    """CPU seconds per GB of a resident stage's first read (mapped, read and touched, as engine.resident
    does it), on its own thread: the median over the largest stages, cache evicted first.

    Measured first, in a process as fresh as a one-shot run's: pages freed moments ago are cheap to
    reuse, and a later sample would find them. On a VM whose balloon reports free memory to the host,
    fresh pages fault on the host at their first touch: 0.1-0.9 s/GB measured here, against 0.02 s/GB
    for a streamed stage's O_DIRECT read into the ring, which is reused."""
    reader = StageReader(store_dir, manifest)
    largest = sorted((s for s in manifest.stages if s.kind != "pinned"), key=lambda s: -s.bytes)
    _evict(store_dir)
    rates = []
    for entry in largest[:FIRST_READ_SAMPLE]:
        stage = reader.map(entry.name)
        try:
            first = stage.populate()
        finally:
            stage.drop()
        rates.append(first.cpu_s / max(first.bytes_read, 1) * 1e9)
    return statistics.median(rates) if rates else 0.0


def _open(store_dir: Path, manifest: Manifest, prefetch: int, priority: str = "normal",
          on_stage: Callable[[str], None] | None = None) -> Engine:
    """The store with nothing resident and ``prefetch`` stages read ahead (the measuring setups);
    ``on_stage`` is called with each stage's name as it runs."""
    plan = fit_plan(manifest, StageReader(store_dir, manifest).span, memory.rss_bytes(), prefetch=prefetch)
    engine = Engine.open(store_dir, replace(plan, loader_priority=priority))
    engine.wait_resident()  # the passes measure streamed loads and compute, not the pinned stages' first reads
    engine.set_checkpoint(on_stage)
    return engine


def _pass(engine: Engine, store_dir: Path, inputs: dict, **options) -> tuple[RunStats, object]:
    """One forward with the store's pages evicted first; returns its stats and any KV cache."""
    _evict(store_dir)
    with torch.inference_mode():
        output = engine.model(**inputs, **options)
    return engine.stats, getattr(output, "past_key_values", None)


def _inputs(engine: Engine, tokens: int) -> dict[str, torch.Tensor]:
    """Reference inputs: ``tokens`` token ids for text models; for image models one image per 64 tokens."""
    config = engine.model.config
    if engine.model.main_input_name == "pixel_values":
        size = config.image_size
        return {"pixel_values": torch.randn(_images(tokens), config.num_channels, size, size)}
    vocab = getattr(config, "vocab_size", 1000)
    ids = torch.randint(1, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids}


def _token_count(engine: Engine, tokens: int) -> int:
    """Tokens ``_inputs(engine, tokens)`` puts through the model, in the unit of ``hermesd plan --workload``:
    token ids, or for an image model its patches plus the class token per image. (Counted as the
    requested ``tokens`` before, a ViT-large profile of 2 images said 128 tokens where they were 394,
    and plans predicted its 4-image forward at 14.3 s where it ran in 4.4 s.)"""
    config = engine.model.config
    if engine.model.main_input_name != "pixel_values":
        return tokens
    patches = (config.image_size // getattr(config, "patch_size", 16)) ** 2
    return _images(tokens) * (patches + 1)


def _images(tokens: int) -> int:
    """Images a pass of an image model takes where a text model would take ``tokens`` tokens."""
    return max(tokens // 64, 1)


def _activations(small_peak: int, reference_peak: int, small_tokens: int, reference_tokens: int) -> tuple[int, float]:
    """(fixed bytes, bytes per token) of activations, from two passes' peaks over their token counts."""
    per_token = max(reference_peak - small_peak, 0) / max(reference_tokens - small_tokens, 1)
    return int(max(small_peak - small_tokens * per_token, 0)), per_token


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
