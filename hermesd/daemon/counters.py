"""Cumulative job counters since the daemon started, for the ``status`` reply's ``counters``.

Kept by the main thread as each job ends (``Daemon.finish``): jobs by task, model and outcome,
a latency histogram (submit to end, queue included), and per model the tokens generated, bytes
read from the store and the stage wait/compute/paused seconds of its jobs' runs. Prometheus
counters reset with the process, as these do (``hermes status --prometheus``, the gateway's /metrics).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hermes_client.protocol import JobState

from hermesd.daemon.journal import JobRecord

LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
MODEL_TOTALS = ("tokens_generated", "bytes_read", "wait_s", "compute_s", "paused_s")


class JobCounters:
    """Totals over the jobs that ended since start."""

    def __init__(self) -> None:
        self.jobs: Counter[tuple[str, str, str]] = Counter()
        self.latency: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, float]] = {}

    def record(self, record: JobRecord) -> None:
        """Count one ended job. Outcome: ``done``, ``cancelled``, or a failed job's error code."""
        outcome = record.state if record.state != JobState.FAILED.value else record.error_code or "failed"
        self.jobs[(record.task, record.model, outcome)] += 1
        took = max(0.0, (record.finished or record.submitted) - record.submitted)
        histogram = self.latency.setdefault(record.task, {"counts": [0] * len(LATENCY_BUCKETS_S), "sum": 0.0,
                                                          "count": 0})
        for index, bound in enumerate(LATENCY_BUCKETS_S):
            histogram["counts"][index] += took <= bound  # cumulative, as Prometheus buckets are
        histogram["sum"] += took
        histogram["count"] += 1
        if isinstance(record.result, dict):
            self._add_stats(record.model, record.result)

    def _add_stats(self, model: str, result: dict[str, Any]) -> None:
        totals = self.models.setdefault(model, dict.fromkeys(MODEL_TOTALS, 0))
        stats = result.get("stats") or {}
        totals["tokens_generated"] += int(result.get("new_tokens", 0) or 0)
        totals["bytes_read"] += int(stats.get("bytes_read", 0) or 0)
        for key in ("wait_s", "compute_s", "paused_s"):
            totals[key] += float(stats.get(key, 0.0) or 0.0)

    def snapshot(self) -> dict[str, Any]:
        """The status reply's ``counters``: plain msgpack-able data."""
        return {"jobs": [{"task": task, "model": model, "outcome": outcome, "count": count}
                         for (task, model, outcome), count in sorted(self.jobs.items())],
                "latency_buckets_s": list(LATENCY_BUCKETS_S),
                "latency": {task: {**h, "sum": round(h["sum"], 6)} for task, h in self.latency.items()},
                "models": {name: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in totals.items()}
                           for name, totals in self.models.items()}}
