"""Human-readable byte sizes: parse "512MiB" / "1.5G" and format counts for people."""

from __future__ import annotations

import re

_MULTIPLIERS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """Return a byte count from an int or a string such as "256MiB", "1.5G" or "300MB".

    Bare suffixes K/M/G/T are binary (as in systemd's MemoryMax=); "KB/MB/GB" are decimal.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"size must not be negative: {value!r}")
        return int(value)
    match = _SIZE_RE.match(value)
    if not match or match.group(2).lower() not in _MULTIPLIERS:
        raise ValueError(f"not a size: {value!r} (examples: 512MiB, 2G, 300MB)")
    return int(float(match.group(1)) * _MULTIPLIERS[match.group(2).lower()])


def format_size(count: int | float) -> str:
    """Format a byte count with a binary unit, e.g. 1536 -> "1.5 KiB"."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
