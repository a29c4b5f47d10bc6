"""The client library and the ``hermes`` command on their own: endpoints, fast failures, bounded memory.

Real ZeroMQ sockets stand in for the daemon where one is needed; no model is loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq
from daemon_support import CHILD_PATH
from hermes_client import Client, protocol
from hermes_client.client import MAX_CACHED_EVENTS, MAX_CACHED_JOBS, ipc_path


def _hermes(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hermes_client.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": CHILD_PATH, **(env or {})})


def test_a_missing_ipc_socket_fails_at_once_with_69(tmp_path):
    started = time.monotonic()
    done = _hermes("--endpoint", f"ipc://{tmp_path}/no-daemon.sock", "--timeout", "5", "--retries", "3", "ping")
    assert done.returncode == 69, done.stderr
    assert time.monotonic() - started < 4.0  # not 4 tries of 5 s
    assert "unreachable" in done.stderr and "no daemon socket" in done.stderr
    as_json = _hermes("--json", "--endpoint", f"ipc://{tmp_path}/no-daemon.sock", "status")
    assert as_json.returncode == 69 and '"unreachable"' in as_json.stdout


@pytest.mark.parametrize("endpoint", ["foo", "http://example.com", "ipc://", "tcp://localhost",
                                      "tcp://:5555", "tcp://localhost:99999", "tcp://localhost:port"])
def test_a_malformed_endpoint_is_a_usage_error_in_one_line(endpoint):
    for done in (_hermes("--endpoint", endpoint, "ping"), _hermes("status", env={"HERMES_ENDPOINT": endpoint})):
        assert done.returncode == 2, (endpoint, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("hermes: endpoint")
    with pytest.raises(ValueError):
        Client(endpoint)


def test_endpoints_that_are_fine():
    assert ipc_path("ipc:///run/hermesd/hermesd.sock") == "/run/hermesd/hermesd.sock"
    assert ipc_path("ipc://@hermesd") is None and ipc_path("tcp://127.0.0.1:5555") is None
    assert ipc_path("tcp://[::1]:5555") is None


LAST = 2 * MAX_CACHED_JOBS - 1


def test_pushes_for_jobs_nobody_waits_on_are_bounded(tmp_path):
    """A daemon (here a bare ROUTER) pushing messages for thousands of jobs: the client keeps a bounded few."""
    endpoint = f"ipc://{tmp_path}/router.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops at its high-water mark: on a busy machine pushes got lost
    router.bind(endpoint)

    def serve_one() -> None:
        identity, _, payload = router.recv_multipart()
        rid = msgpack.unpackb(payload)["rid"]
        for n in range(2 * MAX_CACHED_JOBS):
            for tokens in range(3 if n < LAST else 2 * MAX_CACHED_EVENTS):
                router.send_multipart([identity, b"", protocol.pack(
                    {"type": "progress", "job_id": f"j-{n}", "tokens": tokens, "stages": 0})])
        router.send_multipart([identity, b"", protocol.pack({"type": "pong", "rid": rid})])

    server = threading.Thread(target=serve_one)
    server.start()
    with Client(endpoint, timeout=30, retries=0) as client:
        assert client.ping()["type"] == "pong"
        server.join()
        cached = client._events
        assert len(cached._jobs) == MAX_CACHED_JOBS and len(cached) <= MAX_CACHED_JOBS * MAX_CACHED_EVENTS
        kept = [cached.pop(f"j-{LAST}") for _ in range(MAX_CACHED_EVENTS)]
        assert [e["tokens"] for e in kept] == list(range(MAX_CACHED_EVENTS, 2 * MAX_CACHED_EVENTS))  # the newest
        assert cached.pop(f"j-{LAST}") is None and f"j-{LAST}" not in cached._jobs  # emptied: forgotten
        assert [cached.pop(f"j-{LAST - 1}")["tokens"] for _ in range(3)] == [0, 1, 2]
        assert cached.pop("j-0") is None  # the jobs heard from longest ago went first
    router.close(linger=0)
