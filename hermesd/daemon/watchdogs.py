"""The thermal and memory watchdogs: read the sensors, follow the policy, set the executor's gate.

Runs on the daemon's main thread each tick (readings at most once per READ_EVERY_S). Every change of
level is logged once; the current levels and actions appear in ``status`` and systemd's STATUS=.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hermesd.daemon.config import Settings
from hermesd.errors import Refused
from hermesd.watchdog.gate import Gate
from hermesd.watchdog.policy import Actions, Memory, Thermal, decide, memory_level, thermal_level
from hermesd.watchdog.sensors import MemoryReading, Temperature, read_memory, read_temperature

log = logging.getLogger("hermesd.watchdog")
READ_EVERY_S = 1.0


class Watchdogs:
    """Thermal and memory levels with hysteresis, and the actions they call for."""

    def __init__(self, settings: Settings) -> None:
        self.thermal = Thermal.NORMAL
        self.memory = Memory.NORMAL
        self.actions = Actions()
        self.temperature: Temperature | None = None
        self.reading: MemoryReading | None = None
        self.transitions = 0
        self._critical_since: float | None = None
        self._last_read = 0.0
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        self.thermal_settings = settings.thermal
        self.memory_settings = settings.memory
        self._last_read = 0.0  # read again at once with the new thresholds

    def apply(self, gate: Gate, shed_bytes: int = 0) -> None:
        """Take new readings (if due), move the levels, and set the gate to match.

        ``shed_bytes``: resident memory released so far, which recovery would take back.
        """
        now = time.monotonic()
        if now - self._last_read < READ_EVERY_S:
            return
        self._last_read = now
        self._update_thermal()
        self._update_memory(now, shed_bytes)
        critical_for = now - self._critical_since if self._critical_since is not None else 0.0
        actions = decide(self.thermal, self.memory, critical_for, self.memory_settings)
        if actions != self.actions:
            log.warning("watchdog actions now: %s", _describe(actions))
            self.actions = actions
        gate.prefetch_paused = actions.pause_prefetch
        gate.shed_resident = actions.shed_resident
        gate.hold(actions.hold_execution)

    def _update_thermal(self) -> None:
        if not self.thermal_settings.enabled:
            self.thermal, self.temperature = Thermal.NORMAL, None
            return
        self.temperature = read_temperature(self.thermal_settings.paths, self.thermal_settings.zone_types)
        celsius = self.temperature.celsius if self.temperature else None
        level = thermal_level(celsius, self.thermal, self.thermal_settings)
        if level != self.thermal:
            log.warning("thermal %s -> %s at %.1f C (%s)", self.thermal.name, level.name, celsius or 0.0,
                        self.temperature.source if self.temperature else "no sensor")
            self.thermal = level
            self.transitions += 1

    def _update_memory(self, now: float, shed_bytes: int) -> None:
        if not self.memory_settings.enabled:
            self.memory, self.reading = Memory.NORMAL, None
            return
        self.reading = reading = read_memory()
        restore = shed_bytes / reading.limit_bytes if reading.limit_bytes else 0.0
        level = memory_level(reading.fraction, reading.psi_some_avg10, self.memory, self.memory_settings, restore)
        if level != self.memory:
            log.warning("memory %s -> %s: %.0f%% of %.0f MiB in use (%s), PSI some avg10 %s", self.memory.name,
                        level.name, 100 * reading.fraction, reading.limit_bytes / 2**20, reading.source,
                        reading.psi_some_avg10)
            self.memory = level
            self.transitions += 1
        if level == Memory.CRITICAL:
            self._critical_since = self._critical_since or now
        else:
            self._critical_since = None

    def admit(self) -> None:
        """Refuse a new job while the device is too hot or has been short of memory for too long."""
        if self.actions.refuse is not None:
            raise Refused(self.actions.refuse, self._refusal_message())

    def _refusal_message(self) -> str:
        if self.thermal >= Thermal.CRITICAL:
            return (f"the device is at {self.temperature.celsius:.1f} C (critical {self.thermal_settings.critical_c:g} C);"
                    " try again when it has cooled")
        return (f"memory has been critical ({100 * self.reading.fraction:.0f}% of the limit) for over "
                f"{self.memory_settings.critical_wait_s:g} s; try again later")

    def report(self) -> dict[str, Any]:
        """Levels, readings and actions for the status reply; ``summary`` is the STATUS= fragment."""
        temperature = None if self.temperature is None else {"celsius": self.temperature.celsius,
                                                             "source": self.temperature.source}
        memory = None if self.reading is None else {
            "used_bytes": self.reading.used_bytes, "limit_bytes": self.reading.limit_bytes,
            "fraction": round(self.reading.fraction, 4), "psi_some_avg10": self.reading.psi_some_avg10,
            "source": self.reading.source, "oom_kills": self.reading.oom_kills}
        summary = [f"temp {self.temperature.celsius:.1f} C {self.thermal.name.lower()}" if self.temperature
                   else "temp n/a"]
        if self.reading is not None:
            summary.append(f"mem {100 * self.reading.fraction:.0f}% {self.memory.name.lower()}")
        if self.actions != Actions():
            summary.append(_describe(self.actions))
        return {"thermal": {"level": self.thermal.name.lower(), "reading": temperature},
                "memory": {"level": self.memory.name.lower(), "reading": memory},
                "actions": {"prefetch_paused": self.actions.pause_prefetch,
                            "execution_held": self.actions.hold_execution,
                            "resident_shed": self.actions.shed_resident,
                            "refusing": self.actions.refuse.value if self.actions.refuse else None},
                "transitions": self.transitions, "summary": ", ".join(summary)}


def _describe(actions: Actions) -> str:
    parts = [name for name, on in (("prefetch paused", actions.pause_prefetch),
                                   ("execution held", actions.hold_execution),
                                   ("resident set shed", actions.shed_resident)) if on]
    if actions.refuse is not None:
        parts.append(f"refusing jobs ({actions.refuse.value})")
    return ", ".join(parts) or "normal"
