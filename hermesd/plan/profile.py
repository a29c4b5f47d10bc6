"""The Layer Profiler's output: measured costs of each stage and of the machine, as plain data.

A profile is what the Pipeline Planner reasons from. It is saved as JSON beside the store, with a
fingerprint of everything the numbers depend on. A profile whose fingerprint no longer matches the
machine or the store is stale and is measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from hermesd.store.manifest import MANIFEST_NAME
from hermesd.version import __version__

PROFILE_NAME = "profile.json"
PROFILE_VERSION = 6  # 2: activation peak includes decode; 3: decode compute from a second step; 4: compute_bytes
# 5: idle-priority loader pass, peak slack, load() costs; 6: image models' reference pass counted in patch
# tokens (it said 128 for 394), resident first-read CPU


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
    compute_bytes: int = 0  # held beside the weights while bound (quantized kernels' tables)


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
    # The same pass with the loader on SCHED_IDLE: compute's slowdown, and how much longer its reads took
    # (0: not measured; the planner then never plans idle loaders).
    interference_idle: float = 0.0
    idle_read_slowdown: float = 0.0
    # Measured peak of the streamed reference pass minus the planner's peak for that plan (>= 0): what
    # the model of memory misses (thread stacks and arenas, allocator slack); every plan adds it.
    peak_slack_bytes: int = 0
    # load(): building the model without weights, its transformers module already imported. The same for
    # every plan; a first import timed inside it (2.5 s for BertModel) hid the ring's fault-in, which is not.
    skeleton_s: float = 0.0
    fault_gbps: float = 0.0  # load(): faulting fresh memory in, GB/s over all cores (0: not measured)
    # A one-shot run's first read of a resident stage: CPU seconds per GB its thread spends reading into
    # fresh page-cache pages and touching them, taken from the cores compute runs on (0: not measured).
    first_read_cpu_s_per_gb: float = 0.0
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


def fingerprint(store_dir: Path) -> dict[str, object]:
    """What the measurements depend on: machine, software, the store's exact contents, its filesystem."""
    return {
        "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "ram_bytes": _mem_total(),
        # package metadata, not imports: planning must not pull in torch or transformers
        "torch": metadata.version("torch"), "transformers": metadata.version("transformers"),
        "hermesd": __version__,
        "python": platform.python_version(),
        "store_sha256": hashlib.sha256((store_dir / MANIFEST_NAME).read_bytes()).hexdigest(),
        "filesystem": _filesystem(store_dir),
    }


def profile_path(store_dir: Path) -> Path:
    return Path(store_dir) / PROFILE_NAME


def load_fresh_profile(store_dir: Path) -> Profile | None:
    """The saved profile if it exists and its fingerprint still matches; None if missing or stale."""
    path = profile_path(store_dir)
    try:
        saved = Profile.load(path)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return saved if saved.fingerprint == fingerprint(Path(store_dir)) else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> int:
    with open("/proc/meminfo", encoding="ascii") as handle:
        return int(handle.readline().split()[1]) * 1024


def _filesystem(path: Path) -> str:
    """Type of the filesystem holding ``path``, from /proc/mounts (longest matching mount point)."""
    target, best = str(Path(path).resolve()), ("", "unknown")
    with open("/proc/mounts", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            point = fields[1]
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best[0]):
                best = (point, fields[2])
    return best[1]
