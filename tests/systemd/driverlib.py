"""Helpers for driver scripts running *inside* the test container (as root, with the venv's python).

Copied into ``/hermesd-test`` and importable there (``import driverlib``). Standard library only,
so a driver works even when the project's own imports are broken. Findings go to
``$OUT/findings.json`` after every ``record``, so a driver that crashes halfway still reports
what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

OUT = Path(os.environ.get("OUT", "/out"))
_FINDINGS: dict[str, Any] = {}


def record(key: str, value: Any) -> Any:
    """Store ``value`` (JSON-able) under ``key`` in findings.json, rewritten atomically; returns it."""
    _FINDINGS[key] = value
    tmp = OUT / "findings.json.tmp"
    tmp.write_text(json.dumps(_FINDINGS, indent=2, sort_keys=True, default=str))
    tmp.replace(OUT / "findings.json")
    return value


def sh(*cmd: str, timeout: float = 120, check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command, capturing text output (``check=True`` raises on a non-zero exit)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kwargs)


def result(done: subprocess.CompletedProcess) -> dict[str, Any]:
    """A CompletedProcess as a findings-friendly dict."""
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def show(unit: str, *props: str) -> dict[str, str]:
    """``systemctl show -p A,B unit`` as a dict (all properties when none are named)."""
    args = ["systemctl", "show", unit] + (["-p", ",".join(props)] if props else [])
    out = sh(*args, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in µs: the clock of systemd's ``*TimestampMonotonic`` properties."""
    return time.monotonic_ns() // 1000


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes (``None``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def watch_states(unit: str, until: Sequence[str], timeout: float, interval: float = 0.05) -> list[str]:
    """Poll ``ActiveState/SubState`` and return each distinct one seen, ending at one in ``until``.

    E.g. ``watch_states("hermesd", ["active/running", "failed/failed"], 300)`` after a
    ``systemctl start --no-block`` shows whether the unit sat in ``activating/start`` before READY.
    """
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        props = show(unit, "ActiveState", "SubState")
        state = f"{props['ActiveState']}/{props['SubState']}"
        if not seen or seen[-1] != state:
            seen.append(state)
        if state in until:
            break
        time.sleep(interval)
    return seen


def exposure(unit: str) -> float | None:
    """The overall exposure level ``systemd-analyze security UNIT`` prints (None if unparsable)."""
    out = sh("systemd-analyze", "security", "--no-pager", unit).stdout
    for line in out.splitlines():
        if "Overall exposure level" in line:
            return float(line.split(":", 1)[1].split()[0])
    return None
