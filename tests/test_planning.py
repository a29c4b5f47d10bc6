"""planning.resolve, the one place that decides a plan: automatic budgets from the memory that is there,
explicit settings, saved plans; and the planner spending a roomy budget on resident stages."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import hermesd
from bench.cgroup import run_capped, unavailable_reason
from hermesd.plan.planner import choose_plan
from hermesd.plan.profile import Profile, StageCost
from hermesd.plan.workload import Workload
from hermesd.planning import AUTO_LIMIT_SHARE, AUTO_MARGIN_MIN, auto_budget, resolve
from hermesd.watchdog.sensors import MemoryReading

GiB = 1 << 30


def test_auto_budget_is_rss_plus_free_memory_less_a_margin_capped_below_the_watchdog():
    from hermesd import memory

    roomy = MemoryReading(used_bytes=2 * GiB, limit_bytes=24 * GiB, source="meminfo")
    assert auto_budget(roomy) == int(24 * GiB * AUTO_LIMIT_SHARE)  # 22 GiB free: the share caps it
    busy = MemoryReading(used_bytes=20 * GiB, limit_bytes=24 * GiB, source="meminfo")
    assert auto_budget(busy) == pytest.approx(memory.rss_bytes() + 4 * GiB * 0.9, abs=32 << 20)  # RSS moves a bit
    tight = MemoryReading(used_bytes=900 << 20, limit_bytes=1 * GiB, source="cgroup1:/x")
    assert auto_budget(tight) <= int(GiB * AUTO_LIMIT_SHARE)
    full = MemoryReading(used_bytes=GiB, limit_bytes=GiB, source="cgroup2:/y")
    assert auto_budget(full) <= memory.rss_bytes() + AUTO_MARGIN_MIN  # nothing free: no more than now


def test_no_budget_keeps_the_model_resident_where_memory_allows(converted):
    store = converted("llama").store
    ids = torch.arange(1, 33)[None, :]
    with hermesd.load(store) as engine:  # no budget, no settings: "auto"
        assert engine.plan.budget is not None and not engine.plan.streamed, engine.plan
        with torch.inference_mode():
            first = engine.model(ids).logits
            again = engine.model(ids).logits
        # no stage loads; only the batch's embedding rows are gathered (kilobytes)
        assert engine.stats.bytes_read == engine.stats.gathered_bytes <= 64 << 10, engine.stats
    with hermesd.load(store, prefetch=2) as engine:  # explicit settings alone: stream as told
        assert engine.plan.budget is None and not engine.plan.resident
        with torch.inference_mode():
            streamed = engine.model(ids).logits
    assert torch.equal(first, again) and torch.equal(first, streamed)
    assert resolve(store, "auto").plan.budget == pytest.approx(auto_budget(), rel=0.05)


def _profile(stages: int, stage_bytes: int, compute_s: float, load_s: float) -> Profile:
    costs = [StageCost(name=f"b{i}", kind="block", bytes=stage_bytes, load_cold_s=load_s, load_warm_s=load_s / 4,
                       compute_prompt_s=compute_s, compute_decode_s=compute_s / 10) for i in range(stages)]
    return Profile(fingerprint={}, reference_tokens=128, runtime_bytes=300 << 20, activation_fixed_bytes=10 << 20,
                   activation_bytes_per_token=4096, kv_bytes_per_token=1024, interference=1.0,
                   read_direct_gbps=1.2, read_buffered_gbps=1.0, cores=2, causal=True, stages=costs)


def test_a_compute_bound_model_still_gets_the_memory_its_budget_grants():
    # 22 stages of 88 MiB whose compute hides every load: residency saves no predicted time, but each
    # streamed stage is read again every pass. A 3 GiB budget must hold the 1.9 GiB model.
    profile = _profile(22, 88 << 20, compute_s=0.5, load_s=0.07)
    roomy = choose_plan(profile, 3 * GiB, Workload(128, 32))
    assert not roomy.plan.streamed and roomy.peak_bytes <= 3 * GiB
    tight = choose_plan(profile, 1200 << 20, Workload(128, 32))
    assert tight.plan.streamed and tight.plan.resident and tight.peak_bytes <= 1200 << 20


CHILD = """
import json, sys
from hermesd.planning import auto_budget, resolve
from hermesd.watchdog.sensors import read_memory
reading = read_memory()
resolved = resolve(sys.argv[1])
print(json.dumps({"auto": auto_budget(), "limit": reading.limit_bytes, "source": reading.source,
                  "plan_budget": resolved.plan.budget, "peak_bound": resolved.plan.peak_bound}))
"""


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_auto_budget_under_a_real_cgroup_cap_plans_below_the_cap(converted):
    cap = 600 << 20
    run = run_capped([sys.executable, "-c", CHILD, str(converted("gpt2").store)], cap, timeout=120)
    assert run.returncode == 0 and run.oom_kills == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["source"].startswith("cgroup") and report["limit"] == cap
    assert report["auto"] <= cap * AUTO_LIMIT_SHARE and report["plan_budget"] == report["auto"]
    assert report["peak_bound"] <= report["auto"]
