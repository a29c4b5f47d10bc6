"""What memory the kernel hands out costs on this machine, before any weight is read into it.

    python -m bench.fresh_memory [--file F] [--size-mib 512] [--rounds 3] [--json]

A cold one-shot run (``hermesd run``, every benchmark contender) takes fresh memory for its ring and
for the page cache that holds its resident stages. On bare metal the first write of a page costs the
kernel's zeroing (~0.1 s/GB). On a VM whose balloon device reports free memory to the host
(virtio-balloon ``FREE_PAGE_REPORTING``), every free block of ``page_reporting_order`` and up goes back
to the host, and the guest's next touch of it faults on the host too. Measured here per GB, modes
alternating round by round, each in this one process:
- ``anon-4k`` / ``anon-huge``: first write of fresh anonymous memory on 4 KiB or transparent huge pages;
- ``anon-huge-again``: huge pages mapped right after the previous ones were unmapped (recycled before
  the host took them back; every other mode starts ``--settle`` seconds after the last free);
- ``hugetlb``: first write of pages from the reserved huge page pool (``vm.nr_hugepages``), measured
  only when the pool has room: the pool's pages never return to the kernel's free lists, so they are
  never reported, and only their first use since boot faults on the host;
- ``read-4k`` / ``read-huge``: O_DIRECT reads of ``--file`` into memory of each kind already written
  (the disk's requests are capped by the segments one page gives: 4 KiB pages give 1 MiB requests);
- ``cache-read`` / ``cache-touch``: ``--file`` evicted, mapped and read (``MADV_POPULATE_READ``), then its
  pages' first touch (what ``engine.mapped`` pays for a resident stage); ``cache-touch-again`` the same
  right after, on the page-cache pages just freed.
The report includes the balloon's reporting settings and how much it reported during the run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from bench.harness import evict
from hermesd.engine.mapped import MADV_POPULATE_READ

MODES = ("anon-4k", "anon-huge", "anon-huge-again", "hugetlb", "cache-read", "cache-touch", "cache-touch-again",
         "read-4k", "read-huge")
MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)
REPORTING = Path("/sys/module/page_reporting/parameters")
READ_CHUNK = 64 << 20  # as the engine's reader


def _anonymous(size: int, huge: bool) -> mmap.mmap:
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        memory.madvise(advice)
    return memory


def _write(memory: mmap.mmap) -> float:
    """Seconds to write every byte once (a memset: the fault-in the engine's ring pays)."""
    started = time.perf_counter()
    ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(memory)), 0, len(memory))
    return time.perf_counter() - started


def _touch(memory: mmap.mmap) -> float:
    """Seconds to read one byte of every page (the first touch of mapped file pages)."""
    view = memoryview(memory)
    started = time.perf_counter()
    sum(view[::mmap.PAGESIZE])
    return time.perf_counter() - started


def _direct_read(path: Path, memory: mmap.mmap) -> float:
    """Seconds to read the file's first len(memory) bytes with O_DIRECT into ``memory``."""
    view, done = memoryview(memory), 0
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        started = time.perf_counter()
        while done < len(view):
            count = os.preadv(fd, [view[done : done + READ_CHUNK]], done)
            if count <= 0:
                break
            done += count
        return time.perf_counter() - started
    finally:
        os.close(fd)


def _cache(path: Path, size: int) -> tuple[float, float]:
    """(read, first touch) seconds of the file's first ``size`` bytes through a private mapping."""
    evict([path])
    with open(path, "rb") as handle:
        memory = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    try:
        started = time.perf_counter()
        memory.madvise(MADV_POPULATE_READ)
        read = time.perf_counter() - started
        return read, _touch(memory)
    finally:
        memory.close()
        evict([path])


def _hugetlb_free_bytes() -> int:
    """Bytes free in the reserved huge page pool (0 where there is none)."""
    free = size = 0
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("HugePages_Free:"):
                free = int(line.split()[1])
            elif line.startswith("Hugepagesize:"):
                size = int(line.split()[1]) * 1024
    return free * size


def _reserved(size: int) -> float:
    """Seconds to write ``size`` bytes of the reserved huge page pool once; NaN when it has no room."""
    if _hugetlb_free_bytes() < size:
        return float("nan")
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
    try:
        return _write(memory)
    finally:
        memory.close()


