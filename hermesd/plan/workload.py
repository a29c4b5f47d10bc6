"""The shape of the work a plan is made for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """A prompt of ``prompt_tokens``, then ``new_tokens`` generated, for ``batch`` rows at once."""

    prompt_tokens: int = 128
    new_tokens: int = 0
    batch: int = 1
    one_shot: bool = False  # a process that loads, runs once and exits (``hermesd run``): load() counts

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def passes(self) -> int:
        """Forward passes: one for the prompt (it yields the first new token), one per further token."""
        return 1 + max(self.new_tokens - 1, 0)

    def label(self) -> str:
        return f"p{self.prompt_tokens}-n{self.new_tokens}-b{self.batch}" + ("-once" if self.one_shot else "")

    @classmethod
    def parse(cls, text: str) -> "Workload":
        """From "PROMPT[:NEW[:BATCH]]", e.g. "128:32" is a 128-token prompt and 32 new tokens."""
        try:
            numbers = [int(part) for part in text.split(":")]
        except ValueError:
            raise ValueError(f"workload {text!r}: expected PROMPT[:NEW[:BATCH]] token counts") from None
        if not 1 <= len(numbers) <= 3 or numbers[0] < 1 or any(n < 0 for n in numbers) or 0 in numbers[2:]:
            raise ValueError(f"workload {text!r}: expected PROMPT[:NEW[:BATCH]] with PROMPT, BATCH >= 1")
        return cls(*numbers)


# What a plan is sized for when the caller names no workload: a 512-token prompt, one row.
DEFAULT_WORKLOAD = Workload(prompt_tokens=512)
