"""The Pipeline Planner: a profile and a memory budget in, the fastest plan that fits out.

Pure functions, no I/O. Latency is predicted by replaying what the prefetcher does:
- loads go through one disk in order;
- the load of stage i+k is submitted when stage i starts computing (with k=0, when stage i is needed);
- a stage computes once its load is done and the previous stage has computed.
Compute is the profiled time, scaled by prompt length and by the measured slowdown while loaders run.
Each streamed plan is replayed twice: loaders at normal priority (the measured interference) and on
SCHED_IDLE (the interference measured that way, reads slower by the measured factor); the faster
sets ``Plan.loader_priority``. Both factors were measured with compute on every core of this machine
and one loader, which is what plans run, so the core count is in them (and in the fingerprint).
A one-shot workload (``hermesd run``) also pays load(): the skeleton build while the ring is faulted
in (engine.opening), the longer of the two. Its first pass also reads the resident stages: load()
maps them and one thread reads them in execution order from then on, through the same disk, each
waited for where it is first needed (engine.resident). That thread's CPU (the profile's
``first_read_cpu_s_per_gb``: fresh page-cache pages are costly on a VM) is taken from compute, so each
resident stage's first pass computes that much longer. A daemon pays all of it once, so its workloads
count none.
Peak memory is runtime + resident stages + the pool + activations + KV cache, all measured or exact,
plus the profile's measured slack (what this model missed on a streamed pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hermesd.errors import BudgetError
from hermesd.plan.budget import Plan, window_bytes
from hermesd.plan.profile import Profile, StageCost
from hermesd.plan.ring import ring_stalls, smallest_stall_free_ring
from hermesd.plan.workload import Workload
from hermesd.units import format_size

MAX_PREFETCH = 4
MIN_GAIN_S = 1e-4  # a resident stage must save at least this much predicted time
# I/O-bound plans predicted within this of the best count as tied; ties go to the deeper prefetch. The
# simulation uses mean load times, but disk speed jitters, and a deeper queue absorbs that: on
# GPT-2-XL at a 2 GiB budget, k=1..4 were predicted within 1% but k=3 measured 7% faster than k=1.
TIE = 0.02


@dataclass(frozen=True)
class Prediction:
    """A plan with what the planner expects of it."""

    plan: Plan
    latency_s: float
    peak_bytes: int
    io_s: float  # time the disk is busy
    compute_s: float  # time compute is busy
    waits: dict[str, float] = field(default_factory=dict)  # stage -> predicted time compute waits for it
    compute_threads: int = 0  # torch threads the profile was measured with (the engine uses them all)
    read_mode: str = "direct"
    open_s: float = 0.0  # predicted load() time (in latency_s for one-shot workloads)

    @property
    def bound(self) -> str:
        return "I/O" if self.io_s > self.compute_s else "compute"

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "predicted_latency_s": self.latency_s,
                "predicted_peak_bytes": self.peak_bytes, "io_s": self.io_s, "compute_s": self.compute_s,
                "bound": self.bound, "compute_threads": self.compute_threads, "read_mode": self.read_mode,
                "predicted_open_s": self.open_s}


def minimum_budget(profile: Profile, workload: Workload) -> int:
    """The smallest budget any plan fits: no prefetch, only pinned stages resident."""
    return minimum_plan(profile, workload).peak_bound


def minimum_plan(profile: Profile, workload: Workload) -> Plan:
    """The plan behind ``minimum_budget``: no prefetch, only pinned stages resident."""
    return evaluate(profile, workload, 0, _pinned(profile), None).plan


def choose_plan(profile: Profile, budget: int | None, workload: Workload = Workload(),
                depths: range = range(MAX_PREFETCH + 1)) -> Prediction:
    """The plan with the lowest predicted latency whose predicted peak fits ``budget``."""
    minimum = minimum_budget(profile, workload)
    if budget is not None and budget < minimum:
        raise BudgetError(budget, minimum, "no prefetch and nothing resident already needs that much")
    best = [p for p in (best_for_depth(profile, budget, workload, k) for k in depths) if p is not None]
    if not best:
        raise BudgetError(budget, min(evaluate(profile, workload, k, _pinned(profile), None).peak_bytes
                                      for k in depths), f"prefetch depth {list(depths)} does not fit")
    fastest = min(best, key=lambda p: (round(p.latency_s, 4), p.peak_bytes))
    if not fastest.plan.streamed or fastest.bound != "I/O":
        # Everything resident beats any tie. Compute-bound, a deeper queue absorbs no disk jitter that
        # matters, and the tie rule picked k=4 where k=0 measured 12-15 % faster (BERT-large, MiniLM).
        return fastest
    tied = [p for p in best if p.plan.streamed and p.latency_s <= fastest.latency_s * (1 + TIE)]
    return max(tied, key=lambda p: (p.plan.prefetch, -p.latency_s))


def best_for_depth(profile: Profile, budget: int | None, workload: Workload, depth: int) -> Prediction | None:
    """Prefetch ``depth`` with resident stages added greedily by predicted seconds saved per byte."""
    current = evaluate(profile, workload, depth, _pinned(profile), budget)
    if budget is not None and current.peak_bytes > budget:
        return None
    while current.plan.streamed:
        step = _best_resident_step(profile, workload, depth, current, budget)
        if step is None:
            break
        current = step
    return _fill_resident(profile, workload, depth, current, budget)


def _fill_resident(profile: Profile, workload: Workload, depth: int, current: Prediction,
                   budget: int | None) -> Prediction:
    """Keep more stages resident, largest first, while they fit and the predicted latency holds.

    When compute is the predicted bound a resident stage saves no predicted time, so the greedy step
    adds none; but every streamed byte is still read again each pass (loader CPU, disk, page cache),
    and a prediction can be wrong. Memory the budget grants is better spent holding weights: a 3 GiB
    budget for a 2.1 GB TinyLlama-shape store streamed 23 of 25 stages before this rule.
    """
    if budget is None:
        return current  # no budget: stream as told, nothing resident beyond what was asked
    by_size = sorted(current.plan.streamed, key=lambda name: -profile.stage(name).bytes)
    for name in by_size:
        trial = evaluate(profile, workload, depth, [*current.plan.resident, name], budget)
        if trial.peak_bytes <= budget and trial.latency_s <= current.latency_s * (1 + TIE / 4):
            current = trial
    return current


def _best_resident_step(profile: Profile, workload: Workload, depth: int, current: Prediction,
                        budget: int | None) -> Prediction | None:
    best, best_value = None, 0.0
    for name in _candidates(profile, current):
        trial = evaluate(profile, workload, depth, [*current.plan.resident, name], budget)
        gain = current.latency_s - trial.latency_s
        cost = trial.peak_bytes - current.peak_bytes
        if gain < MIN_GAIN_S or (budget is not None and trial.peak_bytes > budget):
            continue
        value = float("inf") if cost <= 0 else gain / cost
        if value > best_value:
            best, best_value = trial, value
    return best


def _candidates(profile: Profile, current: Prediction) -> list[str]:
    """One streamed stage per (size, cost) class: the one compute waits for longest. Blocks of one
    model are alike, so this keeps the greedy search at a few evaluations per step."""
    chosen: dict[tuple, str] = {}
    for name in current.plan.streamed:
        stage = profile.stage(name)
        key = (stage.kind, stage.bytes >> 16, round(stage.compute_prompt_s, 3))
        if key not in chosen or current.waits.get(name, 0) > current.waits.get(chosen[key], 0):
            chosen[key] = name
    return list(chosen.values())


def _pinned(profile: Profile) -> list[str]:
    return [s.name for s in profile.stages if s.kind == "pinned"]


def evaluate(profile: Profile, workload: Workload, depth: int, resident: list[str],
             budget: int | None) -> Prediction:
    """The plan with prefetch ``depth`` and these resident stages, and its predicted latency and peak."""
    keep = set(resident)
    streamed = [s for s in profile.stages if s.name not in keep]
    sizes = [s.bytes for s in streamed]
    pool = window_bytes(sizes, depth)
    stall_free = False
    if sizes and depth:
        roomy = smallest_stall_free_ring(sizes, depth, pool, max(pool, (depth + 1) * max(sizes)))
        stall_free = ring_stalls(sizes, depth, roomy) == 0 and (
            budget is None or _peak(profile, workload, keep, roomy) <= budget)
        pool = roomy if stall_free else pool
    depth = depth if streamed else 0
    latency, io, compute, waits = simulate(profile, workload, keep, depth)
    priority = "normal"
    if depth and profile.interference_idle and profile.idle_read_slowdown:
        idle = simulate(profile, workload, keep, depth, profile.interference_idle, profile.idle_read_slowdown)
        if idle[0] < latency:
            (latency, io, compute, waits), priority = idle, "idle"
    plan = Plan(prefetch=depth, loaders=1 if depth else 0,
                resident=tuple(s.name for s in profile.stages if s.name in keep),
                streamed=tuple(s.name for s in streamed), pool_bytes=pool, pool_stall_free=stall_free,
                resident_bytes=sum(profile.stage(n).bytes + profile.stage(n).compute_bytes for n in keep),
                activation_bytes=_activation_bytes(profile, workload) + _streamed_compute_bytes(streamed),
                runtime_bytes=profile.runtime_bytes + profile.peak_slack_bytes,
                budget=budget, loader_priority=priority)
    opening = open_seconds(profile, plan)
    read_mode = "direct" if profile.read_direct_gbps > 0 else "buffered"
    return Prediction(plan, latency + (opening if workload.one_shot else 0.0), plan.peak_bound, io, compute,
                      waits, profile.cores, read_mode, opening)


def open_seconds(profile: Profile, plan: Plan) -> float:
    """Predicted load() time: the skeleton build and the ring's fault-in, at once (resident stages are
    only mapped: the first pass reads them)."""
    fault = plan.pool_bytes / (profile.fault_gbps * 1e9) if profile.fault_gbps and plan.streamed else 0.0
    return max(profile.skeleton_s, fault)


def _activation_bytes(profile: Profile, workload: Workload) -> int:
    tokens = workload.prompt_tokens * workload.batch
    kv = profile.kv_bytes_per_token * (workload.prompt_tokens + workload.new_tokens) * workload.batch
    return int(profile.activation_fixed_bytes + profile.activation_bytes_per_token * tokens + kv)


def _streamed_compute_bytes(streamed: list[StageCost]) -> int:
    """One streamed stage's kernel tables at a time: the largest."""
    return max((s.compute_bytes for s in streamed), default=0)


