"""``hermesd serve`` with a test hook in its executor, for tests that need a wedged engine on purpose.

A job whose first input is ``"hang:N"`` holds the executor thread for N seconds before it runs: no stage
checkpoints, no progress, exactly what a wedged engine looks like to the daemon. The hook is installed
through ``serve(..., executor_hook=...)``, a seam only code that builds the daemon can use; the shipped
``hermesd serve`` has none, so no client can trigger it.

Usage: python hooked_daemon.py --config FILE
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hermesd.daemon.server import serve

MARKER = "hang:"


def wedge_on_marker(job) -> None:
    """Sleep N seconds when the job's first input is "hang:N"."""
    inputs = job.record.inputs
    first = inputs[0] if isinstance(inputs, list) and inputs else inputs
    if isinstance(first, str) and first.startswith(MARKER):
        time.sleep(float(first[len(MARKER):]))


def hang_input(seconds: float) -> str:
    """The input that wedges the hooked daemon's executor for ``seconds``."""
    return f"{MARKER}{seconds:g}"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--config":
        sys.exit("usage: hooked_daemon.py --config FILE")
    sys.exit(serve(Path(sys.argv[2]), executor_hook=wedge_on_marker))
