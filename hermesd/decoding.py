"""Per-step control of ``generate``: stop strings matched on decoded text, and the job's own checks.

transformers' own ``stop_strings`` builds tables over the whole vocabulary from each token's surface
form; on a tokenizer without a byte-level vocabulary (a word-level one, say) that fails inside
transformers ("substring not found"), and on a large vocabulary it is a long step no cancel can
interrupt. Here the newest tokens are decoded each step and searched for the stop strings instead,
which works for any tokenizer that can decode.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import StoppingCriteria


class StepControl(StoppingCriteria):
    """Called by ``generate`` after each new token: runs ``check`` (which may raise to end the job:
    cancel, deadline) and says whether a stop string has appeared in the new text."""

    def __init__(self, tokenizer: Any, prompt_tokens: int, stops: tuple[str, ...] = (),
                 check: Callable[[], None] | None = None) -> None:
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.stops = tuple(stops)
        self.check = check
        # Every token decodes to at least one character or to nothing, so a stop string of n characters
        # that has just appeared lies within the last n tokens; the margin covers tokens that decode to
        # nothing (special tokens) or to a partial UTF-8 character.
        self.window = 2 * max((len(s) for s in self.stops), default=0) + 8

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.check is not None:
            self.check()
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.stops:
            for row in range(input_ids.shape[0]):
                new = input_ids[row, self.prompt_tokens:][-self.window:].tolist()
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                done[row] = any(stop in text for stop in self.stops)
        return done
