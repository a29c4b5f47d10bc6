"""The watchdogs' thresholds, as the daemon's config spells them (``[thermal]`` and ``[memory]``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ThermalSettings(BaseModel):
    """Thermal watchdog: temperatures in °C; readings from sysfs zones, or from the listed files."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    paths: list[Path] = Field(default_factory=list)
    zone_types: list[str] = Field(default_factory=list)
    soft_c: float = 75.0
    hard_c: float = 82.0
    critical_c: float = 90.0
    hysteresis_c: float = Field(default=5.0, ge=0)


class MemoryWatchSettings(BaseModel):
    """Memory watchdog: fractions of the enforced limit (cgroup, else MemTotal) that trigger each level."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    low_water: float = Field(default=0.85, gt=0, le=1)
    critical: float = Field(default=0.95, gt=0, le=1)
    recover: float = Field(default=0.75, gt=0, le=1)
    psi_some_avg10: float = Field(default=40.0, ge=0, le=100)
    critical_wait_s: float = Field(default=10.0, ge=0)
