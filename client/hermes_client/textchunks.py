"""Streamed text of a generate job, put together from its progress messages in order.

Each ``progress`` message of a generate job carries ``text`` (new since the previous message) and
``text_offset`` (characters sent before it). Messages can be lost (a client that fell behind, a
reconnect): a gap shows in the offsets. After a gap nothing more is passed on until the job ends,
and then the rest of the final text is: what a reader gets always adds up to the job's text exactly.
"""

from __future__ import annotations

from typing import Any


class TextChunks:
    """Turns progress messages into text pieces that never overlap and never skip."""

    def __init__(self) -> None:
        self.received = 0  # characters passed on so far
        self.broken = False  # a message was missed: wait for the final text

    def take(self, message: dict[str, Any]) -> str:
        """The new text of one progress message ("" if none, a repeat, or after a gap)."""
        text, offset = message.get("text"), message.get("text_offset")
        if not isinstance(text, str) or not isinstance(offset, int) or self.broken:
            return ""
        if offset > self.received:
            self.broken = True
            return ""
        piece = text[self.received - offset:]  # a repeat of text already passed on is skipped
        self.received += len(piece)
        return piece

    def rest(self, final_text: str) -> str:
        """What the final text has beyond the pieces passed on."""
        piece = final_text[self.received:]
        self.received = len(final_text)
        return piece
