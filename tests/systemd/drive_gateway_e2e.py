"""Driver (runs inside the container as root): hermesd-gateway.service beside hermesd.service, both as shipped.

  start    systemctl start hermesd-gateway: Wants= pulls hermesd in, After= orders the gateway behind its READY
  answer   Ollama /api/generate over HTTP on 127.0.0.1:11434: SmolLM2 says Paris; /api/tags; /metrics
  restart  systemctl restart hermesd: the gateway keeps its process and answers again afterwards
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import driverlib as d

GATEWAY, DAEMON = "hermesd-gateway.service", "hermesd.service"
URL = "http://127.0.0.1:11434"
PROPS = ("ActiveState", "SubState", "MainPID", "NRestarts", "ActiveEnterTimestampMonotonic", "StatusText")


def http(path: str, body: dict | None = None, timeout: float = 300) -> dict:
    request = urllib.request.Request(URL + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
            return {"status": response.status, "body": text}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode(), "retry_after": exc.headers.get("Retry-After")}
    except OSError as exc:
        return {"status": None, "error": str(exc)}


def paris() -> dict:
    return http("/api/generate", {"model": "smollm2", "prompt": "What is the capital of France?", "stream": False,
                                  "options": {"num_predict": 24}})


def main() -> None:
    d.record("exposure", d.exposure(GATEWAY))
    started = d.sh("systemctl", "start", GATEWAY, timeout=400)
    d.record("start", d.result(started))
    d.record("daemon_after_start", d.show(DAEMON, *PROPS))
    d.record("gateway_after_start", d.show(GATEWAY, *PROPS))
    pid = d.show(GATEWAY, "MainPID")["MainPID"]
    status = d.sh("cat", f"/proc/{pid}/status").stdout
    d.record("process", {k: v.strip() for k, v in (ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
                         if k in ("Uid", "Groups", "NoNewPrivs", "Seccomp", "CapEff", "CapBnd")})
    d.record("answer", paris())
    d.record("tags", http("/api/tags"))
    d.record("metrics", http("/metrics"))
    d.record("restart", d.result(d.sh("systemctl", "restart", DAEMON, timeout=400)))
    d.record("daemon_after_restart", d.show(DAEMON, *PROPS))
    d.record("gateway_after_restart", d.show(GATEWAY, *PROPS))
    deadline = time.monotonic() + 120
    answer = paris()
    while answer["status"] != 200 and time.monotonic() < deadline:  # 503 while the socket is not back
        time.sleep(1)
        answer = paris()
    d.record("answer_after_restart", answer)
    d.record("gateway_journal", d.sh("journalctl", "-u", GATEWAY, "--no-pager", "-o", "cat").stdout[-4000:])


main()
