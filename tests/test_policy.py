"""Watchdog policy: levels with hysteresis, no flapping, recovery, and the actions they call for."""

from __future__ import annotations

from hermes_client import ErrorCode

from hermesd.watchdog.policy import Actions, Memory, Thermal, decide, memory_level, thermal_level
from hermesd.watchdog.settings import MemoryWatchSettings, ThermalSettings

HOT = ThermalSettings(soft_c=75, hard_c=82, critical_c=90, hysteresis_c=5)
MEM = MemoryWatchSettings(low_water=0.85, critical=0.95, recover=0.75, psi_some_avg10=40, critical_wait_s=10)


def _walk_thermal(readings, level=Thermal.NORMAL):
    levels = []
    for celsius in readings:
        level = thermal_level(celsius, level, HOT)
        levels.append(level)
    return levels


def test_thermal_rises_at_each_threshold_and_jumps_straight_to_the_highest():
    assert _walk_thermal([60, 75, 82, 90]) == [Thermal.NORMAL, Thermal.SOFT, Thermal.HARD, Thermal.CRITICAL]
    assert _walk_thermal([95]) == [Thermal.CRITICAL]


def test_thermal_hovering_at_a_threshold_does_not_flap():
    levels = _walk_thermal([75.2, 74.8, 75.1, 74.9, 72.0, 75.0])
    assert levels == [Thermal.SOFT] * 6


def test_thermal_falls_one_level_per_hysteresis_band_and_recovers():
    levels = _walk_thermal([91, 86, 84.9, 80, 76.9, 70.1, 69.9])
    assert levels == [Thermal.CRITICAL, Thermal.CRITICAL, Thermal.HARD, Thermal.HARD, Thermal.SOFT,
                      Thermal.SOFT, Thermal.NORMAL]


def test_no_sensor_means_normal():
    assert thermal_level(None, Thermal.HARD, HOT) == Thermal.NORMAL


def _walk_memory(readings, level=Memory.NORMAL):
    levels = []
    for fraction, psi in readings:
        level = memory_level(fraction, psi, level, MEM)
        levels.append(level)
    return levels


def test_memory_levels_rise_and_fall_with_hysteresis():
    readings = [(0.5, 0), (0.86, 0), (0.96, 0), (0.90, 0), (0.84, 0), (0.80, 0), (0.74, 0)]
    assert _walk_memory(readings) == [Memory.NORMAL, Memory.LOW, Memory.CRITICAL, Memory.CRITICAL,
                                      Memory.LOW, Memory.LOW, Memory.NORMAL]


def test_memory_hovering_at_low_water_does_not_flap():
    assert _walk_memory([(0.851, 0), (0.849, 0), (0.852, 0), (0.80, 0)]) == [Memory.LOW] * 4


def test_psi_stalls_count_as_low_water_and_must_calm_down_before_recovery():
    assert _walk_memory([(0.5, 45.0), (0.5, 30.0), (0.5, 19.0)]) == [Memory.LOW, Memory.LOW, Memory.NORMAL]
    assert _walk_memory([(0.5, None)]) == [Memory.NORMAL]  # no PSI on this kernel


def test_actions_for_each_level():
    assert decide(Thermal.NORMAL, Memory.NORMAL, 0, MEM) == Actions()
    assert decide(Thermal.SOFT, Memory.NORMAL, 0, MEM) == Actions(pause_prefetch=True)
    assert decide(Thermal.HARD, Memory.NORMAL, 0, MEM) == Actions(pause_prefetch=True, hold_execution=True)
    assert decide(Thermal.CRITICAL, Memory.NORMAL, 0, MEM).refuse == ErrorCode.OVERHEATED
    assert decide(Thermal.NORMAL, Memory.LOW, 0, MEM) == Actions(pause_prefetch=True, shed_resident=True)
    brief = decide(Thermal.NORMAL, Memory.CRITICAL, 3, MEM)
    assert brief.hold_execution and brief.shed_resident and brief.refuse is None  # wait before refusing
    assert decide(Thermal.NORMAL, Memory.CRITICAL, 10, MEM).refuse == ErrorCode.MEMORY_PRESSURE


def test_recovery_waits_until_the_shed_resident_set_would_fit_again():
    """Shedding 40 % of the limit drops usage to 50 %; reading it back would be 90 %: stay LOW."""
    level = memory_level(0.90, 0, Memory.NORMAL, MEM)
    assert level == Memory.LOW
    assert memory_level(0.50, 0, level, MEM, restore_fraction=0.40) == Memory.LOW
    assert memory_level(0.30, 0, level, MEM, restore_fraction=0.40) == Memory.NORMAL  # the neighbour left
