"""What the executor tells the main loop (events), and the per-sweep progress of its jobs.

Shared by the executor and its batch runners (hermesd.daemon.batching, hermesd.daemon.generating).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any, Protocol

from hermes_client.protocol import ErrorCode, JobState

from hermesd.daemon.hosting import ModelHost
from hermesd.daemon.jobs import QueuedJob
from hermesd.engine.engine import Engine


class Interrupted(Exception):
    """Raised at a checkpoint to end a job between stages (cancel, deadline, shutdown)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EventKind(str, enum.Enum):
    """What an executor event tells the main loop (it dispatches ``_on_<value>``)."""

    STARTED = "started"
    PROGRESS = "progress"
    FINISHED = "finished"
    REQUEUED = "requeued"


@dataclass
class Event:
    """Something the main loop must act on."""

    kind: EventKind
    job: QueuedJob
    state: JobState | None = None
    result: Any = None
    error: tuple[str, str] | None = None
    tokens: int = 0
    stages: int = 0
    text: str | None = None  # generate: new text since the previous progress message ...
    text_offset: int = 0  # ... and the characters of text sent before it


class Runner(Protocol):
    """What a sweep's progress needs of the executor (hermesd.daemon.executor.Executor)."""

    last_progress: float
    paused_s: float
    evicted: int
    progress_interval_s: float
    gate: Any

    def check_batch(self, jobs: list[QueuedJob]) -> None: ...
    def wait_at_gate(self, jobs: list[QueuedJob]) -> None: ...
    def _adjust_residency(self) -> None: ...
    def _emit(self, event: Event) -> None: ...


class Progress:
    """Checkpoint and token callbacks of a sweep's jobs: progress events, cancel and gate checks."""

    def __init__(self, executor: Runner, jobs: list[QueuedJob], host: ModelHost) -> None:
        self.executor = executor
        self.jobs = jobs  # the sweep's members (generate's batch replaces this list as members come and go)
        self.host = host
        self.tokens: dict[str, int] = {}
        self.stages = 0
        self.prefetch_paused_stages = 0
        self._last_sent: dict[str, float] = {}
        self._text: dict[str, str] = {}  # per job: streamed text not yet sent, and how much was sent before it
        self._text_sent: dict[str, int] = {}

    def stage(self, name: str) -> None:
        executor = self.executor
        executor.last_progress = time.monotonic()
        executor.check_batch(self.jobs)
        executor.wait_at_gate(self.jobs)
        executor._adjust_residency()
        paused = executor.gate.prefetch_paused
        self.host.engine.pause_prefetch(paused)
        self.prefetch_paused_stages += paused
        self.stages += 1
        for job in self.jobs:
            self._maybe_send(job)

    def step(self) -> None:
        """After tokenizing and after each generated token: cancel and deadline end the job here too."""
        self.executor.last_progress = time.monotonic()
        self.executor.check_batch(self.jobs)

    def token(self, token_id: int, job: QueuedJob | None = None) -> None:
        """One more token of ``job`` (the only job when None)."""
        job = job or self.jobs[0]
        count = self.tokens[job.id] = self.tokens.get(job.id, 0) + 1
        self._maybe_send(job, force=count == 1)

    def restart(self, job: QueuedJob) -> None:
        """``job`` starts over (it gave its place in a batch up and joins again): counts and text from zero.

        Text offsets start at 0 again, so a client skips what it already has (hermes_client.textchunks).
        """
        for counts in (self.tokens, self._text, self._text_sent):
            counts.pop(job.id, None)

    def text(self, piece: str, job: QueuedJob | None = None) -> None:
        """New final text of a generate job (the only job when None); it goes out with the next progress message."""
        job = job or self.jobs[0]
        self._text[job.id] = self._text.get(job.id, "") + piece

    def send_text(self, job: QueuedJob | None = None) -> None:
        """Send text still waiting (at the job's end, so clients have it all before the result)."""
        job = job or self.jobs[0]
        if self._text.get(job.id):
            self._maybe_send(job, force=True)

    def stats(self, engine: Engine, batch: int = 1) -> dict[str, Any]:
        """The engine's statistics of the last run, with the daemon's own counts."""
        stats = engine.live_stats().to_dict()
        stats.update(paused_s=round(self.executor.paused_s, 3), stages_run=self.stages,
                     prefetch_paused_stages=self.prefetch_paused_stages, stages_evicted=self.executor.evicted,
                     batch=batch)
        return stats

    def _maybe_send(self, job: QueuedJob, force: bool = False) -> None:
        if not job.record.progress:
            return
        now = time.monotonic()
        if force or now - self._last_sent.get(job.id, 0.0) >= self.executor.progress_interval_s:
            self._last_sent[job.id] = now
            text = self._text.pop(job.id, "") if job.record.task == "generate" else None
            sent = self._text_sent.get(job.id, 0)
            self.executor._emit(Event(EventKind.PROGRESS, job, tokens=self.tokens.get(job.id, 0),
                                      stages=self.stages, text=text, text_offset=sent))
            self._text_sent[job.id] = sent + len(text or "")


def failed(job: QueuedJob, code: ErrorCode, message: str) -> Event:
    return Event(EventKind.FINISHED, job, JobState.FAILED, error=(code.value, message))