def _peak(profile: Profile, workload: Workload, resident: set[str], pool: int) -> int:
    resident_bytes = sum(s.bytes + s.compute_bytes for s in profile.stages if s.name in resident)
    streamed = [s for s in profile.stages if s.name not in resident]
    return (profile.runtime_bytes + profile.peak_slack_bytes + resident_bytes + pool
            + _activation_bytes(profile, workload) + _streamed_compute_bytes(streamed))


def simulate(profile: Profile, workload: Workload, resident: set[str], depth: int,
             interference: float | None = None, load_scale: float = 1.0
             ) -> tuple[float, float, float, dict[str, float]]:
    """Predicted (latency, disk busy time, compute busy time, per-stage waits) of one run.

    ``interference``: compute's slowdown while loaders run (default: the profile's, normal priority);
    ``load_scale``: how much longer each streamed load takes (idle-priority loaders). A one-shot
    workload's first pass also reads each resident stage, queued from the start in execution order.
    """
    factor = profile.interference if interference is None else interference
    streamed_bytes = sum(s.bytes for s in profile.stages if s.name not in resident)
    total_bytes = sum(s.bytes for s in profile.stages) or 1
    slowdown = 1 + (factor - 1) * streamed_bytes / total_bytes if depth else 1.0
    sequence = [(stage, kind) for kind in ["prompt"] + ["decode"] * (workload.passes - 1) for stage in profile.stages]
    disk_free = previous_end = io = compute_total = 0.0
    starts: list[float] = []  # compute start of each streamed load, in order
    waits: dict[str, float] = {}
    unread = set(resident) if workload.one_shot else set()  # resident stages load() only mapped
    first_read_cpu = profile.first_read_cpu_s_per_gb / 1e9
    for stage, kind in sequence:
        compute = _compute_s(profile, stage, kind, workload) * (slowdown if stage.name not in resident else 1.0)
        start = previous_end
        if stage.name in unread:
            unread.discard(stage.name)
            compute += stage.bytes * first_read_cpu  # the reading thread's CPU, taken from compute's cores
            disk_free, io = disk_free + stage.load_cold_s, io + stage.load_cold_s
            start = max(previous_end, disk_free)
            waits[stage.name] = start - previous_end
        elif stage.name not in resident:
            index = len(starts)
            submitted = previous_end if depth == 0 else (0.0 if index < depth else starts[index - depth])
            load_s = stage.load_cold_s * (load_scale if depth else 1.0)
            load_end = max(submitted, disk_free) + load_s
            disk_free, io = load_end, io + load_s
            start = max(previous_end, load_end)
            waits[stage.name] = waits.get(stage.name, 0.0) + start - previous_end
            starts.append(start)
        previous_end = start + compute
        compute_total += compute
    return previous_end, io, compute_total, waits


