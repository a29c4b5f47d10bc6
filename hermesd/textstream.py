"""Incremental detokenization of generated tokens: the new text of each token, safe to send at once.

Decoding token by token is wrong twice over: a byte-level token may end in the middle of a UTF-8
character (an emoji is often two or three tokens), and tokenizers that mark word starts (SentencePiece's
"▁") decode a token differently at the start of a text than after others. So each push decodes a short
window of ids, from the token before the last emitted text on, and emits what the window adds beyond
that token's own text, only once it does not end in U+FFFD (an incomplete character). The window
moves on with every emission, so each push decodes a few tokens, not the whole text.

Stop strings: text after a stop string is never emitted, and text that could be the start of one
is held back until it is known not to be. The concatenation of everything ``push`` and ``flush`` return
equals ``tokenizer.decode(ids, skip_special_tokens=True)`` cut before the first stop string, which is
what ``hermesd.tasks.generate`` returns as the job's text.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence


class TextStream:
    """The text of one generated sequence, released piece by piece as tokens arrive.

    tokenizer: anything with ``decode(ids, skip_special_tokens=True)`` (a transformers tokenizer).
    stops: stop strings; nothing from the first one on is ever released.
    Push only the generated tokens (not the prompt): the result must equal decoding them alone.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] | list[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""  # everything released so far
        self.stopped = False  # a stop string appeared: nothing more is released
        self._window = 0  # ids[_window:_read] decode to text already taken into _held or released
        self._read = 0
        self._held = ""  # decoded text not released yet: it may begin a stop string

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that became safe to send (often "")."""
        self.ids.append(int(token_id))
        if self.stopped:
            return ""
        return self._release(self._stable_text(), final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is left, incomplete characters included (as ``decode`` gives)."""
        if self.stopped:
            return ""
        before = self._decode(self.ids[self._window:self._read])
        rest = self._decode(self.ids[self._window:])[len(before):]
        self._window = self._read = len(self.ids)
        return self._release(rest, final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _stable_text(self) -> str:
        """Text the tokens since ``_read`` add, once it ends in a whole character; else ""."""
        before = self._decode(self.ids[self._window:self._read])
        now = self._decode(self.ids[self._window:])
        if len(now) <= len(before) or now.endswith(REPLACEMENT) or not now.startswith(before):
            return ""  # nothing new yet (special tokens), or a character still incomplete
        self._window, self._read = self._read, len(self.ids)
        return now[len(before):]

    def _release(self, new: str, final: bool) -> str:
        """Append ``new`` to the held text; release what cannot be (the start of) a stop string."""
        held = self._held + new
        cut = min((i for i in (held.find(stop) for stop in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = held[:cut], ""
        elif final:
            out, self._held = held, ""
        else:
            keep = _stop_prefix_length(held, self.stops)
            out, self._held = held[:len(held) - keep], held[len(held) - keep:]
        self.text += out
        return out


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is the beginning of a stop string (held back)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
