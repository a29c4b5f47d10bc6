"""Driver (runs inside the container as root): start the shipped unit with the probe, look, stop.

Everything it sees goes to findings.json through ``driverlib.record``; the host test asserts.
"""

from __future__ import annotations

import grp
import json
import os
import stat
import time
from pathlib import Path

import driverlib as d

UNIT = "hermesd.service"
STATE = Path("/var/lib/private/hermesd")
SOCKET = "/run/hermesd/hermesd.sock"
PYTHON = "/opt/hermesd/bin/python"
PROBE = "/hermesd-test/probe_service.py"

# A client process: a raw connect() decides access (zmq would retry silently), then, if allowed,
# a msgpack request over ZeroMQ REQ shows the daemon's socket really serves.
CLIENT = f"""
import json, socket, zmq, msgpack
out = {{}}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect({SOCKET!r}); out["connect"] = "ok"
except OSError as exc:
    out["connect"] = f"{{exc.errno}} {{exc.strerror}}"
s.close()
if out["connect"] == "ok":
    ctx = zmq.Context(); req = ctx.socket(zmq.REQ); req.setsockopt(zmq.LINGER, 0)
    req.connect("ipc://{SOCKET}")
    req.send(msgpack.packb({{"ping": "client"}}))
    out["reply"] = msgpack.unpackb(req.recv()) if req.poll(10000) else None
    req.close(); ctx.term()
print(json.dumps(out))
"""


def client_as(uid: int, gid: int, extra_groups: list[int]) -> dict:
    done = d.sh(PYTHON, "-c", CLIENT, user=uid, group=gid, extra_groups=extra_groups, timeout=60)
    return json.loads(done.stdout) if done.returncode == 0 else d.result(done)


def main() -> None:
    d.record("unit_cat", d.sh("systemctl", "cat", UNIT).stdout)
    d.record("exposure", d.exposure(UNIT))
    d.record("verify", d.result(d.sh("systemd-analyze", "verify", UNIT)))

    d.sh("systemctl", "start", "--no-block", UNIT, check=True)
    d.record("start_states", d.watch_states(UNIT, ["active/running", "failed/failed", "inactive/dead"], 300))
    d.record("after_start", d.show(UNIT, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts",
                                   "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic",
                                   "WatchdogUSec", "MemoryCurrent", "Result"))
    probe_file = STATE / "probe.json"
    d.record("probe", json.loads(probe_file.read_text()) if probe_file.exists() else None)
    if d.show(UNIT, "ActiveState")["ActiveState"] != "active":
        return  # nothing more to look at; the host test reports the states and the journal

    runtime = os.stat("/run/hermesd")
    d.record("runtime_dir", {"mode": oct(stat.S_IMODE(runtime.st_mode)), "gid": runtime.st_gid})
    clients_gid = grp.getgrnam("hermesd-clients").gr_gid
    d.record("clients_gid", clients_gid)
    nobody = 65534
    d.record("client_root", client_as(0, 0, [0]))
    d.record("client_member", client_as(nobody, nobody, [clients_gid]))
    d.record("client_other", client_as(nobody, nobody, []))

    # Negative control: the same matmuls under MemoryDenyWriteExecute=yes must lose bf16, or this
    # probe would not be exercising oneDNN's JIT (and the positive result above would prove little).
    control = d.sh("systemd-run", "--wait", "--pipe", "--quiet", "-p", "DynamicUser=yes",
                   "-p", "MemoryDenyWriteExecute=yes", PYTHON, PROBE, "--matmul-only", timeout=180)
    d.record("mdwe_control", json.loads(control.stdout) if control.returncode == 0 else d.result(control))

    started = time.monotonic()
    d.record("stop", d.result(d.sh("systemctl", "stop", UNIT, timeout=120)))
    d.record("stop_seconds", time.monotonic() - started)
    d.record("after_stop", d.show(UNIT, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "NRestarts"))
    stop_file = STATE / "probe-stop.json"
    d.record("probe_stop", json.loads(stop_file.read_text()) if stop_file.exists() else None)


if __name__ == "__main__":
    main()
