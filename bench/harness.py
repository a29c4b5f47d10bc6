"""Shared helpers for hermesd benchmarks: a cold page cache, contenders in subprocesses, statistics.

Every contender runs in a fresh process that prints one JSON line on stdout; the driver evicts the
weight files from the page cache before each run and checks with ``fincore`` that nothing is left.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

FINCORE = "/usr/bin/fincore"
STDERR_TAIL = 4000  # characters of a failed child's stderr kept in the results


def weight_files(*roots: str | os.PathLike[str]) -> list[Path]:
    """Every ``*.safetensors`` file under ``roots`` (recursively), sorted."""
    files: list[Path] = []
    for root in roots:
        files.extend(sorted(Path(root).rglob("*.safetensors")))
    return files


def evict(paths: Iterable[Path]) -> None:
    """Drop ``paths`` from the page cache: flush dirty pages, then POSIX_FADV_DONTNEED the whole file."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(paths: Sequence[Path], batch: int = 64) -> int:
    """Bytes of ``paths`` now in the page cache, summed from ``fincore --bytes`` (RES column)."""
    total = 0
    for start in range(0, len(paths), batch):
        chunk = [str(p) for p in paths[start : start + batch]]
        out = subprocess.run([FINCORE, "--bytes", "--noheadings", "--raw", *chunk],
                             capture_output=True, text=True, check=True).stdout
        total += sum(int(line.split()[0]) for line in out.splitlines() if line.strip())
    return total


def make_cold(paths: Sequence[Path]) -> int:
    """Evict ``paths`` and return the bytes still resident afterwards (0 when eviction worked)."""
    evict(paths)
    return resident_bytes(paths)


def vm_hwm_bytes() -> int:
    """This process's peak resident set (VmHWM from /proc/self/status), in bytes."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_steal_s() -> float:
    """Seconds of CPU time the hypervisor gave to others (``steal`` in /proc/stat), summed over CPUs."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = handle.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def cpu_busy_s() -> float:
    """Seconds of CPU time all CPUs spent busy so far (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished (waited-for) children."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def emit_json_line(result: dict[str, Any]) -> None:
    """Print ``result`` as the single JSON line a child reports to the driver."""
    sys.__stdout__.write(json.dumps(result) + "\n")
    sys.__stdout__.flush()


def run_json_child(cmd: Sequence[str], timeout: float, cwd: str | os.PathLike[str] | None = None,
                   env: dict[str, str] | None = None,
                   preexec_fn: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run ``cmd``; return the JSON object of its last JSON stdout line, or a failure record.

    A failure record has ``ok: False``, an ``error``, the ``returncode`` (negative: killed by that
    signal) and the tail of the child's stderr; the caller goes on with its other runs.
    ``preexec_fn`` runs in the child before exec (e.g. joining a capped cgroup).
    """
    started = time.perf_counter()
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                              preexec_fn=preexec_fn)
    except subprocess.TimeoutExpired as exc:
        return _failure(f"timed out after {timeout:.0f} s", _text(exc.stderr), started)
    result = _last_json_line(proc.stdout)
    if proc.returncode != 0 or result is None:
        why = f"exit status {proc.returncode}" if proc.returncode else "no JSON line on stdout"
        return _failure(why, proc.stderr, started) | {"returncode": proc.returncode}
    result.setdefault("ok", True)
    result["child_wall_s"] = time.perf_counter() - started
    return result


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data or ""


def _last_json_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _failure(error: str, stderr: str, started: float) -> dict[str, Any]:
    return {"ok": False, "error": error, "stderr_tail": stderr[-STDERR_TAIL:],
            "child_wall_s": time.perf_counter() - started}


def median(values: Iterable[float]) -> float | None:
    """Median of ``values``, or None when there are none."""
    values = list(values)
    return statistics.median(values) if values else None


def proc_read_bytes() -> int:
    """Bytes this process (all its threads) caused to be read from storage (``read_bytes`` of /proc/self/io)."""
    with open("/proc/self/io", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def machine_facts() -> dict[str, Any]:
    """CPU model, cores, memory, kernel, date and package versions, for the record."""
    from hermesd.plan.profile import cpu_model  # deferred: children run by other interpreters import this module

    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_total_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": {pkg: _version(pkg) for pkg in ("hermesd", "torch", "transformers", "accelerate", "safetensors")},
    }


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
