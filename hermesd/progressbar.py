"""Progress bars of the long commands (``convert``, ``profile``, ``plan``, ``bench``) through tqdm.

One rule for all of them: bars only when standard error is a terminal; ``--quiet`` silences every
bar of the process, transformers' and huggingface_hub's included. Off a terminal the commands print
plain progress lines instead (journald, CI logs), and third-party bars are silenced too: a bar
redrawn with carriage returns is noise in a log file.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from hermesd.units import format_size


def configure(quiet: bool) -> bool:
    """Decide once per command whether bars are drawn; silences third-party bars where they are not.

    Call it before transformers (or anything drawing tqdm bars) is imported: tqdm and
    huggingface_hub read their switches from the environment when first imported.
    """
    wanted = not quiet and sys.stderr.isatty()
    if not wanted:
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:  # already imported: its own switch still works
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    return wanted


class StageBar:
    """A bar of stages done (written, profiled, run) with the bytes they came to."""

    def __init__(self, description: str, total: int | None = None, unit: str = "stage") -> None:
        from tqdm import tqdm  # only when a bar is drawn

        self._bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True,
                         disable=False)  # explicit: TQDM_DISABLE from an earlier --quiet must not apply
        self.bytes = 0

    def advance(self, name: str = "", nbytes: int = 0, total: int | None = None) -> None:
        """One more stage done (``total``: set or correct the bar's length)."""
        if total is not None and total != self._bar.total:
            self._bar.total = total
        self.bytes += nbytes
        size = f"{format_size(self.bytes)} " if self.bytes else ""
        self._bar.set_postfix_str(f"{size}{name}".strip(), refresh=False)
        self._bar.update(1)

    def describe(self, text: str) -> None:
        self._bar.set_description_str(text)

    def write(self, line: str) -> None:
        """A line above the bar (it is redrawn below)."""
        self._bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "StageBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
