"""Convert a 6 B model (GPT-J-6B shape, random weights) inside a real 2 GiB cgroup: convert streams.

    python -m bench.convert_memory --dest /work/benchdata/gptj-6b-bf16 [--cap 2GiB] [--dtype bf16]

Prints one JSON line: wall time, the cgroup's peak usage (page cache included), convert's own peak RSS
(VmHWM), OOM kills, and the store's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench.cgroup import run_capped, unavailable_reason
from hermesd.units import parse_size

CONFIG = Path(__file__).parent / "configs" / "gpt-j-6b.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--cap", default="2GiB")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(json.dumps({"skipped": reason}))
        return 0
    shutil.rmtree(args.dest, ignore_errors=True)
    command = [sys.executable, "-m", "hermesd.cli", "convert", "--random-config", str(args.config), str(args.dest),
               "--dtype", args.dtype, "--json", "--quiet"]
    started = time.perf_counter()
    run = run_capped(command, parse_size(args.cap), timeout=3600)
    report = json.loads(run.stdout) if run.returncode == 0 else {"stderr": run.stderr[-2000:]}
    print(json.dumps({"cap_bytes": parse_size(args.cap), "returncode": run.returncode, "oom_kills": run.oom_kills,
                      "cgroup_peak_bytes": run.peak_bytes, "wall_s": round(time.perf_counter() - started, 1),
                      "convert": report}))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
