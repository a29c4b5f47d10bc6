"""Exception hierarchy: one class per outcome a caller may want to handle separately."""

from __future__ import annotations

from hermes_client.protocol import ErrorCode


class HermesError(Exception):
    """Base class of every error hermesd raises on purpose."""


class StoreError(HermesError):
    """A layer store is missing, malformed, or of a format this version cannot read."""


class StageIntegrityError(StoreError):
    """A stage file does not match its manifest entry (missing, truncated, altered)."""

    def __init__(self, stage: str, path: str, reason: str) -> None:
        super().__init__(f"stage {stage!r} ({path}): {reason}")
        self.stage = stage
        self.path = path
        self.reason = reason


class UnsupportedModelError(HermesError):
    """The model's architecture cannot be split into stages or is unknown to transformers."""


class ConvertError(HermesError):
    """A conversion could not produce a store (bad source, destination exists, ...)."""


class BudgetError(HermesError):
    """A memory budget is below what the model needs to stream at all."""

    def __init__(self, budget: int, minimum: int, detail: str = "") -> None:
        from hermesd.units import format_size

        text = f"memory budget {format_size(budget)} is below the minimum {format_size(minimum)} for this model"
        super().__init__(f"{text}: {detail}" if detail else text)
        self.budget = budget
        self.minimum = minimum


class TaskError(HermesError):
    """A task was asked of a model that cannot serve it, or with invalid inputs."""


class Refused(HermesError):
    """A request the daemon answers with an error reply (its stable ``code``) instead of acting on it."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
