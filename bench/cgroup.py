"""Run a command in a fresh cgroup with a real memory cap (v1 here, v2 where delegated) and read its record.

Used by the benchmarks (capped contenders) and by tests that prove behaviour under a real cap.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


@dataclass
class CappedRun:
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int
    oom_kills: int


def _group_root() -> tuple[Path, str] | None:
    if (V1_ROOT / "memory.limit_in_bytes").exists() and os.access(V1_ROOT, os.W_OK):
        return V1_ROOT, "v1"
    controllers = V2_ROOT / "cgroup.subtree_control"
    if controllers.exists() and "memory" in controllers.read_text().split() and os.access(V2_ROOT, os.W_OK):
        return V2_ROOT, "v2"
    return None


def unavailable_reason() -> str | None:
    """Why capped runs cannot happen here, or None when they can."""
    if _group_root() is None:
        return "no writable cgroup memory controller (v1 /sys/fs/cgroup/memory or v2 with memory delegated)"
    return None


def run_capped(command: list[str], limit_bytes: int, timeout: float = 600) -> CappedRun:
    """Run ``command`` inside a new cgroup limited to ``limit_bytes``; the group is removed afterwards."""
    root, version = _group_root()
    group = root / f"hermesd-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / ("memory.limit_in_bytes" if version == "v1" else "memory.max")).write_text(str(limit_bytes))
        procs = group / "cgroup.procs"
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=lambda: procs.write_text(str(os.getpid())))
        return CappedRun(done.returncode, done.stdout, done.stderr, *_record(group, version))
    finally:
        group.rmdir()


def _record(group: Path, version: str) -> tuple[int, int]:
    if version == "v1":
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        control = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        return peak, int(control.get("oom_kill", 0))
    events = dict(line.split() for line in (group / "memory.events").read_text().splitlines())
    peak_file = group / "memory.peak"
    return (int(peak_file.read_text()) if peak_file.exists() else 0), int(events.get("oom_kill", 0))
