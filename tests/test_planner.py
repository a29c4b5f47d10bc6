"""The Pipeline Planner on synthetic profiles: pure inputs, checked outputs."""

from __future__ import annotations

import pytest

from hermesd.errors import BudgetError
from hermesd.plan.planner import choose_plan, explain, minimum_budget, simulate
from hermesd.plan.profile import Profile, StageCost
from hermesd.plan.workload import Workload

MIB = 1 << 20


def _profile(load_s: float, compute_s: float, blocks: int = 8, head_mib: int = 30,
             interference: float = 1.0) -> Profile:
    """Embedding (tiny), ``blocks`` blocks of 10 MiB, then a head; costs per stage as given."""
    stages = [StageCost("embed", "rest", 1 * MIB, 0.001, 0.0005, 0.001)]
    stages += [StageCost(f"h{i}", "block", 10 * MIB, load_s, load_s / 4, compute_s, compute_s / 20)
               for i in range(blocks)]
    stages.append(StageCost("head", "rest", head_mib * MIB, load_s * head_mib / 10, 0.0, compute_s / 2, 0.001))
    return Profile(fingerprint={}, reference_tokens=128, runtime_bytes=100 * MIB, activation_fixed_bytes=5 * MIB,
                   activation_bytes_per_token=1024, kv_bytes_per_token=2048, interference=interference,
                   read_direct_gbps=1.0, read_buffered_gbps=1.0, cores=2, causal=True, stages=stages)


def _model_bytes(profile: Profile) -> int:
    return sum(s.bytes for s in profile.stages)


def test_io_bound_latency_is_the_disk_time_plus_the_last_compute():
    profile = _profile(load_s=0.1, compute_s=0.01)
    latency, io, compute, _ = simulate(profile, Workload(), set(), depth=2)
    assert io == pytest.approx(0.001 + 8 * 0.1 + 0.3)
    assert latency == pytest.approx(io + 0.005, rel=1e-6), "compute hides behind the disk except the head's"


def test_compute_bound_latency_is_compute_plus_the_first_load():
    profile = _profile(load_s=0.01, compute_s=0.1, head_mib=10)
    latency, io, compute, _ = simulate(profile, Workload(), set(), depth=1)
    assert compute == pytest.approx(0.001 + 0.8 + 0.05)
    # The embedding loads (1 ms), then h0's load (10 ms) hides the embedding's compute; after that
    # every load hides behind a 100 ms block.
    assert latency == pytest.approx(0.001 + 0.01 + 0.8 + 0.05, rel=1e-6)


def test_without_prefetch_loads_and_compute_add_up():
    profile = _profile(load_s=0.05, compute_s=0.05)
    latency, io, compute, _ = simulate(profile, Workload(), set(), depth=0)
    assert latency == pytest.approx(io + compute)


def test_io_bound_budget_buys_resident_stages():
    # Prefetch can only hide compute, and there is little here: each resident byte is worth more.
    profile = _profile(load_s=0.1, compute_s=0.01)
    tight = choose_plan(profile, minimum_budget(profile, Workload()) + 25 * MIB)
    roomy = choose_plan(profile, 100 * MIB + _model_bytes(profile) + 64 * MIB)
    assert tight.peak_bytes <= tight.plan.budget and tight.plan.resident
    assert roomy.latency_s < tight.latency_s
    assert len(roomy.plan.resident) > len(tight.plan.resident)


def test_prefetch_pays_when_loads_and_compute_are_balanced():
    profile = _profile(load_s=0.05, compute_s=0.05, head_mib=10)
    plan = choose_plan(profile, minimum_budget(profile, Workload()) + 12 * MIB)
    no_prefetch = choose_plan(profile, minimum_budget(profile, Workload()) + 12 * MIB, depths=range(1))
    assert plan.plan.prefetch >= 1
    assert plan.latency_s < 0.7 * no_prefetch.latency_s, "overlap hides about half of the time"


def test_budget_holding_the_whole_model_keeps_everything_resident():
    for load_s, compute_s in ((0.1, 0.01), (0.01, 0.1)):
        profile = _profile(load_s, compute_s, interference=1.1)
        best = choose_plan(profile, 100 * MIB + _model_bytes(profile) + 64 * MIB)
        assert best.plan.streamed == () and best.plan.pool_bytes == 0
        assert best.latency_s == pytest.approx(best.compute_s), "no streaming tax at all"


def test_residency_goes_first_to_what_loading_would_cost_most():
    # I/O bound: the 30 MiB head costs 0.3 s to load and its wait is exposed at the end of the pass.
    profile = _profile(load_s=0.1, compute_s=0.01)
    plan = choose_plan(profile, minimum_budget(profile, Workload()) + 45 * MIB).plan
    assert "head" in plan.resident


def test_budget_below_minimum_names_the_minimum():
    profile = _profile(load_s=0.1, compute_s=0.01)
    minimum = minimum_budget(profile, Workload())
    assert minimum == 100 * MIB + 30 * MIB + 5 * MIB + 128 * 1024 + 128 * 2048
    with pytest.raises(BudgetError) as caught:
        choose_plan(profile, minimum - 1)
    assert caught.value.minimum == minimum


def test_generation_workload_counts_decode_passes_and_kv_cache():
    profile = _profile(load_s=0.02, compute_s=0.05)
    budget = minimum_budget(profile, Workload(128, 32)) + 25 * MIB  # room for at most two resident blocks
    prompt_only = choose_plan(profile, budget, Workload(128, 0))
    generate = choose_plan(profile, budget, Workload(128, 32))
    assert generate.latency_s > prompt_only.latency_s + 31 * 6 * 0.02, "every decode pass streams the weights"
    assert generate.plan.activation_bytes - prompt_only.plan.activation_bytes == 32 * 2048
    unlimited = choose_plan(profile, None, Workload(128, 32))
    assert unlimited.plan.streamed == (), "with memory to spare, nothing streams"


