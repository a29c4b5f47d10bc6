"""The hermesd wire protocol, defined once: imported by the client and by the daemon.

Transport: a ZeroMQ ROUTER socket in the daemon; clients use DEALER sockets. Every message is one
msgpack map in one frame (after an empty delimiter frame, as REQ sockets send it). Maps carry:

    v    protocol version (PROTOCOL_VERSION)
    op   the request verb (requests) -- or --  type: the reply kind (replies)
    rid  a request id chosen by the client, echoed in every reply to that request

Requests (``op``): submit, job, cancel, status, models, ping, unload. Replies (``type``): accepted, progress,
result, error, cancelled, job, status, models, pong. Every accepted job ends with exactly one final
reply: result, error or cancelled. docs/PROTOCOL.md describes each field.
"""

from __future__ import annotations

import enum
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB: far above any prompt, far below what hurts an edge device
MAX_NESTING = 16                     # deeper containers are refused before they reach a handler
MAX_ITEMS = 4096                     # elements of any one list or map in a message


class Op(str, enum.Enum):
    """Request verbs."""

    SUBMIT = "submit"
    JOB = "job"
    CANCEL = "cancel"
    STATUS = "status"
    MODELS = "models"
    PING = "ping"
    UNLOAD = "unload"


class Reply(str, enum.Enum):
    """Reply kinds. RESULT, ERROR and CANCELLED end a job (FINAL)."""

    ACCEPTED = "accepted"
    PROGRESS = "progress"
    RESULT = "result"
    ERROR = "error"
    CANCELLED = "cancelled"
    JOB = "job"
    STATUS = "status"
    MODELS = "models"
    PONG = "pong"


FINAL = frozenset({Reply.RESULT.value, Reply.ERROR.value, Reply.CANCELLED.value})


class Task(str, enum.Enum):
    """Job types: the one list of task names (the daemon's config, tasks and CLI read it from here)."""

    GENERATE = "generate"
    EMBED = "embed"
    CLASSIFY = "classify"
    FORWARD = "forward"


class JobState(str, enum.Enum):
    """A job's life: queued -> running -> done | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED = frozenset({JobState.DONE.value, JobState.FAILED.value, JobState.CANCELLED.value})


class ErrorCode(str, enum.Enum):
    """Stable error codes: scripts may branch on them; the message is for humans."""

    BAD_REQUEST = "bad_request"            # not msgpack, not a map, wrong field types, missing fields
    UNSUPPORTED_VERSION = "unsupported_version"
    TOO_LARGE = "too_large"                # message or output over a limit
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_TASK = "unknown_task"
    UNKNOWN_MODEL = "unknown_model"
    INVALID_PARAMS = "invalid_params"      # refused before queueing, or by the task when it starts
    BUSY = "busy"                          # the queue is full: retry later
    NOT_FOUND = "not_found"                # no such job of yours (or its result has expired)
    CONFLICT = "conflict"                  # a client_job_id reused for a different job
    DEADLINE_EXCEEDED = "deadline_exceeded"
    TASK_FAILED = "task_failed"            # the model could not run the job (e.g. a damaged store)
    OVERHEATED = "overheated"              # the device is too hot to take new jobs
    MEMORY_PRESSURE = "memory_pressure"    # the device is short of memory
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


# Upper bounds on submit fields, checked by the daemon before a job is accepted.
PRIORITY_RANGE = (0, 9)                   # higher runs first
MAX_CLIENT_JOB_ID = 128                   # characters
MAX_DEADLINE_S = 7 * 24 * 3600.0
MAX_NEW_TOKENS = 4096                     # the most tokens one generate job may ask for (any model)
MAX_FORWARD_VALUES = 1 << 20             # values one forward output may carry (fp32: 4 MiB) at run time
MAX_RID_CHARS = 128                       # a longer string rid is refused (replies echo it)
RID_RANGE = (-(1 << 63), (1 << 63) - 1)   # an int rid must fit in 64 bits
TASK_NAMES = tuple(task.value for task in Task)


def pack(message: dict[str, Any]) -> bytes:
    """Encode one message (a map with the protocol version added)."""
    return msgpack.packb({"v": PROTOCOL_VERSION, **message}, use_bin_type=True)


class DecodeError(ValueError):
    """A frame that is not a well-formed protocol message; ``code`` says why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def unpack(frame: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_items: int = MAX_ITEMS,
           max_nesting: int = MAX_NESTING) -> dict[str, Any]:
    """Decode one frame into a map, refusing oversize, malformed, deeply nested or non-map data.

    The defaults are the daemon's limits for requests; clients decode replies (which may carry long
    vectors) with larger ones.
    """
    if len(frame) > max_bytes:
        raise DecodeError(ErrorCode.TOO_LARGE, f"message of {len(frame)} bytes is over the {max_bytes}-byte limit")
    try:
        message = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, use_list=True,
            max_str_len=max_bytes, max_bin_len=max_bytes,
            max_array_len=max_items, max_map_len=max_items, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(ErrorCode.BAD_REQUEST, f"not a msgpack message: {exc or type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise DecodeError(ErrorCode.BAD_REQUEST, "a message must be a msgpack map")
    if _depth(message, limit=max_nesting) > max_nesting:
        raise DecodeError(ErrorCode.BAD_REQUEST, f"message nested deeper than {max_nesting} levels")
    return message


def _depth(value: Any, level: int = 1, limit: int = MAX_NESTING) -> int:
    """Nesting depth of lists and maps, stopping early once past ``limit``.

    Map keys must be strings at every level: msgpack's ``strict_map_key`` still lets binary keys
    through, and a handler must never compare a bytes key with a field name.
    """
    if level > limit or not isinstance(value, (list, dict)):
        return level
    if isinstance(value, dict):
        if not all(type(key) is str for key in value):
            raise DecodeError(ErrorCode.BAD_REQUEST, "map keys must be strings")
        children = value.values()
    else:
        children = value
    return max((_depth(child, level + 1, limit) for child in children), default=level)


def is_int(value: Any) -> bool:
    """An integer and not a bool (msgpack's true is not 1 in this protocol)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def error(code: ErrorCode, message: str, **fields: Any) -> dict[str, Any]:
    """An error reply body."""
    return {"type": Reply.ERROR.value, "code": code.value, "message": message, **fields}


def final_reply(job_id: str, state: str, result: Any = None, error_code: str | None = None,
                error_message: str | None = None) -> dict[str, Any]:
    """The final reply an ended job stands for: result (done), cancelled, or error (failed).

    The daemon sends it when a job ends; a client rebuilds it from a job record when the push was lost.
    """
    if state == JobState.DONE.value:
        return {"type": Reply.RESULT.value, "job_id": job_id, "result": result}
    if state == JobState.CANCELLED.value:
        return {"type": Reply.CANCELLED.value, "job_id": job_id}
    return error(ErrorCode(error_code or ErrorCode.INTERNAL.value), error_message or "", job_id=job_id)