def _compute_s(profile: Profile, stage: StageCost, kind: str, workload: Workload) -> float:
    if kind == "decode":
        return stage.compute_decode_s * workload.batch
    return stage.compute_prompt_s * workload.prompt_tokens * workload.batch / profile.reference_tokens


def describe(profile: Profile, prediction: Prediction) -> list[str]:
    """The plan, its predicted latency and peak, and what bounds it."""
    plan = prediction.plan
    return [
        f"plan: prefetch {plan.prefetch} on {plan.loaders} "
        f"{plan.loader_priority + '-priority ' if plan.loaders else ''}loader(s), "
        f"{len(plan.resident)} of "
        f"{len(profile.stages)} stages resident ({format_size(plan.resident_bytes)}), ring "
        f"{format_size(plan.pool_bytes)}, {prediction.read_mode} reads, {prediction.compute_threads} compute threads"
        f"{'' if plan.pool_stall_free else ' (tight: prefetch may wait for space)'}",
        f"predicted latency {prediction.latency_s:.2f} s (load() {prediction.open_s:.2f} s), "
        f"predicted peak {format_size(prediction.peak_bytes)}"
        + (f" of {format_size(plan.budget)}" if plan.budget else ""),
        f"bound: {prediction.bound} (disk busy {prediction.io_s:.2f} s, compute busy {prediction.compute_s:.2f} s"
        f"; compute slows x{profile.interference:.2f} while loading)",
    ]


