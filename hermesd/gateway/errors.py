"""Errors the gateway answers with: hermesd's stable codes mapped to HTTP statuses.

Each API shapes the body its clients expect (Ollama: ``{"error": MESSAGE}``; OpenAI:
``{"error": {message, type, code}}``); the status and the Retry-After header come from here.
"""

from __future__ import annotations

from hermes_client.errors import DaemonUnreachable, JobCancelled, ServerError, TryLater

# hermesd error code -> HTTP status. Codes of the daemon's protocol (hermes_client.protocol.ErrorCode)
# plus the gateway's own: unreachable (no daemon), timeout (job_timeout_s), cancelled, bad_json.
STATUS = {
    "bad_request": 400, "bad_json": 400, "invalid_params": 400, "unknown_task": 400, "unsupported": 400,
    "unauthorized": 401, "not_found": 404, "unknown_model": 404, "cancelled": 409, "too_large": 413,
    "not_implemented": 501, "busy": 503, "overheated": 503, "memory_pressure": 503, "shutting_down": 503,
    "unreachable": 503, "deadline_exceeded": 504, "timeout": 504,
}
RETRY_LATER = frozenset({"busy", "overheated", "memory_pressure", "shutting_down", "unreachable"})


class GatewayError(Exception):
    """A request the gateway answers with an error: a stable ``code`` and one line for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        """The HTTP status: 500 for codes that mean a bug or a failed model (internal, task_failed)."""
        return STATUS.get(self.code, 500)

    @property
    def retry_later(self) -> bool:
        """Whether the same request may work later (the response then carries Retry-After)."""
        return self.code in RETRY_LATER


def from_client_error(exc: Exception) -> GatewayError:
    """The GatewayError for an exception hermes_client raised (refusal, failed job, no daemon)."""
    if isinstance(exc, (ServerError, TryLater)):
        return GatewayError(exc.code, exc.message)
    if isinstance(exc, JobCancelled):
        return GatewayError("cancelled", "the job was cancelled before it finished")
    if isinstance(exc, DaemonUnreachable):
        return GatewayError("unreachable", f"the hermesd daemon does not answer: {exc}")
    raise exc
