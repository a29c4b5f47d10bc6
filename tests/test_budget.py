"""Memory plans: the window bound, minimums, and fitting prefetch and residency under a budget."""

from __future__ import annotations

import pytest

from hermesd.errors import BudgetError
from hermesd.plan.budget import RUNTIME_MARGIN, activation_bytes, fit_plan, window_bytes
from hermesd.plan.ring import ring_stalls
from hermesd.plan.workload import Workload
from hermesd.store.manifest import Manifest, StageEntry

MIB = 1 << 20


def _manifest(sizes: dict[str, int]) -> Manifest:
    stages = [StageEntry(name=n, module=n, kind="block", file=f"{n}.safetensors", bytes=b, data_start=4096,
                         sha256="0" * 64, tensors={}) for n, b in sizes.items()]
    config = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 100}
    return Manifest(architecture="X", model_type="x", dtype="float32", config=config, stages=stages)


SIZES = {"embed": 1 * MIB, "h0": 10 * MIB, "h1": 10 * MIB, "h2": 10 * MIB, "head": 30 * MIB}


def _fit(**kwargs):
    manifest = _manifest(SIZES)
    return fit_plan(manifest, lambda name: SIZES[name], 100 * MIB, workload=Workload(prompt_tokens=8), **kwargs)


def test_window_is_the_largest_run_of_consecutive_stages_wrapping_around():
    assert window_bytes([1, 10, 10, 10, 30], 0) == 30
    assert window_bytes([1, 10, 10, 10, 30], 1) == 40
    assert window_bytes([1, 10, 10, 10, 30], 2) == 50
    assert window_bytes([30, 1, 10, 10, 10], 1) == 40, "the last stage and the next pass's first are adjacent"
    assert window_bytes([], 3) == 0 and window_bytes([5, 5], 9) == 10


def test_without_a_budget_the_requested_depth_gets_the_lean_window_ring():
    plan = _fit(prefetch=3)
    assert plan.prefetch == 3 and plan.resident == () and not plan.pool_stall_free
    assert plan.pool_bytes == window_bytes(list(SIZES.values()), 3) == 60 * MIB


def test_a_budget_with_room_buys_the_stall_free_ring_where_one_exists():
    sizes = list(SIZES.values())
    plan = _fit(prefetch=2, resident=[], budget=500 * MIB)
    assert plan.pool_stall_free and plan.pool_bytes == 61 * MIB > window_bytes(sizes, 2)
    assert ring_stalls(sizes, 2, plan.pool_bytes) == 0
    # At k=1 no ring up to 2 x the 30 MiB head avoids every stall: the plan keeps the bare window.
    lean = _fit(prefetch=1, resident=[], budget=500 * MIB)
    assert not lean.pool_stall_free and lean.pool_bytes == window_bytes(sizes, 1) == 40 * MIB


def test_budget_below_the_minimum_names_the_minimum():
    minimum = _fit(prefetch=0).peak_bound
    with pytest.raises(BudgetError) as caught:
        _fit(budget=minimum - 1)
    assert caught.value.minimum == minimum


def test_tight_budget_lowers_prefetch_before_refusing():
    plan_k0 = _fit(prefetch=0)
    plan = _fit(budget=plan_k0.peak_bound + 5 * MIB, prefetch=2, resident=[])
    assert plan.prefetch == 0


def test_budget_for_the_whole_model_keeps_every_stage_resident():
    plan = _fit(budget=100 * MIB + RUNTIME_MARGIN + sum(SIZES.values()) + 50 * MIB)
    assert plan.streamed == () and plan.pool_bytes == 0 and plan.prefetch == 0


def test_residency_prefers_stages_that_shrink_the_window():
    # Keeping the 30 MiB head resident costs only 10 MiB net (the k=1 window drops from 40 to 20 MiB):
    # 3 bytes saved per byte spent, against 1 for a block or the embedding.
    base = _fit(prefetch=1, resident=[])
    tight = base.peak_bound - base.pool_bytes + window_bytes(list(SIZES.values()), 1)
    plan = _fit(budget=tight + 12 * MIB, prefetch=1)
    assert plan.resident == ("head", "embed") and plan.peak_bound <= plan.budget
    assert _fit(budget=tight + 2 * MIB, prefetch=1).resident == ("embed",), "the head no longer fits"


def test_activation_estimate_grows_with_tokens():
    manifest = _manifest(SIZES)
    assert activation_bytes(manifest, Workload(prompt_tokens=1024)) > 4 * activation_bytes(manifest, Workload(prompt_tokens=256))