def test_explain_says_why():
    profile = _profile(load_s=0.1, compute_s=0.01)
    prediction = choose_plan(profile, minimum_budget(profile, Workload()) + 40 * MIB)
    text = "\n".join(explain(profile, prediction, Workload()))
    assert "bound: I/O" in text and "at half the budget" in text and "at double the budget" in text
    assert "ms per MiB" in text


def test_workload_parsing():
    assert Workload.parse("128:32") == Workload(128, 32, 1)
    assert Workload.parse("16:0:4").batch == 4
    for bad in ["", "x", "0", "1:2:0", "1:2:3:4", "-1"]:
        with pytest.raises(ValueError):
            Workload.parse(bad)


def _measured(profile: Profile, **facts) -> Profile:
    from dataclasses import replace

    return replace(profile, **facts)


def test_compute_bound_with_costly_loaders_prefers_no_prefetch():
    # BERT-large on the EPYC: compute 6.7 s, reads 0.6 s, and compute 20 % slower while a loader ran.
    # Hiding 0.6 s of reads costs 1.3 s of compute, so k=0 is the faster plan and must be chosen.
    profile = _profile(load_s=0.02, compute_s=0.8, head_mib=10, interference=1.2)
    budget = minimum_budget(profile, Workload()) + 40 * MIB
    chosen = choose_plan(profile, budget)
    assert chosen.plan.prefetch == 0 and chosen.plan.streamed
    k2 = choose_plan(profile, budget, depths=range(2, 3))
    assert chosen.latency_s < k2.latency_s


def test_idle_loaders_are_chosen_when_they_hide_reads_without_slowing_compute():
    profile = _measured(_profile(load_s=0.02, compute_s=0.8, head_mib=10, interference=1.2),
                        interference_idle=1.0, idle_read_slowdown=3.0)
    budget = minimum_budget(profile, Workload()) + 40 * MIB
    chosen = choose_plan(profile, budget)
    assert chosen.plan.prefetch >= 1 and chosen.plan.loader_priority == "idle"
    k0 = choose_plan(profile, budget, depths=range(1))
    assert chosen.latency_s < k0.latency_s and k0.plan.loader_priority == "normal"


def test_io_bound_plans_keep_loaders_at_normal_priority():
    # Idle loaders would not slow compute, but their reads (the bound) would take 3x longer.
    profile = _measured(_profile(load_s=0.1, compute_s=0.01), interference=1.05, interference_idle=1.0,
                        idle_read_slowdown=3.0)
    chosen = choose_plan(profile, minimum_budget(profile, Workload()) + 40 * MIB, depths=range(2, 3))
    assert chosen.plan.prefetch == 2 and chosen.plan.loader_priority == "normal"


def test_one_shot_runs_read_resident_stages_during_the_first_pass_not_in_load():
    # load() maps the resident stages and one thread reads them in execution order while the first pass
    # computes (engine.resident): a one-shot run of an all-resident plan overlaps those reads with
    # compute, instead of paying them all before it (as when load() read them).
    profile = _measured(_profile(load_s=0.05, compute_s=0.05, head_mib=10), skeleton_s=0.01, fault_gbps=1.0)
    budget = 100 * MIB + _model_bytes(profile) + 64 * MIB
    daemon = choose_plan(profile, budget, Workload())
    once = choose_plan(profile, budget, Workload(one_shot=True))
    assert daemon.plan.streamed == () == once.plan.streamed
    assert once.open_s == daemon.open_s == profile.skeleton_s, "load() reads nothing and faults no ring"
    reads = sum(s.load_cold_s for s in profile.stages)
    assert daemon.latency_s < once.latency_s < daemon.latency_s + reads, "the first reads overlap compute"
    assert once.waits["h0"] > 0 and daemon.waits == {}, "the first pass waits for stages not yet read"


def test_one_shot_plans_charge_resident_first_reads_cpu_to_compute():
    # On a VM whose balloon hands fresh pages back to the host, a resident stage's first read costs its
    # thread CPU that compute loses (engine.resident); a compute-bound one-shot plan then keeps fewer
    # stages resident than memory allows, while a daemon, which pays it once, still fills the budget.
    plain = _profile(load_s=0.02, compute_s=0.8, head_mib=10)
    costly = _measured(plain, first_read_cpu_s_per_gb=10.0)
    budget = 100 * MIB + _model_bytes(plain) + 64 * MIB
    once = Workload(one_shot=True)
    latency, _, compute, _ = simulate(costly, once, {"h0", "h1"}, depth=1)
    base_latency, _, base_compute, _ = simulate(plain, once, {"h0", "h1"}, depth=1)
    assert compute - base_compute == pytest.approx(2 * 10 * MIB * 10.0 / 1e9)
    assert latency > base_latency
    assert len(choose_plan(plain, budget, once).plan.resident) == len(plain.stages)
    assert len(choose_plan(costly, budget, once).plan.resident) < len(plain.stages)
    assert choose_plan(costly, budget, Workload()).plan == choose_plan(plain, budget, Workload()).plan


def test_measured_peak_slack_is_added_to_every_plan():
    profile = _profile(load_s=0.05, compute_s=0.05)
    slack = 40 * MIB
    base = choose_plan(profile, None, depths=range(2, 3))
    padded = choose_plan(_measured(profile, peak_slack_bytes=slack), None, depths=range(2, 3))
    assert padded.peak_bytes == base.peak_bytes + slack
    assert minimum_budget(_measured(profile, peak_slack_bytes=slack), Workload()) == \
        minimum_budget(profile, Workload()) + slack
