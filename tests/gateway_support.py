"""Start a real ``hermesd gateway`` process for tests and wait for its READY line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from daemon_support import CHILD_PATH, STARTED

READY_TIMEOUT_S = 60.0


@dataclass
class RunningGateway:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def start_gateway(root: Path, endpoint: str, *args: str, env: dict[str, str] | None = None) -> RunningGateway:
    """``hermesd gateway --port 0`` in front of ``endpoint``; returns once it prints READY with its address."""
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"gateway-{time.monotonic_ns()}.log"
    environment = {**os.environ, "PYTHONPATH": CHILD_PATH, "PYTHONUNBUFFERED": "1",
                   "HERMESD_GATEWAY_CONFIG": "", **(env or {})}
    environment.pop("NOTIFY_SOCKET", None)
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "hermesd.cli", "gateway", "--port", "0", "--endpoint", endpoint,
                             *args], stdout=subprocess.PIPE, stderr=log, env=environment)
    STARTED.append(proc)
    deadline = time.monotonic() + READY_TIMEOUT_S
    line = b""
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        if line.startswith(b"READY "):
            url = line.split()[1].decode().rstrip(",")
            return RunningGateway(proc, url, log_path)
    proc.kill()
    raise AssertionError(f"gateway never became ready ({line!r}); log:\n{log_path.read_text(errors='replace')}")