def _fresh(size: int, huge: bool) -> float:
    memory = _anonymous(size, huge)
    try:
        return _write(memory)
    finally:
        memory.close()


def _read_into(path: Path, size: int, huge: bool) -> float:
    memory = _anonymous(size, huge)
    try:
        _write(memory)  # fault first: only the reads are timed
        return _direct_read(path, memory)
    finally:
        memory.close()


def measure_round(path: Path, size: int, settle: float) -> dict[str, float]:
    """Seconds per GB of each mode, once. A fresh mode waits ``settle`` seconds first, so that memory
    freed before has been reported; an "-again" mode runs right after the one before it."""
    seconds: dict[str, float] = {}
    time.sleep(settle)
    seconds["anon-4k"] = _fresh(size, huge=False)
    time.sleep(settle)
    seconds["anon-huge"] = _fresh(size, huge=True)
    seconds["anon-huge-again"] = _fresh(size, huge=True)
    seconds["hugetlb"] = _reserved(size)
    time.sleep(settle)
    seconds["cache-read"], seconds["cache-touch"] = _cache(path, size)
    seconds["cache-touch-again"] = _cache(path, size)[1]
    seconds["read-4k"] = _read_into(path, size, huge=False)
    seconds["read-huge"] = _read_into(path, size, huge=True)
    return {mode: seconds[mode] / (size / 1e9) for mode in MODES}


def reporting_state() -> dict[str, Any]:
    """The balloon's free page reporting settings and counters, where the kernel has them."""
    if not REPORTING.is_dir():
        return {"present": False}
    state: dict[str, Any] = {"present": True}
    for entry in sorted(REPORTING.iterdir()):
        text = entry.read_text().strip()
        state[entry.name] = int(text) if text.isdigit() else text
    return state


def _largest_file(store: Path) -> Path:
    return max((store / "stages").glob("*.safetensors"), key=lambda p: p.stat().st_size)


def run(path: Path, size: int, rounds: int, settle: float, say: Callable[[str], None]) -> dict[str, Any]:
    """``rounds`` rounds of every mode; medians in s/GB, the reporting counters before and after."""
    before = reporting_state()
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for index in range(rounds):
        for mode, value in measure_round(path, size, settle).items():
            samples[mode].append(value)
        say(f"round {index + 1}/{rounds}: " + ", ".join(f"{m} {samples[m][-1]:.2f}" for m in MODES))
    after = reporting_state()
    reported = (after.get("reported_kib", 0) - before.get("reported_kib", 0)) if after.get("present") else None
    samples = {mode: [None if v != v else v for v in values] for mode, values in samples.items()}  # NaN: none
    return {"file": str(path), "bytes": size, "rounds": rounds, "settle_s": settle, "s_per_gb": samples,
            "median_s_per_gb": {m: _median(v) for m, v in samples.items()},
            "page_reporting": after, "reported_mib_during_run": None if reported is None else reported // 1024}


def _median(values: list[float | None]) -> float | None:
    measured = [v for v in values if v is not None]  # None: not measured (no reserved pool)
    return round(statistics.median(measured), 3) if measured else None


def summary(report: dict[str, Any]) -> str:
    med = report["median_s_per_gb"]
    lines = [f"{mode:17s} " + ("not measured (no room in the reserved huge page pool)" if med[mode] is None else
                                f"{med[mode]:.3f} s/GB" + (f"  ({1 / med[mode]:.2f} GB/s)" if med[mode] else ""))
             for mode in MODES]
    state = report["page_reporting"]
    if state.get("present"):
        lines.append(f"free page reporting: order {state.get('page_reporting_order')}, "
                     f"{report['reported_mib_during_run']} MiB reported to the host during this run")
    else:
        lines.append("free page reporting: not present (no balloon reporting on this kernel)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.cli import DEFAULT_DATA

    parser = argparse.ArgumentParser(prog="python -m bench.fresh_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, help="a file to read (default: the largest stage of the "
                        "GPT-2-XL store under the bench data folder)")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to wait before each fresh mode (default 3)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    path = args.file or _largest_file(DEFAULT_DATA / "gpt2xl-fp32")
    size = min(args.size_mib << 20, path.stat().st_size // mmap.PAGESIZE * mmap.PAGESIZE)
    report = run(path, size, args.rounds, args.settle, say=(lambda _: None) if args.json else print)
    print(json.dumps(report, indent=1) if args.json else summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
