"""A stand-in for ``hermesd serve`` that exercises what the daemon will do, under the shipped unit.

Run by the venv's python as the unit's ExecStart (a drop-in swaps only that line), so it runs with
every hardening setting of ``systemd/hermesd.service``: it does bf16 and fp32 torch matmuls, the
daemon's kinds of system access (O_DIRECT reads, madvise(MADV_HUGEPAGE), threads, PSI and cgroup
reads, a ZeroMQ ipc socket in ``$RUNTIME_DIRECTORY``), writes what it saw to
``$STATE_DIRECTORY/probe.json`` and then speaks sd_notify like the daemon: READY=1 with STATUS=,
WATCHDOG=1 pings, STOPPING=1 on SIGTERM, exit 0. It echoes msgpack requests on the socket so a
client can show a round trip.

Accepts the daemon's ``--config PATH`` (it only checks it can read and not write it).
``--matmul-only`` prints just the matmul results as JSON and exits 0 (the negative control under
``MemoryDenyWriteExecute=yes``).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

READY_DELAY_S = 1.5  # long enough for the driver to see the unit sit in "activating" before READY
STATUS_TEXT = "probe: bf16 and fp32 matmuls done, serving echo on ipc socket"


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def matmul_checks() -> dict[str, Any]:
    """bf16 matmul and linear (oneDNN JIT kernels on x86) and an fp32 matmul, checked against fp64."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=gen), torch.randn(512, 384, generator=gen)
    report: dict[str, Any] = {"torch": torch.__version__,
                              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}
    # Reference for bf16: the same bf16-rounded inputs multiplied in fp64, so only the kernel's
    # own rounding (bf16 output, ~2^-8 relative) is measured.
    ref16 = a.bfloat16().double() @ b.bfloat16().double()
    cases = {
        "bf16_matmul": lambda: a.bfloat16() @ b.bfloat16(),
        "bf16_linear": lambda: torch.nn.functional.linear(a.bfloat16(), b.t().contiguous().bfloat16()),
    }
    for name, compute in cases.items():
        try:
            out = compute()
            err = ((out.double() - ref16).abs().max() / ref16.abs().max()).item()
            report[name] = {"ok": out.dtype == torch.bfloat16 and err < 2e-2, "max_rel_err": err}
        except Exception as exc:  # the failure under MemoryDenyWriteExecute is a RuntimeError
            report[name] = {"ok": False, "error": _error(exc)}
    try:
        ref32 = a.double() @ b.double()
        err = ((a @ b).double() - ref32).abs().max().item() / ref32.abs().max().item()
        report["fp32_matmul"] = {"ok": err < 1e-5, "max_rel_err": err}
    except Exception as exc:
        report["fp32_matmul"] = {"ok": False, "error": _error(exc)}
    return report


def threaded_matmuls() -> dict[str, Any]:
    """Two Python threads running bf16 matmuls at once (the daemon's loaders + executor), torch's pool."""
    import torch

    errors: list[str] = []

    def work() -> None:
        try:
            x = torch.ones(128, 128, dtype=torch.bfloat16)
            if (x @ x).float().sum().item() != 128.0 * 128 * 128:
                errors.append("wrong result")
        except Exception as exc:
            errors.append(_error(exc))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"ok": not errors, "errors": errors, "torch_threads": torch.get_num_threads()}


def direct_read(directory: Path) -> dict[str, Any]:
    """Write a file, then read it back with O_DIRECT into a page-aligned mmap buffer (the reader's path)."""
    path = directory / "probe-odirect.bin"
    data = os.urandom(1 << 20)
    path.write_bytes(data)  # still in the page cache: the kernel writes it back before a direct read
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:  # tmpfs has no O_DIRECT; the reader falls back to buffered reads there
        return {"ok": False, "error": _error(exc)}
    try:
        buf = mmap.mmap(-1, len(data))  # anonymous maps are page-aligned, as O_DIRECT requires
        n = os.preadv(fd, [buf], 0)
        return {"ok": n == len(data) and buf[:] == data, "bytes": n}
    except OSError as exc:
        return {"ok": False, "error": _error(exc)}
    finally:
        os.close(fd)
        path.unlink()


def hugepage_advice() -> dict[str, Any]:
    """madvise(MADV_HUGEPAGE) on an anonymous arena, as the buffer pool does."""
    try:
        arena = mmap.mmap(-1, 8 << 20)
        arena.madvise(mmap.MADV_HUGEPAGE)
        arena[:: 1 << 12] = b"\1" * (len(arena) >> 12)  # fault it in
        return {"ok": True}
    except OSError as exc:
        return {"ok": False, "error": _error(exc)}


