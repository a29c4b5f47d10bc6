"""Run a command in a fresh cgroup with a real memory cap (v1 here, v2 where delegated) and read its record.

Used by the benchmarks (capped contenders) and by tests that prove behaviour under a real cap.
A group is made per run (``MemoryGroup``), the child moves itself into it before ``exec`` (so every
byte it maps counts), and the group's peak usage and OOM kills are read after the child exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


@dataclass
class CappedRun:
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int
    oom_kills: int


@dataclass(frozen=True)
class GroupRecord:
    """What a group saw: its peak usage (page cache included) and how many processes the OOM killer took."""

    peak_bytes: int
    oom_kills: int
    limit_bytes: int
    version: str


def _group_root() -> tuple[Path, str] | None:
    if (V1_ROOT / "memory.limit_in_bytes").exists() and os.access(V1_ROOT, os.W_OK):
        return V1_ROOT, "v1"
    controllers = V2_ROOT / "cgroup.subtree_control"
    if controllers.exists() and "memory" in controllers.read_text().split() and os.access(V2_ROOT, os.W_OK):
        return V2_ROOT, "v2"
    return None


def controller_version() -> str | None:
    """"v1" or "v2" for the writable memory controller capped runs use, None when there is none."""
    found = _group_root()
    return found[1] if found else None


def unavailable_reason() -> str | None:
    """Why capped runs cannot happen here, or None when they can."""
    if _group_root() is None:
        return "no writable cgroup memory controller (v1 /sys/fs/cgroup/memory or v2 with memory delegated)"
    return None


class MemoryGroup:
    """A fresh memory cgroup limited to ``limit_bytes``; use as a context manager (removed on exit).

    ``join`` is a ``preexec_fn`` for subprocess: the child enters the group before it execs.
    """

    def __init__(self, limit_bytes: int, root: Path | None = None, version: str | None = None,
                 prefix: str = "hermesd-bench") -> None:
        if root is None or version is None:
            found = _group_root()
            if found is None:
                raise RuntimeError(unavailable_reason())
            root, version = found
        self.version = version
        self.limit_bytes = limit_bytes
        self.path = Path(root) / f"{prefix}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "MemoryGroup":
        self.path.mkdir()
        try:
            limit_file = "memory.limit_in_bytes" if self.version == "v1" else "memory.max"
            (self.path / limit_file).write_text(str(self.limit_bytes))
            if self.version == "v2" and (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")  # a cap that swaps is no cap
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def join(self) -> None:
        """Move the calling process into the group (runs in the child, between fork and exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        """Processes still in the group."""
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def record(self) -> GroupRecord:
        """The group's peak usage and OOM kill count so far."""
        return GroupRecord(*read_record(self.path, self.version), limit_bytes=self.limit_bytes,
                           version=self.version)

    def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left in the group (a timed-out child's children), then remove the group."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def read_record(group: Path, version: str) -> tuple[int, int]:
    """(peak bytes, OOM kills) from a group's files: v1 ``max_usage_in_bytes``/``oom_control``,
    v2 ``memory.peak`` (0 where the kernel lacks it) and ``memory.events``."""
    if version == "v1":
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        return peak, _keyed(group / "memory.oom_control").get("oom_kill", 0)
    peak_file = group / "memory.peak"
    peak = int(peak_file.read_text()) if peak_file.exists() else 0
    return peak, _keyed(group / "memory.events").get("oom_kill", 0)


def _keyed(path: Path) -> dict[str, int]:
    """A cgroup "key value" file as a dict."""
    values: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            values[parts[0]] = int(parts[1])
    return values


def run_capped(command: list[str], limit_bytes: int, timeout: float = 600) -> CappedRun:
    """Run ``command`` inside a new cgroup limited to ``limit_bytes``; the group is removed afterwards."""
    with MemoryGroup(limit_bytes) as group:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, preexec_fn=group.join)
        record = group.record()
    return CappedRun(done.returncode, done.stdout, done.stderr, record.peak_bytes, record.oom_kills)


def preexec_for(group: MemoryGroup | None) -> Callable[[], None] | None:
    """The ``preexec_fn`` that puts a child into ``group`` (None for an uncapped run)."""
    return group.join if group is not None else None
