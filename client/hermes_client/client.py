"""``Client``: submit jobs to hermesd over ZeroMQ and wait for their results.

Requests follow the zguide's Lazy Pirate pattern: send, poll for the reply with a timeout, and on
silence close the socket, reconnect and resend, a bounded number of times. Submits carry a client job
id, so a resent submit finds the job it already created instead of queueing a second one.

Job results are pushed by the daemon to the socket that submitted them. A reconnect gives the client a
new identity, and the daemon cannot reach the old one; ``Job.result`` therefore also asks for the job's
record when the socket has been quiet for a while, and the daemon keeps results for a retention period.
"""

from __future__ import annotations

import collections
import itertools
import os
import time
import uuid
from typing import Any, Iterator

import zmq

from hermes_client import protocol
from hermes_client.errors import DaemonUnreachable, JobCancelled, ServerError, server_error
from hermes_client.keys import curve_keys
from hermes_client.protocol import FINAL, Op, Reply
from hermes_client.textchunks import TextChunks

DEFAULT_ENDPOINT = "ipc:///run/hermesd/hermesd.sock"
ENDPOINT_ENV = "HERMES_ENDPOINT"
STATUS_POLL_S = 2.0
MAX_CACHED_JOBS = 256    # jobs whose pushed messages a client keeps until asked for
MAX_CACHED_EVENTS = 64   # messages kept per job (the newest: progress is cumulative, the final comes last)
# Replies carry results (long vectors): decoded with wider limits than the daemon applies to requests.
REPLY_MAX_BYTES, REPLY_MAX_ITEMS, REPLY_MAX_NESTING = 1 << 30, 1 << 27, 64  # a job quiet for this long is looked up by id (its push may have gone to an old socket)


