"""Client exceptions: one class per outcome a script may want to handle on its own."""

from __future__ import annotations

from hermes_client.protocol import ErrorCode


class HermesClientError(Exception):
    """Base class of every error the client raises."""


class DaemonUnreachable(HermesClientError):
    """No reply from the daemon within the timeout, after every retry."""


class ServerError(HermesClientError):
    """The daemon answered with an error reply; ``code`` is stable, the message is for humans."""

    def __init__(self, code: str, message: str, job_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.job_id = job_id


class Conflict(ServerError):
    """A submit reused a ``client_job_id`` of this identity for a different job (task, model, inputs,
    parameters or priority differ); the earlier job is untouched."""


class TryLater(ServerError):
    """The daemon is busy, too hot, short of memory or shutting down: the same request may work later."""


class JobFailed(ServerError):
    """A job was accepted but ended in an error (bad input found while running, deadline, damaged store)."""


class JobCancelled(HermesClientError):
    """The job was cancelled before it finished."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


TEMPORARY = frozenset({ErrorCode.BUSY.value, ErrorCode.OVERHEATED.value, ErrorCode.MEMORY_PRESSURE.value,
                       ErrorCode.SHUTTING_DOWN.value})


def server_error(reply: dict, final: bool = False) -> ServerError:
    """The exception for an error reply: TryLater for temporary codes, JobFailed for a job's final error."""
    code, message = str(reply.get("code", ErrorCode.INTERNAL.value)), str(reply.get("message", ""))
    if code == ErrorCode.CONFLICT.value and not final:
        return Conflict(code, message, reply.get("job_id"))
    cls = TryLater if code in TEMPORARY else JobFailed if final else ServerError
    return cls(code, message, reply.get("job_id"))
