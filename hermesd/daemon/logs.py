"""Logging for the daemon: one line per event on stderr, with syslog priorities when journald reads it."""

from __future__ import annotations

import logging
import os
import sys

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class OneLineFormatter(logging.Formatter):
    """Folds tracebacks and embedded newlines into the event's line; prefixes <N> priorities for journald."""

    def __init__(self, journald: bool) -> None:
        super().__init__("%(name)s: %(message)s" if journald else "%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record).replace("\n", " | ")
        return f"<{_PRIORITY.get(record.levelno, 6)}>{line}" if self.journald else line


def setup(level: str) -> None:
    """Send hermesd's logs to stderr at ``level``; journald (via $JOURNAL_STREAM) gets priorities."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger("hermesd")
    root.handlers[:] = [handler]
    root.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger("hermesd").setLevel(LEVELS[level])