def default_endpoint() -> str:
    """``$HERMES_ENDPOINT``, else the daemon's default ipc socket under /run/hermesd."""
    return os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ``ipc://`` endpoint (None for TCP or Linux's abstract ``ipc://@name``).

    Raises ValueError, in one line, for an endpoint ZeroMQ could not connect to: a scheme other than
    ipc:// or tcp://, an empty path, or a TCP address without a host or a port in 1..65535.
    """
    scheme, sep, address = endpoint.partition("://")
    if not sep or scheme not in ("ipc", "tcp") or not address:
        raise ValueError(f"endpoint {endpoint!r}: expected ipc://PATH or tcp://HOST:PORT")
    if scheme == "ipc":
        return None if address.startswith("@") else address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT with a port in 1..65535")
    return None


class Client:
    """A connection to one hermesd endpoint. Not thread-safe: use one Client per thread.

    timeout: seconds to wait for each reply before retrying; retries: resends before giving up
    with DaemonUnreachable. server_key, client_key: CURVE for a ``tcp://`` endpoint (see
    hermes_client.keys; default ``$HERMES_SERVER_KEY`` and ``$HERMES_CLIENT_KEY``). A daemon that
    refuses the key never answers: the client gives up with DaemonUnreachable.
    """

    def __init__(self, endpoint: str | None = None, timeout: float = 10.0, retries: int = 3,
                 context: zmq.Context | None = None, server_key: str | None = None,
                 client_key: str | None = None) -> None:
        self.endpoint = endpoint or default_endpoint()
        ipc_path(self.endpoint)  # a malformed endpoint is a ValueError here, not a ZMQError at connect
        self._keys = curve_keys(server_key, client_key) if self.endpoint.startswith("tcp://") else None
        self.timeout = timeout
        self.retries = retries
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._rids = itertools.count(1)
        self._events = _EventCache()
        self._connect()

    # -- connection ---------------------------------------------------------------------------
    def _connect(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            self._keys.apply(socket)
        socket.connect(self.endpoint)
        self._socket = socket

    def _reconnect(self) -> None:
        self._socket.close(linger=0)
        self._connect()

    def close(self) -> None:
        """Close the socket; pending results stay with the daemon, fetchable by job id."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- messages -----------------------------------------------------------------------------
    def _send(self, message: dict[str, Any]) -> None:
        """Send without blocking: a message waits in the socket until the daemon connects; if the
        socket's queue is full it is dropped, the caller's poll times out and the Lazy Pirate loop
        reconnects and resends."""
        try:
            self._socket.send_multipart([b"", protocol.pack(message)], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _receive(self, timeout: float) -> dict[str, Any] | None:
        """The next well-formed message within ``timeout`` seconds, or None."""
        deadline = time.monotonic() + timeout
        while self._socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            frames = self._socket.recv_multipart()
            try:
                return protocol.unpack(frames[-1], max_bytes=REPLY_MAX_BYTES, max_items=REPLY_MAX_ITEMS,
                                       max_nesting=REPLY_MAX_NESTING)
            except protocol.DecodeError:
                continue  # not from a hermesd we understand: keep waiting for the real reply
        return None

    def request(self, op: Op | str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply (Lazy Pirate: resend on silence, reconnecting).

        Job pushes that arrive meanwhile are kept for their Job handles. Error replies raise ServerError.
        """
        op = Op(op).value
        for attempt in range(self.retries + 1):
            rid = next(self._rids)
            self._send({"op": op, "rid": rid, **fields})
            deadline = time.monotonic() + self.timeout
            while (left := deadline - time.monotonic()) > 0:
                reply = self._receive(left)
                if reply is None:
                    break
                if reply.get("rid") == rid:
                    if reply.get("type") == Reply.ERROR.value:
                        raise server_error(reply)
                    return reply
                self._keep_event(reply)
            if attempt < self.retries:
                self._reconnect()
        raise DaemonUnreachable(f"no reply from {self.endpoint} after {self.retries + 1} tries "
                                f"of {self.timeout:g} s")

    def _keep_event(self, message: dict[str, Any]) -> None:
        job_id = message.get("job_id")
        if isinstance(job_id, str) and message.get("type") in (Reply.PROGRESS.value, *FINAL):
            self._events.add(job_id, message)

    # -- API ----------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        """The daemon's version and uptime."""
        return self.request(Op.PING)

    def status(self) -> dict[str, Any]:
        """Daemon status: state, queue, current job, memory, temperature, watchdogs."""
        return self.request(Op.STATUS)

    def models(self) -> list[dict[str, Any]]:
        """The configured models with their plans and task defaults."""
        return self.request(Op.MODELS)["models"]

    def unload(self, model: str) -> bool:
        """Ask the daemon to release a model's memory between jobs; True if it was loaded."""
        return bool(self.request(Op.UNLOAD, model=model)["unloading"])

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's record: state, and its result or error once it has ended."""
        return self.request(Op.JOB, job_id=job_id)["job"]

    def cancel(self, job_id: str) -> bool:
        """Ask to cancel a job; True if it was still queued or running."""
        return bool(self.request(Op.CANCEL, job_id=job_id)["cancelled"])

    def submit(self, task: str, model: str, inputs: Any, params: dict[str, Any] | None = None, *,
               priority: int = 0, deadline_s: float | None = None, client_job_id: str | None = None,
               progress: bool = False) -> "Job":
        """Queue a job and return its handle. Refusals (unknown model, bad params, busy) raise ServerError."""
        fields: dict[str, Any] = {"task": task, "model": model, "inputs": inputs, "params": params or {},
                                  "priority": priority, "client_job_id": client_job_id or uuid.uuid4().hex,
                                  "progress": progress}
        if deadline_s is not None:
            fields["deadline_s"] = deadline_s
        reply = self.request(Op.SUBMIT, **fields)
        return Job(self, reply["job_id"], fields["client_job_id"], reply.get("position", 0))

    def generate(self, model: str, prompt: str | list[dict[str, str]], timeout: float | None = None,
                 **params: Any) -> dict[str, Any]:
        """Generate text and wait for it: {"text", "prompt_tokens", "new_tokens", "finish_reason", "stats"}."""
        return self.submit("generate", model, prompt, params).result(timeout)

    def generate_stream(self, model: str, prompt: str | list[dict[str, str]], timeout: float | None = None,
                        **params: Any) -> Iterator[str]:
        """Generate text and yield it in pieces as the daemon produces them; together they are the text.

        Ends when the job does (JobFailed / JobCancelled are raised after the pieces that came). For the
        result's counts and stats use ``submit(..., progress=True)``, then ``job.text()`` and ``job.result()``.
        """
        return self.submit("generate", model, prompt, params, progress=True).text(timeout)

    def embed(self, model: str, texts: str | list[str], timeout: float | None = None,
              **params: Any) -> dict[str, Any]:
        """Embed texts and wait: {"embeddings": [[float]], "stats", ...}."""
        return self.submit("embed", model, texts, params).result(timeout)

    def classify(self, model: str, inputs: str | bytes | list[str | bytes], timeout: float | None = None,
                 **params: Any) -> dict[str, Any]:
        """Classify texts, or images (their bytes, or paths under the daemon's image_dirs), and wait:
        {"labels": [[{label, score}]]}."""
        return self.submit("classify", model, inputs, params).result(timeout)

    # -- job events -----------------------------------------------------------------------------
    def _next_event(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        """The next progress or final message of a job within ``timeout``, looking it up when quiet."""
        deadline = time.monotonic() + timeout
        while True:
            if (event := self._events.pop(job_id)) is not None:
                return event
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            message = self._receive(min(left, STATUS_POLL_S))
            if message is not None:
                self._keep_event(message)
                continue
            record = self.job(job_id)
            if record["state"] in protocol.ENDED:
                return _final_from_record(record)


class _EventCache:
    """Pushed job messages waiting for their Job handle, bounded in jobs and in messages per job.

    Pushes for jobs nobody waits on (a job submitted and forgotten, another process's resubmit) would
    otherwise pile up for the life of the client. What is dropped is never lost for good: a quiet job
    is looked up by id (``Client._next_event``). Dropping progress keeps the newest, and so the final.
    """

    def __init__(self, max_jobs: int = MAX_CACHED_JOBS, max_per_job: int = MAX_CACHED_EVENTS) -> None:
        self.max_jobs = max_jobs
        self.max_per_job = max_per_job
        self._jobs: collections.OrderedDict[str, collections.deque[dict[str, Any]]] = collections.OrderedDict()

    def __len__(self) -> int:
        return sum(len(events) for events in self._jobs.values())

    def add(self, job_id: str, message: dict[str, Any]) -> None:
        events = self._jobs.get(job_id)
        if events is None:
            while len(self._jobs) >= self.max_jobs:
                self._jobs.popitem(last=False)  # the job heard from longest ago
            events = self._jobs[job_id] = collections.deque(maxlen=self.max_per_job)
        self._jobs.move_to_end(job_id)
        events.append(message)

    def pop(self, job_id: str) -> dict[str, Any] | None:
        """The oldest message kept for ``job_id``, or None."""
        events = self._jobs.get(job_id)
        if not events:
            return None
        event = events.popleft()
        if not events:
            del self._jobs[job_id]
        return event


class Job:
    """A submitted job: wait for its result, follow its progress, or cancel it."""

    def __init__(self, client: Client, job_id: str, client_job_id: str, position: int) -> None:
        self.client = client
        self.id = job_id
        self.client_job_id = client_job_id
        self.position = position
        self._final: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def progress(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield progress messages ({"tokens", "stages"}, and for generate {"text", "text_offset"}: see
        ``text``) until the job ends (then see ``result``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._final is None:
            left = STATUS_POLL_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {self.id} still running after {timeout:g} s")
            event = self.client._next_event(self.id, left)
            if event is None:
                continue
            if event["type"] == Reply.PROGRESS.value:
                yield event
            else:
                self._final = event

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.progress()

    def text(self, timeout: float | None = None) -> Iterator[str]:
        """Yield a generate job's new text as it arrives (submit it with ``progress=True``), then raise
        as ``result`` would if the job failed or was cancelled. The pieces add up to the result's text."""
        chunks = TextChunks()
        for event in self.progress(timeout):
            if piece := chunks.take(event):
                yield piece
        if piece := chunks.rest(self.result(0).get("text", "")):
            yield piece

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job's end: its result, or JobFailed / JobCancelled / TimeoutError."""
        for _ in self.progress(timeout):
            pass
        final = self._final
        if final["type"] == Reply.CANCELLED.value:
            raise JobCancelled(self.id)
        if final["type"] == Reply.ERROR.value:
            raise server_error(final, final=True)
        return final["result"]

    def cancel(self) -> bool:
        """Ask the daemon to cancel this job; True if it was still queued or running."""
        return self.client.cancel(self.id)

    def status(self) -> dict[str, Any]:
        """The job's record as the daemon has it now."""
        return self.client.job(self.id)


def _final_from_record(record: dict[str, Any]) -> dict[str, Any]:
    """The final message a job's record stands for (used when its push was lost)."""
    error = record.get("error") or {}
    return protocol.final_reply(record["id"], record["state"], record.get("result"), error.get("code"),
                                error.get("message"))


__all__ = ["Client", "Job", "ServerError", "default_endpoint", "ipc_path"]
