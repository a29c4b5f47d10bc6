"""The Layer Profiler's output: measured costs of each stage and of the machine, as plain data.

A profile is what the Pipeline Planner reasons from. It is saved as JSON beside the store, with a
fingerprint of everything the numbers depend on. A profile whose fingerprint no longer matches the
machine or the store is stale and is measured again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROFILE_VERSION = 3  # 2: activation peak includes decode; 3: decode compute from a second step


@dataclass(frozen=True)
class StageCost:
    """Measured costs of one stage."""

    name: str
    kind: str  # block | rest | pinned (pinned stages are always resident)
    bytes: int  # bytes one load reads into the pool (its memory while streamed)
    load_cold_s: float  # O_DIRECT read, page cache cold, no compute running
    load_warm_s: float  # buffered read of the same bytes from the page cache
    compute_prompt_s: float  # compute for the reference prompt, nothing loading meanwhile
    compute_decode_s: float = 0.0  # one decode step with a reference-length KV cache (causal LMs)


@dataclass(frozen=True)
class Profile:
    """Everything the planner needs: per-stage costs, memory facts, the machine's read speed."""

    fingerprint: dict[str, Any]
    reference_tokens: int
    runtime_bytes: int  # a fresh process's RSS with the skeleton built and no weights
    activation_fixed_bytes: int  # activation peak not proportional to tokens
    activation_bytes_per_token: float  # activation peak growth per prompt token
    kv_bytes_per_token: int  # KV cache per generated or prompt token (causal LMs)
    interference: float  # compute time with a loader reading / compute time alone (>= 1)
    read_direct_gbps: float
    read_buffered_gbps: float
    cores: int
    causal: bool
    stages: list[StageCost]
    profile_seconds: float = 0.0
    version: int = PROFILE_VERSION
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StageCost:
        return next(s for s in self.stages if s.name == name)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Profile":
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("version") != PROFILE_VERSION:
            raise ValueError(f"{path}: profile version {raw.get('version')} (expected {PROFILE_VERSION})")
        raw["stages"] = [StageCost(**s) for s in raw["stages"]]
        return cls(**raw)
