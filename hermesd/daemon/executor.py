"""The executor: one thread that runs jobs on the engine, so the socket loop never waits on inference.

It takes jobs from the JobQueue and reports what happens as events on an outbox that the main loop
drains (the main thread alone owns the sockets and the journal). Between stages a checkpoint applies
cancels, deadlines and the watchdogs' pauses, and marks progress for the systemd watchdog: a wedged
engine stops marking progress, the daemon stops its WATCHDOG=1 pings and systemd restarts it.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from hermes_client.protocol import ErrorCode, JobState

from hermesd.daemon.hosting import ModelHost
from hermesd.daemon.jobs import JobQueue, QueuedJob
from hermesd.errors import HermesError, StoreError, TaskError
from hermesd.images import ImagePolicy
from hermesd.tasks import run_task
from hermesd.watchdog.gate import Gate

log = logging.getLogger("hermesd.executor")
IDLE_WAIT_S = 0.5
# Called on the executor thread as each job starts. Only code that builds a Daemon can install one
# (tests use it to wedge the executor on purpose); nothing a client sends reaches it.
JobHook = Callable[["QueuedJob"], None]


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


class Executor(threading.Thread):
    """Runs queued jobs one at a time on the loaded models."""

    def __init__(self, jobs: JobQueue, hosts: dict[str, ModelHost], wake: Callable[[], None],
                 progress_interval_s: float = 0.25, before_job: JobHook | None = None,
                 images: ImagePolicy = ImagePolicy(dirs=())) -> None:
        super().__init__(name="hermesd-executor", daemon=True)
        self.jobs = jobs
        self.hosts = hosts
        self.outbox: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.gate = Gate()
        self.progress_interval_s = progress_interval_s
        self.images = images  # where classify may read image files, how large images may be (config)
        self.current: QueuedJob | None = None
        self.last_progress = time.monotonic()
        self.paused_s = 0.0  # time held by the gate, this job
        self.evicted = 0     # resident stages shed, this job
        self._wake = wake
        self._before_job = before_job
        self._stopping = threading.Event()
        self._control: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    # -- control from the main thread -------------------------------------------------------------
    def stop(self) -> None:
        """Take no further jobs (the current one may finish or be interrupted by its cancel flag)."""
        self._stopping.set()

    def between_jobs(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the executor thread before its next job (e.g. swapping models on reload)."""
        self._control.put(action)

    # -- thread -------------------------------------------------------------------------------------
    def run(self) -> None:
        while not self._stopping.is_set():
            self._run_control()
            self._adjust_residency()
            self._release_idle()
            self.last_progress = time.monotonic()
            job = self.jobs.get(IDLE_WAIT_S)
            if job is None:
                continue
            if self._stopping.is_set():
                self.jobs.put(job, force=True)
                break
            self._execute(job)

    def _run_control(self) -> None:
        while True:
            try:
                action = self._control.get_nowait()
            except queue.Empty:
                return
            try:
                action()
            except Exception:  # a failed reload must not kill the executor
                log.exception("reconfiguring between jobs failed")

    def _release_idle(self) -> None:
        """Close the engines of models idle past their keep_alive (between jobs, on this thread)."""
        now = time.monotonic()
        for host in list(self.hosts.values()):
            if host.idle_expired(now):
                try:
                    host.release()
                except Exception:  # keep serving; the next job reopens it
                    log.exception("model %s: releasing it failed", host.name)

    def _adjust_residency(self) -> None:
        """Shed or restore the models' resident sets as the gate says (on this thread, between stages)."""
        for host in list(self.hosts.values()):
            if host.engine is None:  # not loaded: nothing resident
                continue
            try:
                if self.gate.shed_resident:
                    self.evicted += host.engine.shed_resident()
                else:
                    host.engine.restore_resident()
            except Exception:  # an unreadable store shows up in the next job; keep serving
                log.exception("model %s: adjusting its resident set failed", host.name)

    def _emit(self, event: Event) -> None:
        self.outbox.put(event)
        self._wake()

    def _execute(self, job: QueuedJob) -> None:
        self.current, self.paused_s, self.evicted = job, 0.0, 0
        self._emit(Event(EventKind.STARTED, job))
        try:
            event = self._outcome(job)
        finally:
            self.current = None
            self.last_progress = time.monotonic()
        self._emit(event)

    def _outcome(self, job: QueuedJob) -> Event:
        """Run one job and say how it ended; no exception escapes (the executor must keep serving)."""
        record = job.record
        host = self.hosts.get(record.model)
        if host is None:
            return _failed(job, ErrorCode.UNKNOWN_MODEL, f"model {record.model!r} is no longer configured")
        try:
            self._check(job)
            if self._before_job is not None:
                self._before_job(job)
            params = dict(record.params)
            engine = host.ensure_open()  # loads a model configured with load = "first_use" or released idle
            progress = _Progress(self, job, host)
            engine.set_checkpoint(progress.stage)
            try:
                result = run_task(engine, record.task, record.inputs, params, on_token=progress.token,
                                  check=progress.step, images=self.images, on_text=progress.text)
                progress.send_text()  # the last text goes out before the result
            finally:
                engine.set_checkpoint(None)
                host.last_used = time.monotonic()
            stats = engine.stats.to_dict()
            stats.update(paused_s=round(self.paused_s, 3), stages_run=progress.stages,
                         prefetch_paused_stages=progress.prefetch_paused_stages, stages_evicted=self.evicted)
            return Event(EventKind.FINISHED, job, JobState.DONE, result={**result, "stats": stats})
        except Interrupted as exc:
            return self._interrupted(job, exc.reason)
        except TaskError as exc:
            return _failed(job, ErrorCode.INVALID_PARAMS, str(exc))
        except StoreError as exc:
            log.error("job %s: model %s has a damaged store: %s", record.id, record.model, exc)
            return _failed(job, ErrorCode.TASK_FAILED, str(exc))
        except HermesError as exc:
            return _failed(job, ErrorCode.TASK_FAILED, str(exc))
        except Exception as exc:  # a bug or an input the model chokes on: report it, keep serving
            log.exception("job %s failed", record.id)
            return _failed(job, ErrorCode.TASK_FAILED, f"{type(exc).__name__}: {exc}")

    def _interrupted(self, job: QueuedJob, reason: str) -> Event:
        if reason == "shutdown":
            return Event(EventKind.REQUEUED, job)
        if reason == "deadline":
            return _failed(job, ErrorCode.DEADLINE_EXCEEDED, "the job's deadline passed")
        return Event(EventKind.FINISHED, job, JobState.CANCELLED)

    def _check(self, job: QueuedJob) -> None:
        """Raise Interrupted if the job must not go on (called before it starts and between stages)."""
        if job.cancel.is_set():
            raise Interrupted(job.cancel_reason)
        if job.record.deadline is not None and time.time() > job.record.deadline:
            raise Interrupted("deadline")

    def wait_at_gate(self, job: QueuedJob) -> None:
        """Block while the watchdogs hold execution, still honouring cancel and deadline."""
        if not self.gate.held:
            return
        started = time.monotonic()
        while not self.gate.wait(0.2):
            self.last_progress = time.monotonic()  # paused on purpose, not wedged
            self._check(job)
        self.paused_s += time.monotonic() - started


