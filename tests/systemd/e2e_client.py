"""A hermesd client for the end-to-end drivers: runs *inside* the container as an unprivileged user.

The driver (root) starts it as ``nobody`` with or without the ``hermesd-clients`` group, so every job
goes through the socket's permissions as a real client's would. One JSON request in ``argv[1]``, one
JSON answer on stdout. Only ``hermes_client`` (pyzmq + msgpack) is imported, as on a client machine.

Requests (``op``):
  connect                      raw connect() to the socket: "ok" or "errno strerror" (zmq would retry silently)
  generate/embed               submit and wait: {"result": ...} or {"error": {"code", "message"}}
  submit                       {"jobs": [{task, model, inputs, params, deadline_s?}]} -> {"ids": [...]} (no wait)
  records                      {"ids": [...]} -> {"records": {id: record}} (one look, ``null`` when unreachable)
  wait                         {"ids", "timeout", "until": [states]} -> records once every job is in ``until``
                               (default: ended); rides out daemon restarts (reconnects, retries)
  status                       the daemon's status reply
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

from hermes_client import Client
from hermes_client.errors import HermesClientError, ServerError

ENDPOINT_PATH = "/run/hermesd/hermesd.sock"
ENDPOINT = f"ipc://{ENDPOINT_PATH}"
ENDED = ("done", "failed", "cancelled")


def connect() -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(ENDPOINT_PATH)
        return "ok"
    except OSError as exc:
        return f"{exc.errno} {exc.strerror}"
    finally:
        sock.close()


def _error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, ServerError):
        return {"code": exc.code, "message": exc.message}
    return {"code": type(exc).__name__, "message": str(exc)}


TEMPORARY = ("busy", "memory_pressure", "overheated", "shutting_down")


def _submit(client: Client, spec: dict[str, Any], timeout: float):
    """Submit one job, retrying temporary refusals (busy, memory pressure ...) until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit(spec["task"], spec["model"], spec["inputs"], spec.get("params", {}),
                                 deadline_s=spec.get("deadline_s"))
        except ServerError as exc:
            if exc.code not in TEMPORARY or time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def records(ids: list[str]) -> dict[str, Any]:
    try:
        with Client(ENDPOINT, timeout=5.0, retries=0) as client:
            return {job_id: client.job(job_id) for job_id in ids}
    except HermesClientError:
        return {job_id: None for job_id in ids}


def wait(ids: list[str], timeout: float, until: list[str]) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = records(ids)
        if all(r is not None and r["state"] in until for r in seen.values()):
            return {"records": seen, "complete": True}
        time.sleep(0.5)
    return {"records": seen, "complete": False}


def handle(request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "connect":
        return {"connect": connect()}
    if op in ("generate", "embed"):
        started = time.monotonic()
        try:
            with Client(ENDPOINT, timeout=10.0, retries=3) as client:
                job = _submit(client, {"task": op, **request}, request.get("timeout", 300))
                result = job.result(timeout=request.get("timeout", 300))
            return {"job_id": job.id, "result": result, "seconds": time.monotonic() - started}
        except (HermesClientError, TimeoutError) as exc:
            return {"error": _error(exc)}
    if op == "submit":
        ids, errors = [], []
        with Client(ENDPOINT, timeout=10.0, retries=3) as client:
            for spec in request["jobs"]:
                try:
                    ids.append(_submit(client, spec, 60).id)
                    errors.append(None)
                except HermesClientError as exc:
                    ids.append(None)
                    errors.append(_error(exc))
        return {"ids": ids, "errors": errors}
    if op == "records":
        return {"records": records(request["ids"])}
    if op == "wait":
        return wait(request["ids"], request.get("timeout", 300), request.get("until", list(ENDED)))
    if op == "status":
        try:
            with Client(ENDPOINT, timeout=10.0, retries=2) as client:
                return client.status()
        except HermesClientError as exc:
            return {"error": _error(exc)}
    raise SystemExit(f"unknown op {op!r}")


if __name__ == "__main__":
    print(json.dumps(handle(json.loads(sys.argv[1])), default=str))
