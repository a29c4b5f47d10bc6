"""Does reading the disk slow compute on this machine, with no hermesd involved?

    python -m bench.interference --files DIR [--rounds 3] [--threads N] [--json]

PipeLoad's ideal, max(io-only, compute-only), assumes that reads and compute do not slow each other.
This measures that assumption directly: a fixed fp32 matrix workload (GPT-2-XL's MLP shape, 512 rows,
``--threads`` torch threads) is timed alone and while another process streams the weight files under
``DIR`` with O_DIRECT reads (``dd iflag=direct``), once at normal priority and once as hermesd's idle
loader runs (``chrt --idle``, ``ionice -c2 -n7``). The reader's GB/s alone and beside compute, and the
CPU steal time the guest saw (/proc/stat), are reported too. Rounds alternate; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("alone", "reader", "idle-reader")
READER_PREFIX = {"reader": [], "idle-reader": ["chrt", "--idle", "0", "ionice", "-c2", "-n7"]}


def steal_seconds() -> float:
    """Seconds of CPU steal summed over all CPUs so far (the 8th field of /proc/stat's cpu line)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def compute_once(threads: int, repeats: int) -> float:
    """Seconds for ``repeats`` fp32 [512, 1600] x [1600, 6400] products and back (GPT-2-XL's MLP)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.randn(512, 1600)
    up, down = torch.randn(1600, 6400), torch.randn(6400, 1600)
    (x @ up) @ down  # warm the kernels and the allocator
    started = time.perf_counter()
    for _ in range(repeats):
        (x @ up) @ down
    return time.perf_counter() - started


def start_reader(files: list[Path], mode: str) -> subprocess.Popen:
    """A process that reads ``files`` with O_DIRECT in a loop until killed; it prints bytes per pass."""
    script = "while true; do for f in \"$@\"; do dd if=\"$f\" of=/dev/null bs=64M iflag=direct status=none; done; done"
    return subprocess.Popen([*READER_PREFIX[mode], "bash", "-c", script, "reader", *map(str, files)])


def reader_gbps(files: list[Path], seconds: float) -> float:
    """GB/s of O_DIRECT reads of ``files`` for about ``seconds`` with nothing else running."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for f in files:
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=64M", "iflag=direct", "status=none"],
                           check=True)
            done += f.stat().st_size
            if time.perf_counter() - started >= seconds:
                break
    return done / (time.perf_counter() - started) / 1e9


def one_round(files: list[Path], threads: int, repeats: int) -> dict[str, Any]:
    """Compute seconds and steal seconds for each mode, in order."""
    out = {}
    for mode in MODES:
        reader = start_reader(files, mode) if mode != "alone" else None
        try:
            time.sleep(0.5 if reader else 0)  # the reader's first reads are in flight
            steal = steal_seconds()
            seconds = compute_once(threads, repeats)
            out[mode] = {"compute_s": seconds, "steal_s": steal_seconds() - steal}
        finally:
            if reader is not None:
                reader.kill()
                reader.wait()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.interference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=Path, required=True, help="a directory of large files to read (a store)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=20, help="products per timing (about 4 s on 2 EPYC cores)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    files = sorted((p for p in args.files.rglob("*") if p.is_file() and p.stat().st_size >= 64 << 20),
                   key=lambda p: str(p))
    if not files:
        raise SystemExit(f"no files of 64 MiB or more under {args.files}")
    rounds = [one_round(files, args.threads, args.repeats) for _ in range(args.rounds)]
    report: dict[str, Any] = {"threads": args.threads, "files": len(files), "rounds": rounds}
    alone = statistics.median(r["alone"]["compute_s"] for r in rounds)
    for mode in MODES:
        seconds = statistics.median(r[mode]["compute_s"] for r in rounds)
        report[mode] = {"compute_s": seconds, "slowdown": seconds / alone,
                        "steal_s": statistics.median(r[mode]["steal_s"] for r in rounds)}
    report["reader_alone_gbps"] = reader_gbps(files, 5.0)
    if args.json:
        print(json.dumps(report))
    else:
        for mode in MODES:
            r = report[mode]
            print(f"{mode:12s} compute {r['compute_s']:.2f} s ({r['slowdown']:.2f}x alone), steal {r['steal_s']:.2f} s")
        print(f"reader alone: {report['reader_alone_gbps']:.2f} GB/s (O_DIRECT, 64 MiB reads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
