"""Continuous batching of ``generate`` jobs on the executor thread (hermesd.decodebatch does the model work).

The first generate job the queue hands out opens a batch; each step is one sweep for all members.
At every step boundary:

1. members cancelled or past their deadline leave (their own outcome; the others go on);
2. queued generate jobs for the same model join, in queue order, while the job at the head of the
   queue is one: the head is never skipped, so a job for another model (or one that does not fit the
   memory allowance yet) closes the batch to joiners until it has run. That is the fairness rule: every
   member advances one token per sweep, a short job joining a long one finishes after its own tokens,
   and a waiting job waits at most for the running members' ``max_new_tokens``;
3. when the batch is full and the head job has a higher priority than a member, the lowest-priority
   member (the latest to join among equals) is put back in the queue (it restarts later from its
   prompt; seeds make its result the same) and the head job takes its place at once;
4. joiners run their prompt pass together (one sweep) and the step runs. Jobs already queued when a
   batch opens (submitted together, or while the model was loading) join its first prompt pass.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from hermes_client.protocol import JobState

from hermesd.daemon.events import Event, EventKind, Interrupted, Progress
from hermesd.daemon.hosting import ModelHost
from hermesd.daemon.jobs import QueuedJob
from hermesd.decodebatch import DecodeBatch, Sequence, prepare, supports_batching
from hermesd.plan.batchmem import allowance, batch_bytes
from hermesd.tasks import GenerateParams, check_params
from hermesd.textstream import TextStream


def run_generate(executor: Any, first: QueuedJob, host: ModelHost) -> None:
    """Run ``first`` and every generate job that joins it until the batch is empty (events as they end)."""
    executor.begin([first])
    loop = _Loop(executor, host)
    try:
        loop.run(first)
    finally:
        executor.end()


class _Loop:
    """One batch on one model, from its first job until its last member leaves."""

    def __init__(self, executor: Any, host: ModelHost) -> None:
        self.executor = executor
        self.host = host
        self.progress = Progress(executor, [], host)
        self.members: dict[int, QueuedJob] = {}  # id(Sequence) -> its job, for the batch's rows
        self.open: dict[str, QueuedJob] = {}  # started and not yet ended
        self.probes: dict[str, Sequence] = {}  # sequences prepared while deciding admission
        self.streams: dict[str, TextStream | None] = {}  # job id -> its streamed text (progress clients)
        self.joined: dict[str, tuple[float, int]] = {}  # job id -> (time, engine passes) when it joined
        self.batch: DecodeBatch | None = None
        self.limit = host.settings.max_batch
        self.peak = 0

    def run(self, first: QueuedJob) -> None:
        self.open[first.id] = first
        try:
            engine = self.host.ensure_open()
            self.executor.raise_if_stopped(first)  # cancelled or past its deadline while queued: no sweep
            self.executor.before_job(first)
            self.batch = DecodeBatch(engine, fp32_prompts=self.host.settings.fp32_prompts)
            if not supports_batching(engine):
                self.limit = 1
            joining = self._prepared([first])
            joining += self._take_joiners(joining)  # queued meanwhile (while the model opened): one prompt sweep
            engine.set_checkpoint(self.progress.stage)
            with engine.span():
                self._loop(joining)
        except Exception as exc:  # noqa: BLE001  (the whole batch ends with it: shutdown, a damaged store)
            shutdown = isinstance(exc, Interrupted) and exc.reason == "shutdown"
            for job in list(self.open.values()):
                event = None if shutdown else self.executor.ended(job)
                self._leave(job, event or self.executor.failure(job, exc))
        finally:
            if self.host.engine is not None:
                self.host.engine.set_checkpoint(None)
            self.host.last_used = time.monotonic()

    def _loop(self, joining: list[Sequence]) -> None:
        while joining or len(self.batch):
            if joining:
                self._admit(joining)
            self._drop_stopped()
            if len(self.batch):
                self.progress.jobs = self._jobs()
                self._finish(self.batch.step())
            joining = self._take_joiners()

    # -- membership ---------------------------------------------------------------------------
    def _jobs(self) -> list[QueuedJob]:
        return list(self.open.values())

    def _prepared(self, jobs: list[QueuedJob]) -> list[Sequence]:
        """Sequences for jobs just taken; a job that cannot run (a prompt too long) ends here."""
        seqs = []
        for job in jobs:
            try:
                seqs.append(self._sequence(job))
            except Exception as exc:  # noqa: BLE001  (a TaskError for this job alone)
                self._leave(job, self.executor.failure(job, exc))
        return seqs

    def _sequence(self, job: QueuedJob) -> Sequence:
        record = job.record
        seq = self.probes.pop(job.id, None)
        if seq is None:
            params = GenerateParams(**check_params("generate", dict(record.params)))
            seq = prepare(self.batch.engine, record.inputs, params)
        seq.owner = job
        seq.on_token = self._token_callback(job, seq)
        self.members[id(seq)] = job
        return seq

    def _token_callback(self, job: QueuedJob, seq: Sequence) -> Callable[[int], None]:
        """Each new token: its text once final (streamed to a client that asked for progress), then the count."""
        stream = TextStream(self.batch.engine.tokenizer, seq.params.stop) if job.record.progress else None
        self.streams[job.id] = stream
        self.progress.restart(job)

        def on_token(token: int) -> None:
            if stream is not None and (piece := stream.push(token)):
                self.progress.text(piece, job)
            self.progress.token(token, job)

        return on_token

    def _admit(self, joining: list[Sequence]) -> None:
        self.progress.jobs = self._jobs()
        for seq in joining:
            self.joined[seq.owner.id] = (time.monotonic(), self.batch.engine.live_stats().passes)
        self._finish(self.batch.admit(joining))
        self.peak = max(self.peak, len(self.batch))

    def _drop_stopped(self) -> None:
        leaving = [(seq, event) for seq in self.batch.seqs
                   if (event := self.executor.ended(self.members[id(seq)])) is not None]
        self.batch.remove([seq for seq, _ in leaving])
        for seq, event in leaving:
            self._leave(self.members.pop(id(seq)), event)

    def _finish(self, finished: list[Sequence]) -> None:
        self.batch.remove(finished)
        for seq in finished:
            job = self.members.pop(id(seq))
            result = {**self.batch.result(seq), "stats": self._stats(job)}
            stream = self.streams.pop(job.id, None)
            if stream is not None and (rest := stream.flush()):
                self.progress.text(rest, job)
            self.progress.send_text(job)  # the last text goes out before the result
            self._leave(job, self.executor.ended(job) or Event(EventKind.FINISHED, job, JobState.DONE, result=result))

    def _leave(self, job: QueuedJob, event: Event) -> None:
        self.open.pop(job.id, None)
        self.joined.pop(job.id, None)
        self.progress.jobs = self._jobs()
        self.executor.leave(event)

    def _stats(self, job: QueuedJob) -> dict[str, Any]:
        """The batch run's statistics as this job saw them: its own time and passes, the batch's peak."""
        stats = self.progress.stats(self.batch.engine, self.peak)
        since, passes = self.joined.get(job.id, (time.monotonic(), 0))
        stats.update(passes=stats["passes"] - passes, member_wall_s=round(time.monotonic() - since, 3))
        if self.batch.fp32_prompts:
            stats["fp32_linears"] = self.batch.fp32_linears  # the batch's prompt passes so far (hermesd.fp32linear)
        return stats

    # -- joining ------------------------------------------------------------------------------
    def _take_joiners(self, joining: list[Sequence] = ()) -> list[Sequence]:
        """Queued generate jobs for this model from the head of the queue, while they fit beside the
        batch and ``joining`` (sequences about to join already)."""
        if self.executor.stopping:  # draining: queued jobs stay journaled for the next start
            return []
        self._preempt_for_head()
        state = _Admission(self, list(joining))
        taken = self.executor.jobs.take(state.wanted, max(0, self.limit - len(self.batch) - len(joining)))
        if not taken:
            return []
        self.probes.update(state.probes)
        for job in taken:
            self.open[job.id] = job
        self.executor.admit(taken)
        live = []
        for job in taken:
            event = self.executor.ended(job)  # past its deadline while queued: it ends without a sweep
            if event is not None:
                self._leave(job, event)
                continue
            self.executor.before_job(job)
            live.append(job)
        return self._prepared(live)

    def _preempt_for_head(self) -> None:
        head = self.executor.jobs.head()
        if head is None or not _compatible(head, self.host) or len(self.batch) < self.limit:
            return
        victim = min(self.batch.seqs, key=lambda s: (s.owner.record.priority, -s.owner.record.seq))
        if victim.owner.record.priority >= head.record.priority:
            return
        self.batch.remove([victim])
        job = self.members.pop(id(victim))
        self.executor.jobs.put(job, force=True)  # before its event: the queue never loses it
        self._leave(job, Event(EventKind.REQUEUED, job))


def _compatible(job: QueuedJob, host: ModelHost) -> bool:
    return job.record.task == "generate" and job.record.model == host.name


class _Admission:
    """Decides, in queue order, which queued jobs join now: compatible, in room, never past the head."""

    def __init__(self, loop: _Loop, joining: list[Sequence]) -> None:
        self.loop = loop
        self.closed = False
        self.joining = joining
        self.probes: dict[str, Sequence] = {}
        self.room = allowance(loop.host.plan) if loop.host.plan is not None else None

    def wanted(self, job: QueuedJob) -> bool:
        if self.closed or not _compatible(job, self.loop.host):
            self.closed = True  # the head is never skipped
            return False
        if self.loop.executor.stopped(job):
            return True  # taken to end at once (its deadline passed while it waited)
        if self.room is not None and not self._fits(job):
            self.closed = True
            return False
        return True

    def _fits(self, job: QueuedJob) -> bool:
        batch = self.loop.batch
        try:
            params = GenerateParams(**check_params("generate", dict(job.record.params)))
            probe = prepare(batch.engine, job.record.inputs, params)
        except Exception:  # noqa: BLE001  (it joins and fails with its own error)
            return True
        joining = [*self.joining, probe]
        need = batch_bytes(batch.engine.manifest, len(batch) + len(joining), batch.projected_length(joining),
                           len(joining), max(len(s.prompt) for s in joining), fp32=batch.fp32_prompts)
        if need > self.room and (len(batch) or self.joining):
            return False  # it waits for members to leave (alone, the plan was made for it)
        self.joining.append(probe)
        self.probes[job.id] = probe
        return True