def explain(profile: Profile, prediction: Prediction, workload: Workload) -> list[str]:
    """describe(), plus what extra memory buys, the plans at half and double the budget, the waits."""
    plan = prediction.plan
    lines = describe(profile, prediction)
    if plan.budget:
        step = _best_resident_step(profile, workload, plan.prefetch, prediction, None)
        if step is not None:
            gained = prediction.latency_s - step.latency_s
            spent = max(step.peak_bytes - prediction.peak_bytes, 1)
            lines.append(f"next resident stage would save {gained * 1000:.1f} ms for {format_size(spent)} "
                         f"({gained * 1000 / (spent / 2**20):.2f} ms per MiB)")
        for factor, label in ((0.5, "half"), (2.0, "double")):
            lines.append(f"at {label} the budget ({format_size(plan.budget * factor)}): "
                         + _summary(profile, int(plan.budget * factor), workload))
    worst = sorted(prediction.waits.items(), key=lambda kv: -kv[1])[:3]
    if worst and worst[0][1] > 0:
        lines.append("longest predicted waits: " + ", ".join(f"{n} {w * 1000:.0f} ms" for n, w in worst))
    return lines


def _summary(profile: Profile, budget: int, workload: Workload) -> str:
    try:
        other = choose_plan(profile, budget, workload)
    except BudgetError as exc:
        return f"refused (minimum {format_size(exc.minimum)})"
    return (f"prefetch {other.plan.prefetch}, {len(other.plan.resident)} resident, "
            f"predicted {other.latency_s:.2f} s, peak {format_size(other.peak_bytes)}")
