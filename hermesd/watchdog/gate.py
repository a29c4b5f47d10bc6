"""The gate between the watchdogs and the executor: what to pause, shed or hold before the next stage."""

from __future__ import annotations

import threading


class Gate:
    """What the watchdogs ask of the executor between stages. The main thread sets it; the executor obeys."""

    def __init__(self) -> None:
        self.prefetch_paused = False
        self.shed_resident = False
        self._run = threading.Event()
        self._run.set()

    def hold(self, held: bool) -> None:
        """Pause (True) or resume (False) execution before the next stage."""
        if held:
            self._run.clear()
        else:
            self._run.set()

    @property
    def held(self) -> bool:
        return not self._run.is_set()

    def wait(self, timeout: float) -> bool:
        return self._run.wait(timeout)
