"""Readings the watchdogs act on: temperature, and memory as the device really enforces it.

Temperature: the files listed in config, else /sys/class/thermal/thermal_zone*/temp (millidegrees,
optionally only zones of the listed types), else psutil's sensors. Memory: the process's cgroup
(v2 memory.current/max/high/events, or v1 usage/limit), else /proc/meminfo; plus PSI.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED_V1 = 1 << 60  # v1 reports "no limit" as a huge page-rounded number


@dataclass(frozen=True)
class Temperature:
    celsius: float
    source: str


def read_temperature(paths: list[Path], zone_types: list[str]) -> Temperature | None:
    """The hottest reading among the configured sources; None if there is no sensor."""
    readings = [r for r in (_read_celsius(p) for p in paths) if r is not None] if paths else _zones(zone_types)
    if paths and not readings:
        return None
    if not readings:
        readings = _psutil_readings()
    return max(readings, key=lambda r: r.celsius) if readings else None


def _read_celsius(path: Path) -> Temperature | None:
    try:
        value = float(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return Temperature(value / 1000 if abs(value) >= 1000 else value, str(path))  # sysfs: millidegrees


def _zones(zone_types: list[str]) -> list[Temperature]:
    readings = []
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        try:
            kind = Path(zone, "type").read_text().strip()
        except OSError:
            kind = ""
        if zone_types and kind not in zone_types:
            continue
        reading = _read_celsius(Path(zone, "temp"))
        if reading is not None:
            readings.append(reading)
    return readings


def _psutil_readings() -> list[Temperature]:
    try:
        import psutil

        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError, ImportError):
        return []
    return [Temperature(float(entry.current), f"psutil:{name}") for name, entries in sensors.items()
            for entry in entries if entry.current is not None]


@dataclass(frozen=True)
class MemoryReading:
    """Memory in use against the limit that applies; ``fraction`` is what the policy compares."""

    used_bytes: int
    limit_bytes: int
    source: str
    high_bytes: int | None = None
    psi_some_avg10: float | None = None
    oom_kills: int | None = None

    @property
    def fraction(self) -> float:
        return self.used_bytes / self.limit_bytes if self.limit_bytes else 0.0


def read_memory() -> MemoryReading:
    """The tightest enforced view: the cgroup's limit if it has one, else the machine's memory."""
    psi = _psi_some_avg10()
    for reader in (_cgroup_v2, _cgroup_v1):
        reading = reader(psi)
        if reading is not None:
            return reading
    return _meminfo(psi)


def read_memory_available() -> int:
    """The machine's MemAvailable in bytes (what can be allocated without swapping)."""
    return _stat(Path("/proc/meminfo")).get("MemAvailable", 0) * 1024


def _cgroup_paths() -> dict[str, str]:
    """controller ("" for v2) -> path, from /proc/self/cgroup."""
    paths = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def _cgroup_v2(psi: float | None) -> MemoryReading | None:
    relative = _cgroup_paths().get("")
    if relative is None:
        return None
    for root in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        folder = root / relative.lstrip("/")
        current = _int_file(folder / "memory.current")
        if current is None:
            continue
        limit = _tightest(folder, root, "memory.max")
        if limit is None:
            return None  # accounted but unlimited: the machine's memory is what binds
        stat = _stat(folder / "memory.stat")
        events = _stat(folder / "memory.events")
        return MemoryReading(current - stat.get("inactive_file", 0), limit, f"cgroup2:{folder}",
                             high_bytes=_tightest(folder, root, "memory.high"), psi_some_avg10=psi,
                             oom_kills=events.get("oom_kill"))
    return None


def _cgroup_v1(psi: float | None) -> MemoryReading | None:
    relative = _cgroup_paths().get("memory")
    if relative is None:
        return None
    folder = CGROUP_ROOT / "memory" / relative.lstrip("/")
    usage = _int_file(folder / "memory.usage_in_bytes")
    stat = _stat(folder / "memory.stat")
    limit = stat.get("hierarchical_memory_limit") or _int_file(folder / "memory.limit_in_bytes")
    if usage is None or limit is None or limit >= UNLIMITED_V1:
        return None
    oom = _stat(folder / "memory.oom_control").get("oom_kill")
    return MemoryReading(usage - stat.get("total_inactive_file", 0), limit, f"cgroup1:{folder}",
                         psi_some_avg10=psi, oom_kills=oom)


def _meminfo(psi: float | None) -> MemoryReading:
    info = _stat(Path("/proc/meminfo"))
    total, available = info.get("MemTotal", 0) * 1024, info.get("MemAvailable", 0) * 1024
    return MemoryReading(total - available, total, "meminfo", psi_some_avg10=psi)


def _tightest(folder: Path, root: Path, name: str) -> int | None:
    """The smallest limit ``name`` on the way from ``folder`` up to ``root`` (v2 limits nest)."""
    limits = []
    while True:
        value = _int_file(folder / name)
        if value is not None:
            limits.append(value)
        if folder == root or folder.parent == folder:
            break
        folder = folder.parent
    return min(limits) if limits else None


def _int_file(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None  # "max"


def _stat(path: Path) -> dict[str, int]:
    """A "key value [kB]" file (memory.stat, memory.events, oom_control, /proc/meminfo) as a dict."""
    values = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        parts = line.replace(":", " ").split()
        if len(parts) >= 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return values


def _psi_some_avg10(path: str = "/proc/pressure/memory") -> float | None:
    """Share of the last 10 s in which some task stalled on memory (PSI), in percent."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("some"):
                    return float(line.split()[1].split("=")[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


__all__ = ["Temperature", "MemoryReading", "read_temperature", "read_memory", "read_memory_available"]
