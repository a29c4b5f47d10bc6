"""Statistics of one run (a forward call or a whole generate call) of a streamed model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hermesd.units import format_size


@dataclass
class StageStats:
    """Totals for one stage over a run (a generate run passes through each stage once per token)."""

    name: str
    loads: int = 0
    bytes_read: int = 0
    load_s: float = 0.0  # time loader threads spent reading it
    load_cpu_s: float = 0.0  # CPU time those reads cost their thread (what loading takes from compute)
    wait_s: float = 0.0  # time compute stood still waiting for it
    compute_s: float = 0.0  # time its modules ran (resident stages included)
    resident: bool = False  # it ran from memory the plan keeps (loaded once, in the first run after load())


@dataclass
class RunStats:
    """What the last run did: per-stage times and bytes, totals, and the process's peak memory."""

    wall_s: float = 0.0
    passes: int = 0
    prefetch: int = 0
    loaders: int = 0
    loader_priority: str = ""  # "idle" (SCHED_IDLE loaders) or "normal"
    read_mode: str = ""
    peak_rss_bytes: int = 0
    pool_high_water_bytes: int = 0
    gathered_bytes: int = 0
    on_demand_loads: int = 0
    stages: list[StageStats] = field(default_factory=list)
    timeline: list[tuple[str, str, float, float]] = field(default_factory=list)  # (stage, load|compute, t0, t1)

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self.stages) + self.gathered_bytes

    @property
    def wait_s(self) -> float:
        return sum(s.wait_s for s in self.stages)

    @property
    def compute_s(self) -> float:
        return sum(s.compute_s for s in self.stages)

    @property
    def load_s(self) -> float:
        return sum(s.load_s for s in self.stages)

    @property
    def load_cpu_s(self) -> float:
        return sum(s.load_cpu_s for s in self.stages)

    def to_dict(self, timeline: bool = False) -> dict:
        data = asdict(self)
        if not timeline:
            data.pop("timeline")
        data.update(bytes_read=self.bytes_read, wait_s=self.wait_s, compute_s=self.compute_s, load_s=self.load_s,
                    load_cpu_s=self.load_cpu_s)
        return data

    def summary(self) -> str:
        """A few lines for people: totals first, then the slowest stages."""
        read_rate = self.bytes_read / self.load_s / 1e9 if self.load_s else 0.0
        lines = [
            f"wall {self.wall_s:.3f} s over {self.passes} pass(es); compute {self.compute_s:.3f} s, "
            f"waiting for loads {self.wait_s:.3f} s",
            f"read {format_size(self.bytes_read)} ({self.read_mode}, {read_rate:.2f} GB/s per loader), "
            f"prefetch depth {self.prefetch} on {self.loaders} {self.loader_priority} loader(s) using "
            f"{self.load_cpu_s:.3f} s of CPU, peak RSS {format_size(self.peak_rss_bytes)}",
        ]
        slowest = sorted(self.stages, key=lambda s: s.wait_s + s.compute_s, reverse=True)[:3]
        for stage in slowest:
            lines.append(f"  {stage.name}: compute {stage.compute_s:.3f} s, wait {stage.wait_s:.3f} s, "
                         f"{format_size(stage.bytes_read)} in {stage.loads} load(s)")
        return "\n".join(lines)
