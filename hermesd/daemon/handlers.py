"""Request handlers: one ``handle_<op>`` per protocol verb, and the dispatch that picks it.

Every handler runs on the daemon's main thread and returns the reply body (or None when it has
replied itself). A handler refuses with ``Refused(code, message)``; any other exception costs that one
request an ``internal`` error, never the daemon.

Ownership: each request comes with the sender's identity (hermesd.daemon.identity). A job belongs to
the identity that submitted it; to any other, ``job`` and ``cancel`` answer ``not_found`` exactly as for
an id that never existed, and ``status`` shows it only in counts.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hermes_client import protocol
from hermes_client.protocol import ErrorCode, JobState, Op, Reply

from hermesd.daemon.costs import ModelShape, check_costs
from hermesd.daemon.jobs import QueuedJob, same_job, validate_submit
from hermesd.daemon.journal import JobRecord
from hermesd.daemon.status_report import status_reply
from hermesd.errors import Refused, StoreError
from hermesd.store.manifest import Manifest
from hermesd.version import __version__

log = logging.getLogger("hermesd.server")
OPS = frozenset(op.value for op in Op)


class RequestHandlers:
    """Answers the requests of one daemon from its queue, journal, executor and models."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon  # the hermesd.daemon.server.Daemon that owns these handlers (not imported: it imports us)

    def dispatch(self, envelope: list[bytes], payload: bytes, owner: str) -> None:
        """Decode one request from ``owner``, run its handler, and send the reply with the request's ``rid``."""
        rid = None
        try:
            message = protocol.unpack(payload, self.daemon.settings.max_message_bytes)
            rid = _checked_rid(message)
            op = _checked_op(message)
            reply = getattr(self, f"handle_{op}")(message, envelope, owner)
        except protocol.DecodeError as exc:
            reply = protocol.error(exc.code, str(exc))
        except Refused as exc:
            reply = protocol.error(exc.code, exc.message)
        except Exception as exc:  # a bug must cost one request, never the daemon
            log.exception("request failed")
            reply = protocol.error(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
        if reply is not None:
            self.daemon.send(envelope, {**reply, "rid": rid})

    def handle_ping(self, message: dict[str, Any], envelope: list[bytes], owner: str) -> dict[str, Any]:
        return {"type": Reply.PONG.value, "version": __version__, "protocol": protocol.PROTOCOL_VERSION,
                "uptime_s": round(time.monotonic() - self.daemon.started, 3), "state": self.daemon.state.value}

    def handle_status(self, message: dict[str, Any], envelope: list[bytes], owner: str) -> dict[str, Any]:
        return status_reply(self.daemon.view(), owner)

    def handle_models(self, message: dict[str, Any], envelope: list[bytes], owner: str) -> dict[str, Any]:
        return {"type": Reply.MODELS.value, "models": [host.describe() for host in list(self.daemon.hosts.values())]}

    def handle_unload(self, message: dict[str, Any], envelope: list[bytes], owner: str) -> dict[str, Any]:
        """Release a model's engine before the executor's next job; the next job of it loads it again."""
        name = message.get("model")
        if not isinstance(name, str):
            raise Refused(ErrorCode.BAD_REQUEST, "field 'model' must be a string")
        host = self.daemon.hosts.get(name)
        if host is None:
            raise Refused(ErrorCode.UNKNOWN_MODEL, f"no model {name[:64]!r} in this daemon's config")
        loaded = host.engine is not None  # before the executor may act on the release
        self.daemon.executor.between_jobs(host.release)
        return {"type": Reply.MODELS.value, "models": [host.describe()], "unloading": loaded}

    def handle_job(self, message: dict[str, Any], envelope: list[bytes], owner: str) -> dict[str, Any]:
        return {"type": Reply.JOB.value, "job": self._record(message, owner).public()}

    def handle_cancel(self, message: dict[str, Any], envelope: list[bytes], owner: str) -> dict[str, Any]:
        daemon = self.daemon
        record = self._record(message, owner)
        queued = daemon.queue.remove(record.id)
        if queued is not None:
            daemon.finish(queued, JobState.CANCELLED)
            return {"type": Reply.JOB.value, "job": daemon.journal.get(record.id).public(), "cancelled": True}
        # or taken by the executor, its "started" event not yet handled
        running = daemon.running.get(record.id) or daemon.executor.running(record.id)
        if running is None:
            return {"type": Reply.JOB.value, "job": record.public(), "cancelled": False}
        daemon.journal.request_cancel(record.id)  # durable before "cancelled": a crash must not forget it
        running.cancel.set()
        return {"type": Reply.JOB.value, "job": daemon.journal.get(record.id).public(), "cancelled": True}

    def handle_submit(self, message: dict[str, Any], envelope: list[bytes], owner: str) -> dict[str, Any] | None:
        daemon = self.daemon
        if not daemon.accepting:
            raise Refused(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down; submit again after it restarts")
        record = validate_submit(message, daemon.settings.models, owner)
        check_costs(record.task, record.inputs, record.params, daemon.settings.models[record.model],
                    self._shape(record.model), daemon.settings)
        if record.client_job_id and (known := daemon.journal.by_client_id(owner, record.client_job_id)):
            if not same_job(known, record):
                raise Refused(ErrorCode.CONFLICT, f"client_job_id {record.client_job_id!r} is already job "
                                                  f"{known.id}, submitted with a different task, model, inputs, "
                                                  f"params or priority; use a new client_job_id")
            return self._duplicate(known, envelope, message.get("rid"))
        daemon.watchdogs.admit()  # raises Refused(overheated | memory_pressure)
        daemon.queue.check_room()  # before the journal: a refused job leaves no trace
        daemon.journal.add(record)  # durable before the client hears "accepted"
        position = daemon.queue.put(QueuedJob(record, reply_to=envelope), force=True)
        log.info("job %s accepted: %s %s, priority %d, position %d", record.id, record.model, record.task,
                 record.priority, position)
        return {"type": Reply.ACCEPTED.value, "job_id": record.id, "position": position}

    def _duplicate(self, known: JobRecord, envelope: list[bytes], rid: Any) -> None:
        """A resent submit (same client job id): confirm the job; if it has ended, resend its end."""
        daemon = self.daemon
        daemon.send(envelope, {"type": Reply.ACCEPTED.value, "job_id": known.id, "position": 0,
                               "duplicate": True, "rid": rid})
        queued = next((j for j in daemon.queue.jobs() if j.id == known.id), None) or daemon.running.get(known.id)
        if queued is not None:
            queued.reply_to = envelope  # the client reconnected: deliver the end to its new socket
        elif known.ended:
            daemon.send(envelope, final_message(known))
        return None

    def _shape(self, name: str) -> ModelShape:
        """The sizes of a configured model: from its open engine, else (reload under way) its store."""
        settings = self.daemon.settings.models[name]
        host = self.daemon.hosts.get(name)
        engine = host.engine if host is not None and host.settings == settings else None
        if engine is not None:
            return ModelShape.of(engine.manifest)
        try:
            return ModelShape.of(Manifest.load(settings.store))
        except StoreError as exc:
            raise Refused(ErrorCode.UNKNOWN_MODEL, f"model {name!r} cannot be read: {exc}") from None

    def _record(self, message: dict[str, Any], owner: str) -> JobRecord:
        """The job a request names, if ``owner`` submitted it; another's job is "not found", like no job."""
        job_id = message.get("job_id")
        if not isinstance(job_id, str):
            raise Refused(ErrorCode.BAD_REQUEST, "field 'job_id' must be a string")
        record = self.daemon.journal.get(job_id)
        if record is None or record.owner != owner:
            shown = job_id[:64] + ("..." if len(job_id) > 64 else "")
            raise Refused(ErrorCode.NOT_FOUND, f"no job {shown!r} of yours (unknown, another client's, or expired)")
        return record


def _checked_rid(message: dict[str, Any]) -> int | str | None:
    """The request id to echo: an int (not a bool) in 64 bits or a short string; else Refused."""
    rid = message.get("rid")
    if rid is None:
        return None
    if protocol.is_int(rid) and protocol.RID_RANGE[0] <= rid <= protocol.RID_RANGE[1]:
        return rid
    if isinstance(rid, str) and len(rid) <= protocol.MAX_RID_CHARS:
        return rid
    # Echoing a huge rid would let one small request cost a large reply (and its queue slot).
    raise Refused(ErrorCode.BAD_REQUEST, f"field 'rid' must be a 64-bit int or a string of at most "
                                         f"{protocol.MAX_RID_CHARS} characters")


def _checked_op(message: dict[str, Any]) -> str:
    """The request's verb, after the version: exactly the int 1 (not true, not 1.0)."""
    version = message.get("v")
    if not (protocol.is_int(version) and version == protocol.PROTOCOL_VERSION):
        shown = repr(version) if isinstance(version, (int, float, bool)) or version is None else type(version).__name__
        raise Refused(ErrorCode.UNSUPPORTED_VERSION,
                      f"protocol version {shown}; this daemon speaks the int {protocol.PROTOCOL_VERSION}")
    op = message.get("op")
    if not isinstance(op, str) or op not in OPS:
        shown = repr(op[:64]) if isinstance(op, str) else f"of type {type(op).__name__}"
        raise Refused(ErrorCode.UNKNOWN_OP, f"unknown op {shown}; ops are {sorted(OPS)}")
    return op


def final_message(record: JobRecord) -> dict[str, Any]:
    """The one final reply an ended job's record stands for."""
    return protocol.final_reply(record.id, record.state, record.result, record.error_code, record.error_message)
