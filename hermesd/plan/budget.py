"""Memory plans: which stages stay resident, how deep to prefetch, and what that costs in memory.

Peak memory of a streamed run is bounded by
    runtime (what the process holds before weights) + resident stages + the buffer pool
    + activations and KV cache for the workload.
The pool is a ring (see bufferpool). It needs at least the largest sum of (depth + 1) consecutive
streamed stages (the window), which is what it gets without a budget. With a budget that allows it,
it gets the smallest size at which it never holds back prefetch, at most (depth + 1) x the largest stage.
This module computes that bound and fits a plan under a budget. It is deliberately simple; the
profiled Pipeline Planner (hermesd.plan.planner) chooses among plans by predicted latency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from hermesd.errors import BudgetError
from hermesd.plan.ring import ring_stalls, smallest_stall_free_ring
from hermesd.plan.workload import DEFAULT_WORKLOAD, Workload
from hermesd.store.manifest import Manifest
from hermesd.units import format_size

# Growth of the runtime during the first run (oneDNN primitives, thread pools, allocator caches),
# measured at 30-60 MiB on GPT-2 and Llama shapes here; rounded up.
RUNTIME_MARGIN = 96 << 20
# Two stages ahead on the bare window ring. Three alternating GPT-2-XL benchmark runs had k=2 ahead of
# k=1 every time (3.07/3.45/3.22 s vs 3.16/4.21/3.54 s): a deeper queue absorbs disk jitter. An A/B
# of ring sizes gave waits of 0.10 s (stall-free ring, 541 MiB), 0.15 s (window, 424 MiB) and 0.24 s
# (k=1), with peaks of ~960, ~845 and ~900 MiB. Without a budget the lean window wins; with one the
# planner weighs the roomier ring.
DEFAULT_PREFETCH = 2


@dataclass(frozen=True)
class Plan:
    """Which stages stream and which stay, and the memory bound that follows."""

    prefetch: int
    loaders: int
    resident: tuple[str, ...]
    streamed: tuple[str, ...]
    pool_bytes: int
    pool_stall_free: bool
    resident_bytes: int
    activation_bytes: int
    runtime_bytes: int
    budget: int | None

    @property
    def peak_bound(self) -> int:
        return self.runtime_bytes + self.resident_bytes + self.pool_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return asdict(self) | {"peak_bound": self.peak_bound}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        fields = {k: v for k, v in data.items() if k != "peak_bound"}
        return cls(**{**fields, "resident": tuple(fields["resident"]), "streamed": tuple(fields["streamed"])})


def window_bytes(sizes: list[int], depth: int) -> int:
    """Largest total of ``depth + 1`` consecutive entries, wrapping around (passes repeat)."""
    if not sizes:
        return 0
    width = min(depth + 1, len(sizes))
    ring = sizes + sizes[: width - 1]
    return max(sum(ring[i : i + width]) for i in range(len(sizes)))


def activation_bytes(manifest: Manifest, workload: Workload) -> int:
    """Upper estimate of activations plus KV cache for ``workload`` (fp32 scores and logits)."""
    cfg = manifest.config
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model", default=1024)
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers", default=24)
    heads = _first(cfg, "num_attention_heads", "n_head", default=16)
    kv_heads = _first(cfg, "num_key_value_heads", default=heads)
    inner = _first(cfg, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden
    vocab = _first(cfg, "vocab_size", "num_labels", default=2)
    elem = 4 if manifest.dtype == "float32" else 2
    rows = workload.batch * workload.tokens
    hidden_states = rows * (8 * hidden + 2 * inner) * elem
    scores = workload.batch * heads * workload.tokens * workload.tokens * 4
    logits = rows * vocab * 4
    kv_cache = 2 * layers * rows * kv_heads * (hidden // max(heads, 1)) * elem
    return hidden_states + scores + logits + kv_cache


def compute_bytes(manifest: Manifest) -> dict[str, int]:
    """Stage name -> memory its compute holds beside its weights while bound (quantized kernels' tables)."""
    if not any(stage.quant for stage in manifest.stages):
        return {stage.name: 0 for stage in manifest.stages}
    from hermesd.store.quantized import stage_compute_bytes  # torch: only for quantized stores

    return stage_compute_bytes(manifest)


def _first(cfg: dict, *keys: str, default: int) -> int:
    for key in keys:
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return default


def fit_plan(manifest: Manifest, read_bytes: Callable[[str], int], runtime_bytes: int, *,
             budget: int | None = None, prefetch: int | None = None, resident: list[str] | str | None = None,
             loaders: int | None = None, workload: Workload = DEFAULT_WORKLOAD) -> Plan:
    """The plan for these settings; with a budget, the deepest prefetch and most residency that fit."""
    pinned = [s.name for s in manifest.stages if s.kind == "pinned"]
    names = [s.name for s in manifest.stages]
    fixed = resident is not None
    chosen = names if resident == "all" else _checked_names(resident or [], names)
    chosen = list(dict.fromkeys(pinned + list(chosen)))
    depth = DEFAULT_PREFETCH if prefetch is None else max(0, prefetch)
    act = activation_bytes(manifest, workload)
    extra = compute_bytes(manifest)

    def make(depth: int, keep: list[str], roomy: bool = False) -> Plan:
        streamed = [n for n in names if n not in keep]
        sizes = [read_bytes(n) for n in streamed]
        pool = window_bytes(sizes, depth)
        if roomy and sizes:
            ring = smallest_stall_free_ring(sizes, depth, pool, max(pool, (depth + 1) * max(sizes)))
            roomy = ring_stalls(sizes, depth, ring) == 0  # none may exist within the bound
            pool = ring if roomy else pool
        return Plan(
            prefetch=depth if streamed else 0, loaders=max(1, min(loaders or depth, depth)) if streamed else 0,
            resident=tuple(keep), streamed=tuple(streamed), pool_bytes=pool, pool_stall_free=roomy,
            resident_bytes=sum(read_bytes(n) + extra[n] for n in keep),
            activation_bytes=act + max((extra[n] for n in streamed), default=0),
            runtime_bytes=runtime_bytes + RUNTIME_MARGIN, budget=budget)

    if budget is None:
        return make(depth, chosen)
    minimum = make(0, pinned)
    if minimum.peak_bound > budget:
        raise BudgetError(budget, minimum.peak_bound, breakdown(minimum))
    while depth > 0 and make(depth, chosen).peak_bound > budget:
        depth -= 1
    plan = make(depth, chosen)
    if plan.peak_bound > budget:
        raise BudgetError(budget, plan.peak_bound, "the requested resident stages do not fit; " + breakdown(plan))
    if not fixed:
        plan = _add_resident(plan, names, make)
    roomy = make(plan.prefetch, list(plan.resident), roomy=True)
    return roomy if roomy.peak_bound <= budget else plan


def _add_resident(plan: Plan, names: list[str], make: Callable[[int, list[str]], Plan]) -> Plan:
    """Greedily keep stages resident, best bytes-saved per byte-of-memory first, while under budget."""
    while plan.streamed:
        best, best_ratio = None, 0.0
        for name in plan.streamed:
            trial = make(plan.prefetch, list(plan.resident) + [name])
            cost = trial.peak_bound - plan.peak_bound
            if trial.peak_bound <= plan.budget:
                saved = trial.resident_bytes - plan.resident_bytes
                ratio = float("inf") if cost <= 0 else saved / cost
                if ratio > best_ratio:
                    best, best_ratio = trial, ratio
        if best is None:
            return plan
        plan = best
    return plan


def _checked_names(requested: list[str], names: list[str]) -> list[str]:
    unknown = [n for n in requested if n not in names]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the store's stages are {names}")
    return requested


def breakdown(plan: Plan) -> str:
    """Where a plan's peak bound goes, for messages."""
    return (f"runtime {format_size(plan.runtime_bytes)} + resident {format_size(plan.resident_bytes)} + "
            f"stage buffers {format_size(plan.pool_bytes)} + activations {format_size(plan.activation_bytes)}")
