"""Reading what a child process writes to a pseudo-terminal (tests of terminal-only output)."""

from __future__ import annotations

import os
import select
from typing import Callable


def read_terminal(master: int, timeout_s: float, on_data: Callable[[bytes], None] | None = None) -> bytes:
    """Everything written to the pty until the child closes it; fails after ``timeout_s`` of silence.

    ``on_data`` is called with each piece as it arrives (to time when output started)."""
    output = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout_s)
        assert ready, f"no output for {timeout_s:g} s"
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed its terminal
            break
        if not data:
            break
        output += data
        if on_data is not None:
            on_data(data)
    return output
