"""Job messages in, answers out: the payload formats of docs/MQTT.md, with no MQTT client or daemon here.

A job payload is a JSON object (what a sensor or Node-RED can make) or a msgpack map:
``{"inputs": ..., "params": {...}, "id": "...", "priority": 0, "deadline_s": 30, "reply_to": "topic"}``;
only ``inputs`` is required. The answer uses the request's format.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hermes_client import protocol
from hermes_client.protocol import DEFAULT_MAX_MESSAGE_BYTES, ErrorCode

from hermesd.mqtt.topics import JobTopic, valid_reply_topic

JSON, MSGPACK = "json", "msgpack"
CONTENT_TYPES = {JSON: "application/json", MSGPACK: "application/msgpack"}
FIELDS = frozenset({"inputs", "params", "id", "priority", "deadline_s", "reply_to"})
MAX_ID_CHARS = 64
_MSGPACK_MAP_FIRST_BYTES = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


class BadMessage(Exception):
    """A job message the bridge refuses before the daemon sees it; ``code`` is a protocol error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code.value
        self.message = message


@dataclass
class Reply:
    """Where and how a job's answer goes."""

    topic: str | None             # None: PREFIX/NODE/results/<id or job id>
    correlation: bytes | None
    fmt: str
    request_id: str | None
    user_properties: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class JobRequest:
    """One decoded job: what to submit to the daemon and where its answer goes."""

    model: str
    task: str
    submit: dict[str, Any]        # keyword arguments of hermes_client.Client.submit, less client_job_id
    reply: Reply
    shared: bool

    def key(self) -> str | None:
        """The daemon's client_job_id for this request, the same for every redelivery of it.

        Built from who asks (the reply topic) and what they call the request (correlation data or
        ``id``), hashed so one requester cannot name another's job. None when the request carries
        neither: then only a redelivery within this bridge's life is recognised (docs/MQTT.md).
        """
        name = self.reply.correlation if self.reply.correlation is not None else (
            self.reply.request_id.encode() if self.reply.request_id is not None else None)
        if name is None:
            return None
        digest = hashlib.sha256((self.reply.topic or "").encode() + b"\0" + name).hexdigest()
        return f"mqtt-{digest[:40]}"


def payload_format(payload: bytes, content_type: str | None) -> str:
    """msgpack when the message says so or starts like a msgpack map; JSON otherwise."""
    if content_type == CONTENT_TYPES[MSGPACK]:
        return MSGPACK
    if content_type is None and payload[:1] and payload[0] in _MSGPACK_MAP_FIRST_BYTES:
        return MSGPACK
    return JSON


def decode_payload(payload: bytes, fmt: str) -> dict[str, Any]:
    """The payload's map, or BadMessage (too large, not JSON/msgpack, not an object)."""
    if len(payload) > DEFAULT_MAX_MESSAGE_BYTES:
        raise BadMessage(ErrorCode.TOO_LARGE, f"payload of {len(payload)} bytes is over the "
                                              f"{DEFAULT_MAX_MESSAGE_BYTES}-byte limit")
    if fmt == MSGPACK:
        try:
            return protocol.unpack(payload)
        except protocol.DecodeError as exc:
            raise BadMessage(ErrorCode(exc.code), str(exc)) from None
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadMessage(ErrorCode.BAD_REQUEST, f"payload is neither a JSON object nor a msgpack map ({exc})") from None
    if not isinstance(body, dict):
        raise BadMessage(ErrorCode.BAD_REQUEST, "payload must be a JSON object with \"inputs\"")
    return body


def parse_job(where: JobTopic, payload: bytes, fmt: str, reply: Reply) -> JobRequest:
    """The job a message asks for; BadMessage names the first problem. ``reply`` is filled in place."""
    body = decode_payload(payload, fmt)
    request_id = body.get("id")
    if request_id is not None:
        if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_CHARS or "/" in request_id \
                or "+" in request_id or "#" in request_id:
            raise BadMessage(ErrorCode.BAD_REQUEST, f"\"id\" must be a string of 1-{MAX_ID_CHARS} characters "
                                                    "without '/', '+' or '#'")
        reply.request_id = request_id
    if "reply_to" in body:
        if not valid_reply_topic(body["reply_to"]):
            raise BadMessage(ErrorCode.BAD_REQUEST, "\"reply_to\" must be a topic without wildcards or a leading '$'")
        reply.topic = reply.topic or body["reply_to"]  # an MQTT 5 response topic wins
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise BadMessage(ErrorCode.BAD_REQUEST, f"unknown field(s) {unknown}; a job has {sorted(FIELDS)}")
    if "inputs" not in body:
        raise BadMessage(ErrorCode.BAD_REQUEST, "a job needs \"inputs\"")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise BadMessage(ErrorCode.BAD_REQUEST, "\"params\" must be an object")
    submit = {"task": where.task, "model": where.model, "inputs": body["inputs"], "params": params,
              "priority": body.get("priority", 0), "deadline_s": body.get("deadline_s")}
    return JobRequest(where.model, where.task, submit, reply, where.shared)


def answer(node: str, job: JobRequest | None, reply: Reply, job_id: str | None, status: str,
           result: Any = None, code: str | None = None, message: str | None = None) -> bytes:
    """The answer's payload, in the request's format.

    status: done (with result), failed (with error code and message) or cancelled.
    """
    body: dict[str, Any] = {"id": reply.request_id, "job_id": job_id, "node": node, "status": status,
                            "model": job.model if job else None, "task": job.task if job else None}
    if status == "done":
        body["result"] = result
    elif status == "failed":
        body["error"] = {"code": code, "message": message}
    if reply.fmt == MSGPACK:
        return msgpack.packb(body, use_bin_type=True)
    return json.dumps(body, default=_json_bytes, separators=(",", ":")).encode()


def _json_bytes(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
