"""Jobs before they run: validating a submit request, and the bounded priority queue.

A submit is checked completely here -- fields, types, model, task, inputs and parameters -- so that
only jobs that can run are journaled and queued; everything else gets an error reply at once.
"""

from __future__ import annotations

import heapq
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from hermes_client.protocol import MAX_CLIENT_JOB_ID, MAX_DEADLINE_S, PRIORITY_RANGE, TASK_NAMES, ErrorCode

from hermesd.daemon.config import ModelSettings
from hermesd.daemon.journal import JobRecord
from hermesd.errors import Refused, TaskError
from hermesd.tasks import check_inputs, check_params


def new_job_id() -> str:
    """128 random bits: an id cannot be guessed, though ownership, not secrecy, is what protects a job."""
    return "j-" + secrets.token_hex(16)


def validate_submit(message: dict[str, Any], models: dict[str, ModelSettings], owner: str) -> JobRecord:
    """A queued JobRecord owned by ``owner`` for a valid submit message, or Refused naming what is wrong."""
    task = _field(message, "task", str)
    if task not in TASK_NAMES:
        raise Refused(ErrorCode.UNKNOWN_TASK, f"unknown task {task!r}; tasks are {list(TASK_NAMES)}")
    model_name = _field(message, "model", str)
    if model_name not in models:
        raise Refused(ErrorCode.UNKNOWN_MODEL, f"unknown model {model_name!r}; models are {sorted(models)}")
    if "inputs" not in message:
        raise Refused(ErrorCode.BAD_REQUEST, "missing field 'inputs'")
    model = models[model_name]
    params = {**model.defaults.get(task, {}), **_field(message, "params", dict, default={})}
    _check_job(task, message["inputs"], params, model)
    priority = _field(message, "priority", int, default=0)
    if not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
        raise Refused(ErrorCode.BAD_REQUEST, f"priority must be in {PRIORITY_RANGE[0]}..{PRIORITY_RANGE[1]}")
    deadline_s = _field(message, "deadline_s", (int, float), default=None)
    if deadline_s is not None and not 0 < deadline_s <= MAX_DEADLINE_S:
        raise Refused(ErrorCode.BAD_REQUEST, f"deadline_s must be in (0, {MAX_DEADLINE_S:g}] seconds")
    client_job_id = _field(message, "client_job_id", str, default=None)
    if client_job_id is not None and not 0 < len(client_job_id) <= MAX_CLIENT_JOB_ID:
        raise Refused(ErrorCode.BAD_REQUEST, f"client_job_id must be 1..{MAX_CLIENT_JOB_ID} characters")
    now = time.time()
    return JobRecord(id=new_job_id(), model=model_name, task=task, inputs=message["inputs"], params=params,
                     priority=priority, deadline=now + deadline_s if deadline_s else None,
                     client_job_id=client_job_id, progress=bool(_field(message, "progress", bool, default=False)),
                     submitted=now, owner=owner)


def same_job(a: JobRecord, b: JobRecord) -> bool:
    """Whether two submits ask for the same work (a resend), judged by what decides the job's result."""
    return (a.task, a.model, a.inputs, a.params, a.priority) == (b.task, b.model, b.inputs, b.params, b.priority)


def _check_job(task: str, inputs: Any, params: dict[str, Any], model: ModelSettings) -> None:
    try:
        check_inputs(task, inputs)
        check_params(task, params)
    except TaskError as exc:
        raise Refused(ErrorCode.INVALID_PARAMS, str(exc)) from None
    requested = params.get("max_new_tokens", 0)
    if task == "generate" and requested > model.max_new_tokens:
        raise Refused(ErrorCode.INVALID_PARAMS, f"max_new_tokens {requested} is over this model's limit of "
                                                f"{model.max_new_tokens} (max_new_tokens in its config)")


_MISSING = object()


def _field(message: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = message.get(name, _MISSING)
    if value is _MISSING or (value is None and default is None):
        if default is _MISSING:
            raise Refused(ErrorCode.BAD_REQUEST, f"missing field {name!r}")
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise Refused(ErrorCode.BAD_REQUEST, f"field {name!r} must be {expected}, not {type(value).__name__}")
    return value


@dataclass
class QueuedJob:
    """A job waiting for or held by the executor (the daemon's in-memory view of a JobRecord)."""

    record: JobRecord
    reply_to: list[bytes] | None = None  # the ROUTER envelope of the submitting client, if still known
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"

    @property
    def id(self) -> str:
        return self.record.id


class JobQueue:
    """Bounded priority queue (higher priority first, then submission order), shared with the executor."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._heap: list[tuple[int, int, QueuedJob]] = []
        self._ids: set[str] = set()
        self._ready = threading.Condition()

    def __len__(self) -> int:
        with self._ready:
            return len(self._ids)

    def check_room(self) -> None:
        """Refused(BUSY) when the queue is full."""
        if len(self) >= self.capacity:
            raise Refused(ErrorCode.BUSY, f"the queue is full ({self.capacity} jobs); try again later")

    def put(self, job: QueuedJob, force: bool = False) -> int:
        """Queue a job and return its position (0 = next). Refused(BUSY) when full, unless ``force``."""
        if not force:
            self.check_room()
        with self._ready:
            heapq.heappush(self._heap, (-job.record.priority, job.record.seq, job))
            self._ids.add(job.id)
            self._ready.notify()
            return sum(1 for p, s, j in self._heap if j.id in self._ids and (p, s) < (-job.record.priority,
                                                                                   job.record.seq))

    def get(self, timeout: float) -> QueuedJob | None:
        """The next job, waiting up to ``timeout`` seconds; None if there is none."""
        with self._ready:
            deadline = time.monotonic() + timeout
            while True:
                while self._heap and self._heap[0][2].id not in self._ids:
                    heapq.heappop(self._heap)  # removed (cancelled) entries
                if self._heap:
                    job = heapq.heappop(self._heap)[2]
                    self._ids.discard(job.id)
                    return job
                left = deadline - time.monotonic()
                if left <= 0 or not self._ready.wait(left):
                    return None

    def remove(self, job_id: str) -> QueuedJob | None:
        """Take a queued job out (cancel); None if it is not queued."""
        with self._ready:
            if job_id not in self._ids:
                return None
            self._ids.discard(job_id)
            return next(j for _, _, j in self._heap if j.id == job_id)

    def jobs(self) -> list[QueuedJob]:
        """Queued jobs in the order they will run."""
        with self._ready:
            return [j for _, _, j in sorted(self._heap, key=lambda e: e[:2]) if j.id in self._ids]

    def head(self) -> QueuedJob | None:
        """The job that would run next, left in the queue; None if the queue is empty."""
        with self._ready:
            ordered = sorted((e for e in self._heap if e[2].id in self._ids), key=lambda e: e[:2])
            return ordered[0][2] if ordered else None

    def take(self, wanted: Callable[[QueuedJob], bool], limit: int) -> list[QueuedJob]:
        """Take up to ``limit`` queued jobs for which ``wanted`` is true, in queue order (a batch's
        companions). ``wanted`` is called in queue order and may keep state (a memory bound)."""
        taken: list[QueuedJob] = []
        with self._ready:
            for _, _, job in sorted((e for e in self._heap if e[2].id in self._ids), key=lambda e: e[:2]):
                if len(taken) >= limit:
                    break
                if wanted(job):
                    self._ids.discard(job.id)
                    taken.append(job)
        return taken
