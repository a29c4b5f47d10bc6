"""What the daemon reports about itself: the ``status`` reply and systemd's one-line STATUS=."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from hermes_client.protocol import Reply

from hermesd import memory
from hermesd.daemon.jobs import QueuedJob


@dataclass
class DaemonView:
    """A snapshot of the daemon, taken by the main thread."""

    state: str
    version: str
    uptime_s: float
    queued: int
    current: QueuedJob | None
    journal_counts: dict[str, int]
    executor_healthy: bool
    since_progress_s: float
    watchdogs: dict[str, Any] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)


def status_reply(view: DaemonView, owner: str) -> dict[str, Any]:
    """The protocol's ``status`` reply to ``owner``: the running job's id only if it is theirs."""
    current = None
    if view.current is not None:
        record = view.current.record
        current = {"id": record.id if record.owner == owner else None, "model": record.model, "task": record.task,
                   "running_s": round(time.time() - (record.started or record.submitted), 3)}
    return {"type": Reply.STATUS.value, "state": view.state, "version": view.version,
            "uptime_s": round(view.uptime_s, 3), "pid": os.getpid(), "queued": view.queued, "current_job": current,
            "jobs": view.journal_counts, "models": view.models,
            "memory": {"rss_bytes": memory.rss_bytes(), "peak_rss_bytes": memory.peak_rss_bytes()},
            "executor": {"healthy": view.executor_healthy, "since_progress_s": round(view.since_progress_s, 3)},
            "watchdogs": view.watchdogs, "counters": view.counters}


def status_line(view: DaemonView) -> str:
    """systemd's STATUS=: state, queue, current job, memory and the watchdogs, in one line."""
    parts = [f"{view.state}: {view.queued} queued"]
    if view.current is not None:
        parts.append(f"running {view.current.id} ({view.current.record.model} {view.current.record.task})")
    else:
        parts.append("idle")
    parts.append(f"rss {memory.rss_bytes() / 2**20:.0f} MiB")
    summary = view.watchdogs.get("summary")
    if summary:
        parts.append(summary)
    return "; ".join(parts)