def readable(path: str) -> dict[str, Any]:
    try:
        return {"ok": True, "head": Path(path).read_text()[:200]}
    except OSError as exc:
        return {"ok": False, "error": _error(exc)}


def cgroup_memory_files() -> dict[str, Any]:
    """Which of the daemon's own cgroup memory files (v2 or v1) it can read."""
    found: dict[str, Any] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            candidates = [f"/sys/fs/cgroup{rel}/memory.current", f"/sys/fs/cgroup/unified{rel}/memory.current"]
        elif "memory" in controllers.split(","):
            candidates = [f"/sys/fs/cgroup/memory{rel}/memory.usage_in_bytes"]
        else:
            continue
        for candidate in candidates:
            found[candidate] = readable(candidate)["ok"]
    return found


def process_status() -> dict[str, str]:
    keys = ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "CapEff", "CapBnd", "CapAmb")
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines) if k in keys}


def write_denied(path: str) -> str:
    """Try to create a file at ``path``; the errno name that stopped it ("" when allowed)."""
    try:
        with open(path, "w"):
            pass
        os.unlink(path)
        return ""
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


def append_denied(path: str) -> str:
    """Try to open an existing file for appending; the errno name that stopped it ("" when allowed)."""
    try:
        with open(path, "a"):
            return ""
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


def affinity_call() -> str:
    """sched_setaffinity is in @resources, which the unit filters: expect EPERM, not a crash."""
    try:
        os.sched_setaffinity(0, os.sched_getaffinity(0))
        return "allowed"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    tmp.replace(path)


def serve(config: str) -> None:
    """Run like the daemon until SIGTERM; ``config`` is the --config path (only read, as a check)."""
    import msgpack
    import sdnotify
    import zmq

    notifier = sdnotify.SystemdNotifier()
    state = Path(os.environ["STATE_DIRECTORY"])
    runtime = Path(os.environ["RUNTIME_DIRECTORY"])
    report: dict[str, Any] = {"started_usec": time.monotonic_ns() // 1000, "matmul": matmul_checks()}
    report["threads"] = threaded_matmuls()
    report["o_direct"] = direct_read(state)
    report["madv_hugepage"] = hugepage_advice()
    report["psi_memory"] = readable("/proc/pressure/memory")
    report["meminfo"] = readable("/proc/meminfo")["ok"]
    report["thermal_listing"] = sorted(os.listdir("/sys/class/thermal")) if os.path.isdir("/sys/class/thermal") else None
    report["cgroup_memory"] = cgroup_memory_files()
    report["status"] = process_status()
    report["groups"] = os.getgroups()
    report["write_opt"] = write_denied("/opt/hermesd/probe-write-test")
    report["write_etc"] = write_denied("/etc/hermesd-probe-write-test")
    report["config"] = {"read": readable(config)["ok"], "write": append_denied(config)}
    report["affinity"] = affinity_call()
    report["env"] = {k: os.environ.get(k) for k in (
        "RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CACHE_DIRECTORY", "CONFIGURATION_DIRECTORY",
        "WATCHDOG_USEC", "HF_HUB_OFFLINE", "HOME", "USER")}
    report["notify_socket"] = bool(os.environ.get("NOTIFY_SOCKET"))

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    sock_path = runtime / "hermesd.sock"
    router.bind(f"ipc://{sock_path}")
    st = os.stat(sock_path)
    report["socket"] = {"mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid}

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    time.sleep(READY_DELAY_S)
    report["ready_sent_usec"] = time.monotonic_ns() // 1000
    report["status_text"] = STATUS_TEXT
    write_json(state / "probe.json", report)
    notifier.notify(f"READY=1\nSTATUS={STATUS_TEXT}")

    watchdog_every = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6
    last_ping = time.monotonic()
    echoed = 0
    while not stop.is_set():
        if router.poll(200):
            identity, empty, payload = router.recv_multipart()
            echoed += 1
            reply = {"echo": msgpack.unpackb(payload), "daemon_uid": os.getuid()}
            router.send_multipart([identity, empty, msgpack.packb(reply)])
        if watchdog_every and time.monotonic() - last_ping >= watchdog_every:
            notifier.notify("WATCHDOG=1")
            last_ping = time.monotonic()
    notifier.notify("STOPPING=1\nSTATUS=probe: draining")
    write_json(state / "probe-stop.json", {"stopping_sent_usec": time.monotonic_ns() // 1000, "echoed": echoed})
    router.close(linger=0)
    ctx.term()


def main() -> int:
    if "--matmul-only" in sys.argv:
        print(json.dumps(matmul_checks()))
        return 0
    args = sys.argv[1:]
    serve(args[args.index("--config") + 1] if "--config" in args else "/etc/hermesd/hermesd.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
