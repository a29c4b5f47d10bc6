"""Dynamic batching of one-pass jobs: queued ``embed``, ``classify`` and ``forward`` jobs for the same
model share one weight sweep (hermesd.onepass merges and splits them).

The job the queue hands out first leads; queued jobs that may merge with it (same model, task and merge
key) join it, in queue order, while the batch stays within the model's ``max_batch`` and the memory
allowance of its plan (hermesd.plan.batchmem). Joining costs the leader only the extra rows' compute,
so companions are taken from anywhere in the queue.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hermes_client.protocol import JobState

from hermesd.daemon.events import Event, EventKind, Interrupted, Progress
from hermesd.daemon.hosting import ModelHost
from hermesd.daemon.jobs import QueuedJob
from hermesd.errors import TaskError
from hermesd.onepass import ONE_PASS_TASKS, merge_key, padded_length, row_count, run_merged
from hermesd.plan.batchmem import rows_fit

log = logging.getLogger("hermesd.batching")


def one_pass_companions(executor: Any, job: QueuedJob, host: ModelHost) -> list[QueuedJob]:
    """Queued jobs that can share ``job``'s sweep, taken out of the queue (empty if none may)."""
    record = job.record
    if record.task not in ONE_PASS_TASKS or host.settings.max_batch <= 1 or not len(executor.jobs):
        return []
    try:
        engine = host.ensure_open()
        key = merge_key(engine, record.task, record.inputs, record.params)
        if key is None:
            return []
        rows = row_count(record.task, record.inputs)
        tokens = _tokens(engine, record)
    except Exception:  # noqa: BLE001  (the job then runs alone and reports its own problem)
        return []
    state = {"rows": rows, "tokens": tokens}

    def wanted(other: QueuedJob) -> bool:
        mine = other.record
        if (mine.model, mine.task) != (record.model, record.task) or merge_key(
                engine, mine.task, mine.inputs, mine.params) != key:
            return False
        more_rows, more_tokens = state["rows"] + row_count(mine.task, mine.inputs), max(state["tokens"],
                                                                                          _tokens(engine, mine))
        if not rows_fit(engine.manifest, host.plan, more_rows, more_tokens):
            return False  # it waits for a later sweep
        state.update(rows=more_rows, tokens=more_tokens)
        return True

    return executor.jobs.take(wanted, host.settings.max_batch - 1)


def _tokens(engine: Any, record: Any) -> int:
    inputs = record.inputs
    if record.task == "forward" and isinstance(inputs, list) and inputs and isinstance(inputs[0], list):
        return len(inputs[0])
    texts = [inputs] if isinstance(inputs, (str, bytes)) else list(inputs)
    return padded_length(engine, texts)


def run_one_pass(executor: Any, jobs: list[QueuedJob], host: ModelHost) -> list[Event]:
    """Run ``jobs`` (one merge key) in one sweep; one final event per job.

    A member cancelled or past its deadline during the sweep gets that outcome and the others their
    results; a shutdown requeues them all. If the merged batch is refused (an input too long for the
    model, outputs too large together), each job runs alone and gets its own answer.
    """
    # Members stopped while queued (cancelled, past their deadline) end now, before anything runs for
    # them: a job whose deadline passed while a wedged daemon was restarted must not run again.
    early = {job.id: executor.ended(job) for job in jobs}
    stopped = [event for event in early.values() if event is not None]
    jobs = [job for job in jobs if early[job.id] is None]
    if not jobs:
        return stopped
    return stopped + _sweep(executor, jobs, host)


def _sweep(executor: Any, jobs: list[QueuedJob], host: ModelHost) -> list[Event]:
    """The merged sweep of :func:`run_one_pass` for members that may run."""
    task = jobs[0].record.task
    progress = Progress(executor, jobs, host)
    try:
        engine = host.ensure_open()
        for job in jobs:
            executor.before_job(job)
        executor.check_batch(jobs)
        engine.set_checkpoint(progress.stage)
        try:
            results = run_merged(engine, task, [(j.record.inputs, j.record.params) for j in jobs],
                                 images=executor.images)
        finally:
            engine.set_checkpoint(None)
            host.last_used = time.monotonic()
    except TaskError as exc:
        log.info("a batch of %d %s jobs was refused together (%s); running them one by one", len(jobs), task, exc)
        return [executor.solo_outcome(job) for job in jobs]
    except Interrupted as exc:
        return [executor.ended(job) or executor.failure(job, exc) for job in jobs]
    except Exception as exc:  # noqa: BLE001  (every member gets the failure as its outcome)
        return [executor.failure(job, exc) for job in jobs]
    stats = progress.stats(engine, len(jobs))
    return [executor.ended(job) or Event(EventKind.FINISHED, job, JobState.DONE, result={**result, "stats": stats})
            for job, result in zip(jobs, results)]
