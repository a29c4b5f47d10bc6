"""systemd notifications (sd_notify) through the sdnotify package: readiness, status, watchdog, stopping.

Without $NOTIFY_SOCKET (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    """Sends sd_notify messages; knows the watchdog interval systemd asked for."""

    def __init__(self) -> None:
        self._notifier = sdnotify.SystemdNotifier()
        if self._notifier.socket is not None:
            self._notifier.socket.setblocking(False)  # never let a slow systemd stall the main loop
        self.watchdog_usec = _watchdog_usec()
        self._last_status = ""
        self._last_ping = 0.0

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half of WatchdogSec (systemd's advice), or None when the watchdog is off."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *fields: str) -> None:
        # sdnotify encodes latin-1 and drops what fails: keep messages ASCII.
        self._notifier.notify("\n".join(f.encode("ascii", "replace").decode("ascii") for f in fields))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        self._last_status = status

    def status(self, text: str) -> None:
        """STATUS=text, sent only when it changed."""
        if text != self._last_status:
            self.send(f"STATUS={text}")
            self._last_status = text

    def watchdog_due(self) -> bool:
        interval = self.watchdog_interval_s
        return interval is not None and time.monotonic() - self._last_ping >= interval

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")
        self._last_ping = time.monotonic()

    def extend_timeout(self, seconds: float, status: str) -> None:
        """Ask systemd for more start (or stop) time: long startup work such as profiling."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}", f"STATUS={status}")
        self._last_status = status

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")
        self._last_status = status


def _watchdog_usec() -> int | None:
    """$WATCHDOG_USEC if it is meant for this process ($WATCHDOG_PID absent or ours)."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value if value > 0 else None
