"""A real memory cap: the daemon and a memory-hungry neighbour share one cgroup (v1 here, v2 where writable).

With the memory watchdog on, the daemon sheds its resident set when usage nears the limit, the job
finishes with the same output and the group records no OOM kill. With the watchdog off, the same
neighbour used to drive the group into the OOM killer while resident stages were anonymous memory;
they are now mappings of the store's files (engine.mapped), so the kernel reclaims them instead: no
OOM kill either, the same output, and the daemon's file-backed memory falls by what the neighbour took.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_support import start_daemon, write_config

from bench.cgroup import MemoryGroup, unavailable_reason
from hermesd.store.convert import convert, open_source

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]

CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 8, "n_embd": 1024, "n_head": 16,
          "vocab_size": 8000, "n_positions": 64}
HEADROOM = 250 << 20   # the cap: the daemon's settled usage plus this
NEIGHBOUR = 420 << 20  # what the neighbour allocates, 20 MiB every 0.4 s: more than the headroom
IDS = [[7, 99, 1234, 5, 77, 3000, 42, 8, 640, 2, 19, 7000]]
ALLOCATE = f"""
import sys, time
chunks = []
while sum(map(len, chunks)) < {NEIGHBOUR}:
    chunks.append(bytearray(b"\\x01") * (20 << 20))  # written, so really resident
    time.sleep(0.4)
print("allocated", flush=True)
time.sleep(float(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cgroup-watchdog")
    (root / "config.json").write_text(json.dumps(CONFIG))
    convert(open_source(None, random_config=root / "config.json"), root / "store")
    return root / "store"


def _usage(group: MemoryGroup) -> int:
    name = "memory.usage_in_bytes" if group.version == "v1" else "memory.current"
    return int((group.path / name).read_text())


def _cap(group: MemoryGroup, limit: int) -> None:
    name = "memory.limit_in_bytes" if group.version == "v1" else "memory.max"
    (group.path / name).write_text(str(limit))


def _scenario(store: Path, root: Path, watchdog: bool) -> dict:
    """Start the daemon in a fresh group, cap it near its settled usage, add the neighbour, run a job."""
    write_config(root, {"gpt2": {"store": store, "resident": "all"}}, thermal={"enabled": False},
                 memory={"enabled": watchdog, "low_water": 0.85, "critical": 0.97, "recover": 0.7,
                         "psi_some_avg10": 100.0})
    outcome: dict = {}
    with MemoryGroup(4 << 30, prefix="hermesd-test") as group:
        daemon = start_daemon(root, preexec=group.join)
        try:
            client = daemon.client(timeout=60)
            outcome["before"] = client.submit("forward", "gpt2", IDS).result(120)["outputs"]["logits"]["values"]
            time.sleep(1.0)
            settled = _usage(group)
            _cap(group, settled + HEADROOM)
            neighbour = subprocess.Popen([sys.executable, "-c", ALLOCATE, "20"], stdout=subprocess.PIPE,
                                         text=True, preexec_fn=group.join)
            outcome["file_before"] = _rss_file(daemon.proc.pid)
            allocated = neighbour.stdout.readline().strip() == "allocated"
            outcome.update(settled=settled, limit=settled + HEADROOM, allocated=allocated,
                           daemon_alive=daemon.proc.poll() is None)
            outcome["file_after"] = _rss_file(daemon.proc.pid) if outcome["daemon_alive"] else None
            if allocated and outcome["daemon_alive"]:
                outcome["resident_now"] = client.models()[0]["resident_now"]
                result = client.submit("forward", "gpt2", IDS).result(120)
                outcome["under_pressure"] = result["outputs"]["logits"]["values"]
                outcome["stats"] = result["stats"]
                outcome["watchdogs"] = client.status()["watchdogs"]
            neighbour.kill()
            neighbour.wait()
            outcome["record"] = group.record()
        finally:
            daemon.close_clients()
            daemon.proc.kill()
            daemon.proc.wait()
            outcome["log"] = daemon.log()
    return outcome


def _rss_file(pid: int) -> int:
    """RssFile of a process: its mapped file pages (the resident stages), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line")


def test_under_a_cap_the_watchdog_sheds_and_without_it_the_kernel_reclaims_the_mapped_weights(store, tmp_path):
    guarded = _scenario(store, tmp_path / "on", watchdog=True)
    assert guarded["allocated"] and guarded["daemon_alive"], guarded["log"][-3000:]
    assert guarded["record"].oom_kills == 0
    assert guarded["record"].peak_bytes <= guarded["limit"]
    assert guarded["resident_now"] == []  # the resident set was released for the neighbour
    assert guarded["under_pressure"] == guarded["before"]  # same logits, streamed instead of resident
    assert guarded["stats"]["on_demand_loads"] > 0 and guarded["stats"]["prefetch_paused_stages"] > 0
    assert "memory NORMAL -> LOW" in guarded["log"]

    unguarded = _scenario(store, tmp_path / "off", watchdog=False)
    assert unguarded["allocated"] and unguarded["daemon_alive"], unguarded["log"][-3000:]
    assert unguarded["record"].oom_kills == 0 and unguarded["record"].peak_bytes <= unguarded["limit"]
    assert len(unguarded["resident_now"]) > 0  # nothing shed by the daemon: the kernel took the pages
    reclaimed = unguarded["file_before"] - unguarded["file_after"]
    assert reclaimed >= 0.8 * (NEIGHBOUR - HEADROOM), unguarded
    assert unguarded["under_pressure"] == unguarded["before"]  # read back from the store where needed