class _Progress:
    """Checkpoint and token callbacks of one job: progress events, cancel and gate checks."""

    def __init__(self, executor: Executor, job: QueuedJob, host: ModelHost) -> None:
        self.executor = executor
        self.job = job
        self.host = host
        self.tokens = 0
        self.stages = 0
        self.prefetch_paused_stages = 0
        self._last_sent = 0.0
        self._text = ""  # streamed text not yet sent, and how much was sent before it
        self._text_sent = 0

    def stage(self, name: str) -> None:
        executor = self.executor
        executor.last_progress = time.monotonic()
        executor._check(self.job)
        executor.wait_at_gate(self.job)
        executor._adjust_residency()
        paused = executor.gate.prefetch_paused
        self.host.engine.pause_prefetch(paused)
        self.prefetch_paused_stages += paused
        self.stages += 1
        self._maybe_send()

    def step(self) -> None:
        """After tokenizing and after each generated token: cancel and deadline end the job here too."""
        self.executor.last_progress = time.monotonic()
        self.executor._check(self.job)

    def token(self, token_id: int) -> None:
        self.tokens += 1
        self._maybe_send(force=self.tokens == 1)

    def text(self, piece: str) -> None:
        """New final text of a generate job; it goes out with the next progress message."""
        self._text += piece

    def send_text(self) -> None:
        """Send text still waiting (at the job's end, so clients have it all before the result)."""
        if self._text:
            self._maybe_send(force=True)

    def _maybe_send(self, force: bool = False) -> None:
        if not self.job.record.progress:
            return
        now = time.monotonic()
        if force or now - self._last_sent >= self.executor.progress_interval_s:
            self._last_sent = now
            text = self._text if self.job.record.task == "generate" else None
            self.executor._emit(Event(EventKind.PROGRESS, self.job, tokens=self.tokens, stages=self.stages,
                                      text=text, text_offset=self._text_sent))
            self._text_sent += len(self._text)
            self._text = ""


def _failed(job: QueuedJob, code: ErrorCode, message: str) -> Event:
    return Event(EventKind.FINISHED, job, JobState.FAILED, error=(code.value, message))
