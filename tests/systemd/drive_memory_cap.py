"""Driver (runs inside the container as root): a model larger than MemoryMax= answers under it.

The shipped unit plus the README's memory drop-in (MemoryMax/MemoryHigh/MemorySwapMax). The host runs
the whole container in a memory cgroup with the same hard limit (the container's own systemd has no
memory controller here, so MemoryMax= alone would be accepted and not enforced); this driver records
what systemd reports, what the daemon's process peaked at, and the answer.
"""

from __future__ import annotations

import time
from pathlib import Path

import driverlib as d
from drive_service_e2e import UNIT, client, props

PROMPT = "What is the capital of France?"


def proc_status(pid: str) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}


def main() -> None:
    d.record("unit_cat", d.sh("systemctl", "cat", UNIT).stdout)
    started = time.monotonic()
    d.record("start", d.result(d.sh("systemctl", "start", UNIT, timeout=300)))
    d.record("start_seconds", time.monotonic() - started)
    after = d.record("after_start", props())
    if after["ActiveState"] != "active":
        return
    pid = after["MainPID"]
    d.record("cgroup", Path(f"/proc/{pid}/cgroup").read_text())
    d.record("generate", client({"op": "generate", "model": "twin", "inputs": PROMPT,
                                 "params": {"max_new_tokens": 8}}, timeout=400))
    d.record("daemon_status", client({"op": "status"}))
    status = proc_status(pid)
    d.record("proc", {k: status.get(k) for k in ("VmHWM", "VmRSS", "VmPeak")})
    d.record("memory_props", d.show(UNIT, "MemoryAccounting", "MemoryMax", "MemoryHigh", "MemorySwapMax",
                                    "MemoryCurrent", "MemoryPeak"))
    d.record("inner_cgroup_limit", d.sh("sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes "
                                        "/sys/fs/cgroup/memory.max 2>/dev/null").stdout.split())
    d.record("stop", d.result(d.sh("systemctl", "stop", UNIT, timeout=120)))
    d.record("after_stop", props())
    d.record("journal", d.sh("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout.splitlines()[-40:])


if __name__ == "__main__":
    main()
