"""Watchdog policy as pure functions: readings + thresholds + the current level -> the next level -> actions.

Levels rise as soon as a threshold is crossed and fall only once the reading is clearly below it
(hysteresis), so a reading that hovers at a threshold does not flap. The daemon applies the actions
between stages; nothing here touches hardware, so the policy is tested with plain numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hermes_client.protocol import ErrorCode

from hermesd.watchdog.settings import MemoryWatchSettings, ThermalSettings


class Thermal(enum.IntEnum):
    NORMAL = 0
    SOFT = 1       # pause prefetch
    HARD = 2       # hold execution between stages
    CRITICAL = 3   # ... and refuse new jobs


class Memory(enum.IntEnum):
    NORMAL = 0
    LOW = 1        # pause prefetch, shed the resident set
    CRITICAL = 2   # ... and hold before the next stage; refuse new jobs if it lasts


def thermal_level(celsius: float | None, current: Thermal, settings: ThermalSettings) -> Thermal:
    """The thermal level after a reading (None: no sensor, so NORMAL)."""
    if celsius is None:
        return Thermal.NORMAL
    limits = {Thermal.SOFT: settings.soft_c, Thermal.HARD: settings.hard_c, Thermal.CRITICAL: settings.critical_c}
    reached = max((level for level, limit in limits.items() if celsius >= limit), default=Thermal.NORMAL)
    level = current
    while level > reached and celsius < limits[level] - settings.hysteresis_c:
        level = Thermal(level - 1)  # fall one level at a time, each only once well below its threshold
    return Thermal(max(level, reached))


def memory_level(fraction: float, psi_some_avg10: float | None, current: Memory, settings: MemoryWatchSettings,
                 restore_fraction: float = 0.0) -> Memory:
    """The memory level after a reading: ``fraction`` of the enforced limit in use, and PSI's stall share.

    CRITICAL is left only below the low-water mark; LOW only when usage *plus what recovery would
    read back in* (``restore_fraction``: the shed resident set, as a fraction of the limit) is below
    the recover mark and PSI is calm (under half its threshold). Without that term, shedding would
    make room, recovery would fill it again and the levels would flap.
    """
    stalling = psi_some_avg10 is not None and psi_some_avg10 >= settings.psi_some_avg10
    calm = psi_some_avg10 is None or psi_some_avg10 < settings.psi_some_avg10 / 2
    if fraction >= settings.critical or (current == Memory.CRITICAL and fraction >= settings.low_water):
        return Memory.CRITICAL
    if fraction >= settings.low_water or stalling:
        return Memory.LOW
    if current >= Memory.LOW and (fraction + restore_fraction >= settings.recover or not calm):
        return Memory.LOW
    return Memory.NORMAL


@dataclass(frozen=True)
class Actions:
    """What the engine must do now."""

    pause_prefetch: bool = False
    hold_execution: bool = False
    shed_resident: bool = False
    refuse: ErrorCode | None = None


def decide(thermal: Thermal, memory: Memory, critical_memory_for_s: float,
           settings: MemoryWatchSettings) -> Actions:
    """Combine the two levels; ``critical_memory_for_s`` is how long memory has been CRITICAL."""
    refuse = None
    if thermal >= Thermal.CRITICAL:
        refuse = ErrorCode.OVERHEATED
    elif memory >= Memory.CRITICAL and critical_memory_for_s >= settings.critical_wait_s:
        refuse = ErrorCode.MEMORY_PRESSURE
    return Actions(pause_prefetch=thermal >= Thermal.SOFT or memory >= Memory.LOW,
                   hold_execution=thermal >= Thermal.HARD or memory >= Memory.CRITICAL,
                   shed_resident=memory >= Memory.LOW, refuse=refuse)
