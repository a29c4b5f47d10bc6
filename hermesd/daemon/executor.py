"""The executor: one thread that runs jobs on the engine, so the socket loop never waits on inference.

It takes jobs from the JobQueue and reports what happens as events on an outbox that the main loop
drains (the main thread alone owns the sockets and the journal). Between stages a checkpoint applies
cancels, deadlines and the watchdogs' pauses, and marks progress for the systemd watchdog: a wedged
engine stops marking progress, the daemon stops its WATCHDOG=1 pings and systemd restarts it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from hermes_client.protocol import ErrorCode, JobState

from hermesd.daemon.batching import one_pass_companions, run_one_pass
from hermesd.daemon.events import Event, EventKind, Interrupted, Progress, failed
from hermesd.daemon.generating import run_generate
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


class Executor(threading.Thread):
    """Runs queued jobs on the loaded models: one job, or a batch of jobs sharing each weight sweep
    (hermesd.daemon.batching for one-pass tasks, hermesd.daemon.generating for generate)."""

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
        self.batch: list[QueuedJob] = []  # the jobs running now (replaced, never mutated: other threads read it)
        self.last_progress = time.monotonic()
        self.paused_s = 0.0  # time held by the gate, this job
        self.evicted = 0     # resident stages shed, this job
        self._wake = wake
        self._before_job = before_job
        self._stopping = threading.Event()
        self._control: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    @property
    def current(self) -> QueuedJob | None:
        """The first running job (None between jobs); ``batch`` has all of them."""
        batch = self.batch
        return batch[0] if batch else None

    @property
    def stopping(self) -> bool:
        """Told to take no further jobs (draining or stopping)."""
        return self._stopping.is_set()

    def running(self, job_id: str) -> QueuedJob | None:
        """The running job with this id, if the executor holds it."""
        return next((job for job in self.batch if job.id == job_id), None)

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
        host = self.hosts.get(job.record.model)
        if host is not None and job.record.task == "generate":
            return run_generate(self, job, host)
        jobs = [job, *one_pass_companions(self, job, host)] if host is not None else [job]
        self.begin(jobs)
        try:
            events = [self.solo_outcome(job)] if len(jobs) == 1 else run_one_pass(self, jobs, host)
        finally:
            self.end()
        for event in events:
            self._emit(event)

    def begin(self, jobs: list[QueuedJob]) -> None:
        """Jobs start running (one event each); the gate's and residency's counters start afresh."""
        self.batch, self.paused_s, self.evicted = list(jobs), 0.0, 0
        for job in jobs:
            self._emit(Event(EventKind.STARTED, job))

    def end(self) -> None:
        self.batch = []
        self.last_progress = time.monotonic()

    def admit(self, jobs: list[QueuedJob]) -> None:
        """Jobs join the running batch (generate's next step)."""
        self.batch = [*self.batch, *jobs]
        for job in jobs:
            self._emit(Event(EventKind.STARTED, job))

    def leave(self, event: Event) -> None:
        """A job of the running batch ends (its final event); the others go on."""
        self.batch = [job for job in self.batch if job is not event.job]
        self._emit(event)

    def solo_outcome(self, job: QueuedJob) -> Event:
        """Run one job and say how it ended; no exception escapes (the executor must keep serving)."""
        record = job.record
        host = self.hosts.get(record.model)
        if host is None:
            return failed(job, ErrorCode.UNKNOWN_MODEL, f"model {record.model!r} is no longer configured")
        try:
            self._check(job)
            self.before_job(job)
            params = dict(record.params)
            engine = host.ensure_open()  # loads a model configured with load = "first_use" or released idle
            progress = Progress(self, [job], host)
            engine.set_checkpoint(progress.stage)
            try:
                result = run_task(engine, record.task, record.inputs, params, on_token=progress.token,
                                  check=progress.step, images=self.images, on_text=progress.text)
                progress.send_text()  # the last text goes out before the result
            finally:
                engine.set_checkpoint(None)
                host.last_used = time.monotonic()
            return Event(EventKind.FINISHED, job, JobState.DONE, result={**result, "stats": progress.stats(engine)})
        except Exception as exc:  # noqa: BLE001  (every failure becomes the job's outcome)
            return self.failure(job, exc)

    def before_job(self, job: QueuedJob) -> None:
        if self._before_job is not None:
            self._before_job(job)

    def failure(self, job: QueuedJob, exc: Exception) -> Event:
        """How an exception ends ``job``: interrupted, refused, a damaged store or a bug (never raised on)."""
        record = job.record
        if isinstance(exc, Interrupted):
            return self._interrupted(job, exc.reason)
        if isinstance(exc, TaskError):
            return failed(job, ErrorCode.INVALID_PARAMS, str(exc))
        if isinstance(exc, StoreError):
            log.error("job %s: model %s has a damaged store: %s", record.id, record.model, exc)
            return failed(job, ErrorCode.TASK_FAILED, str(exc))
        if isinstance(exc, HermesError):
            return failed(job, ErrorCode.TASK_FAILED, str(exc))
        log.error("job %s failed", record.id, exc_info=exc)  # a bug or an input the model chokes on
        return failed(job, ErrorCode.TASK_FAILED, f"{type(exc).__name__}: {exc}")

    def stopped(self, job: QueuedJob) -> str | None:
        """Why ``job`` must not go on (cancel reason or "deadline"), or None."""
        try:
            self._check(job)
        except Interrupted as exc:
            return exc.reason
        return None

    def raise_if_stopped(self, job: QueuedJob) -> None:
        """Raise Interrupted if ``job`` must not go on (cancel, deadline)."""
        self._check(job)

    def ended(self, job: QueuedJob) -> Event | None:
        """The final event of a batch member that must stop now (cancel, deadline), or None."""
        reason = self.stopped(job)
        return None if reason is None else self._interrupted(job, reason)

    def check_batch(self, jobs: list[QueuedJob]) -> None:
        """Raise Interrupted when the whole sweep must end: a shutdown, or every member stopped.

        A member cancelled alone leaves at the next step boundary; the others' sweep goes on.
        """
        reasons = [self.stopped(job) for job in jobs]
        if "shutdown" in reasons:
            raise Interrupted("shutdown")
        if reasons and all(reasons):
            raise Interrupted(reasons[0])

    def _interrupted(self, job: QueuedJob, reason: str) -> Event:
        if reason == "shutdown":
            return Event(EventKind.REQUEUED, job)
        if reason == "deadline":
            return failed(job, ErrorCode.DEADLINE_EXCEEDED, "the job's deadline passed")
        return Event(EventKind.FINISHED, job, JobState.CANCELLED)

    def _check(self, job: QueuedJob) -> None:
        """Raise Interrupted if the job must not go on (called before it starts and between stages)."""
        if job.cancel.is_set():
            raise Interrupted(job.cancel_reason)
        if job.record.deadline is not None and time.time() > job.record.deadline:
            raise Interrupted("deadline")

    def wait_at_gate(self, jobs: list[QueuedJob]) -> None:
        """Block while the watchdogs hold execution (the whole batch), still honouring cancels and deadlines."""
        if not self.gate.held:
            return
        started = time.monotonic()
        while not self.gate.wait(0.2):
            self.last_progress = time.monotonic()  # paused on purpose, not wedged
            self.check_batch(jobs)
        self.paused_s += time.monotonic() - started


