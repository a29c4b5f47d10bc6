"""Who may see which job, and who may connect: ownership per identity over ipc (peer uid) and over
TCP with CURVE (client public key), against one real daemon serving both endpoints."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from daemon_support import CHILD_PATH, start_daemon, wait_for_state, write_config
from hermes_client import Client, Conflict, DaemonUnreachable, ServerError
from hooked_daemon import hang_input

OTHER_UID = 65534  # nobody


def _hermesd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hermesd.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": CHILD_PATH}, timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def secured(daemon_stores, tmp_path_factory):
    """A daemon on an ipc socket any uid may reach and a CURVE tcp endpoint; alice's key is allowed."""
    root = tmp_path_factory.mktemp("secured")
    run_dir = Path(tempfile.mkdtemp(prefix="hermesd-sec-"))  # outside pytest's 0700 tree: other uids reach it
    run_dir.chmod(0o711)
    tcp = f"tcp://127.0.0.1:{_free_port()}"
    config = write_config(root, {"bert": {"store": daemon_stores["bert"], "max_prompt_tokens": 32},
                                 "vit": {"store": daemon_stores["vit"]}},
                          endpoint=f"ipc://{run_dir}/hermesd.sock", socket_mode="0666", tcp_endpoint=tcp)
    made = _hermesd("keys", "--config", str(config))
    assert made.returncode == 0 and "server public key" in made.stdout, made.stderr
    keys = root / "state" / "curve"
    assert oct((keys / "server.key_secret").stat().st_mode & 0o777) == "0o600"
    for name, where in (("alice", keys / "clients"), ("bob", keys / "clients"), ("mallory", root / "elsewhere")):
        assert _hermesd("keys", "--client", name, "--dir", str(where)).returncode == 0
    running = start_daemon(root, hooked=True)
    running.endpoint = f"ipc://{run_dir}/hermesd.sock"
    running.tcp = tcp
    running.keys = keys
    running.elsewhere = root / "elsewhere"
    yield running
    assert running.stop() == 0, running.log()


def _as_other_uid(endpoint: str, job_id: str, client_job_id: str) -> dict:
    """In a forked child running as OTHER_UID: look at, cancel, and reuse the key of uid 0's job."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(reader)
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            out = {}
            with Client(endpoint, timeout=10, retries=0, context=zmq.Context()) as client:
                for name, call in (("job", lambda: client.job(job_id)), ("cancel", lambda: client.cancel(job_id))):
                    try:
                        out[name] = call()
                    except ServerError as exc:
                        out[name] = [exc.code, exc.message]
                out["current"] = client.status()["current_job"]
                out["resubmit"] = client.submit("embed", "bert", "w9", client_job_id=client_job_id).id
            os.write(writer, msgpack.packb(out))
        except BaseException as exc:  # noqa: BLE001  (reported to the parent, which fails the test)
            os.write(writer, msgpack.packb({"error": repr(exc)}))
        finally:
            os._exit(0)
    os.close(writer)
    data = b""
    while chunk := os.read(reader, 65536):
        data += chunk
    os.close(reader)
    os.waitpid(pid, 0)
    return msgpack.unpackb(data)


def test_job_ids_are_random_128_bit(secured):
    client = secured.client()
    jobs = [client.submit("embed", "bert", "w1") for _ in range(3)]
    ids = {job.id for job in jobs}
    assert len(ids) == 3 and all(re.fullmatch(r"j-[0-9a-f]{32}", i) for i in ids)
    for job in jobs:  # finished, so they cannot share a sweep with (and stand before) the next test's job
        job.result(60)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second uid")
def test_another_uid_cannot_see_cancel_or_collide_with_a_job(secured):
    client = secured.client()
    job = client.submit("embed", "bert", hang_input(3), client_job_id="shared-name")
    wait_for_state(client, job.id, "running")
    seen = _as_other_uid(secured.endpoint, job.id, "shared-name")
    assert "error" not in seen, seen
    assert seen["job"][0] == seen["cancel"][0] == "not_found"
    with pytest.raises(ServerError) as never_existed:
        client.job("j-" + "0" * 32)
    assert seen["job"][1].replace(job.id, "ID") == never_existed.value.message.replace("j-" + "0" * 32, "ID")
    assert seen["current"]["id"] is None and seen["current"]["task"] == "embed"  # counts, not ids
    assert client.status()["current_job"]["id"] == job.id  # the owner sees its own
    assert seen["resubmit"] != job.id  # client job ids are scoped per identity
    assert job.result(60)["dimensions"] == 64  # the other uid's cancel did nothing


def test_reusing_a_client_job_id_for_different_work_is_a_conflict(secured):
    client = secured.client()
    first = client.submit("embed", "bert", "w1 w2", client_job_id="reading-7")
    assert client.submit("embed", "bert", "w1 w2", client_job_id="reading-7").id == first.id  # a resend
    with pytest.raises(Conflict) as info:
        client.submit("embed", "bert", "w3", client_job_id="reading-7")
    assert info.value.code == "conflict" and first.id in info.value.message
    assert first.result(60)["dimensions"] == 64


def _tcp_client(secured, timeout: float = 1.5, **keys) -> Client:
    client = Client(secured.tcp, timeout=timeout, retries=0, **keys)  # a refused key: silence, then unreachable
    secured.clients.append(client)
    return client


def test_curve_lets_allowed_keys_in_and_keeps_their_jobs_apart(secured):
    server = str(secured.keys / "server.key")
    alice = _tcp_client(secured, 10, server_key=server, client_key=str(secured.keys / "clients" / "alice.key_secret"))
    bob = _tcp_client(secured, 10, server_key=server, client_key=str(secured.keys / "clients" / "bob.key_secret"))
    assert alice.ping()["type"] == "pong"
    job = alice.submit("embed", "bert", "w4")
    assert job.result(60)["dimensions"] == 64
    with pytest.raises(ServerError) as info:
        bob.job(job.id)
    assert info.value.code == "not_found"
    with pytest.raises(ServerError):  # nor the local user who runs the daemon
        secured.client().job(job.id)


def test_curve_refuses_no_key_and_unknown_keys(secured):
    server = str(secured.keys / "server.key")
    with pytest.raises(DaemonUnreachable):
        _tcp_client(secured).ping()  # plain TCP to a CURVE endpoint: the handshake fails
    with pytest.raises(DaemonUnreachable):
        _tcp_client(secured, server_key=server,
                    client_key=str(secured.elsewhere / "mallory.key_secret")).ping()
    with pytest.raises(DaemonUnreachable):
        _tcp_client(secured, server_key=server).ping()  # a throwaway key pair
    assert "Traceback" not in secured.log()


def test_sighup_rereads_the_allowed_client_keys(secured):
    made = _hermesd("keys", "--client", "carol", "--dir", str(secured.elsewhere))
    assert made.returncode == 0
    carol = dict(server_key=str(secured.keys / "server.key"), client_key=str(secured.elsewhere / "carol.key_secret"))
    with pytest.raises(DaemonUnreachable):
        _tcp_client(secured, **carol).ping()
    (secured.keys / "clients" / "carol.key").write_bytes((secured.elsewhere / "carol.key").read_bytes())
    reloads = secured.log().count("config reloaded")
    secured.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while secured.log().count("config reloaded") == reloads:
        assert time.monotonic() < deadline, secured.log()[-2000:]
        time.sleep(0.1)
    assert _tcp_client(secured, 10, **carol).ping()["type"] == "pong"


def test_the_cli_takes_keys_from_options(secured):
    args = [sys.executable, "-m", "hermes_client.cli", "--endpoint", secured.tcp, "--timeout", "3", "--retries", "0"]
    env = {**os.environ, "PYTHONPATH": CHILD_PATH}
    ok = subprocess.run([*args, "--server-key", str(secured.keys / "server.key"), "--client-key",
                         str(secured.keys / "clients" / "bob.key_secret"), "ping"], capture_output=True, text=True,
                        env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([*args, "ping"], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 69
    bad = subprocess.run([*args, "--server-key", "not-a-key", "ping"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_tcp_without_keys_refuses_to_start_unless_insecure_is_allowed(daemon_stores, tmp_path):
    models = {"bert": {"store": daemon_stores["bert"]}}
    write_config(tmp_path, models, tcp_endpoint=f"tcp://127.0.0.1:{_free_port()}")
    refused = start_daemon(tmp_path, wait_ready=False)
    assert refused.proc.wait(120) == 78 and "hermesd keys" in refused.log()
    tcp = f"tcp://127.0.0.1:{_free_port()}"
    write_config(tmp_path, models, tcp_endpoint=tcp, allow_insecure_tcp=True)
    insecure = start_daemon(tmp_path)
    try:
        with Client(tcp, timeout=10, retries=0) as plain:
            assert plain.ping()["type"] == "pong"
        assert "without CURVE" in insecure.log()
    finally:
        assert insecure.stop() == 0


def test_image_paths_are_off_by_default_and_the_cli_sends_image_bytes(secured, tmp_path):
    from PIL import Image

    picture = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(picture)
    with pytest.raises(ServerError) as info:
        secured.client().submit("classify", "vit", [str(picture)])
    assert info.value.code == "invalid_params" and "image_dirs" in info.value.message
    sent = subprocess.run([sys.executable, "-m", "hermes_client.cli", "--endpoint", secured.endpoint, "--json",
                           "classify", "--model", "vit", "--image", str(picture)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": CHILD_PATH}, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert '"label"' in sent.stdout


NS_SERVER = """
import os, sys, zmq
from hermesd.daemon.identity import partial_uid_namespace
from hermesd.daemon.sockets import receive
router = zmq.Context().socket(zmq.ROUTER)
router.bind(sys.argv[1])
os.chmod(sys.argv[1][len("ipc://"):], 0o777)
print(partial_uid_namespace(), flush=True)
for _ in range(2):
    router.poll(20000)
    print(receive(router, 3, 4096).identity, flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for unshare and a second uid")
def test_in_a_user_namespace_unmapped_uids_read_as_one_overflow_identity():
    run_dir = Path(tempfile.mkdtemp(prefix="hermesd-ns-"))
    run_dir.chmod(0o777)
    endpoint = f"ipc://{run_dir}/s"
    server = subprocess.Popen(["unshare", "-U", "-r", sys.executable, "-c", NS_SERVER, endpoint], text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": CHILD_PATH})
    try:
        assert server.stdout.readline().strip() == "True"  # what the daemon warns about at start
        for uid in (0, 1000):
            pid = os.fork()
            if pid == 0:
                try:
                    os.setuid(uid)
                    sock = zmq.Context().socket(zmq.DEALER)
                    sock.connect(endpoint)
                    sock.send_multipart([b"", b"x"])
                    time.sleep(0.5)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        assert [server.stdout.readline().strip() for _ in range(2)] == ["uid:0", "uid:65534"]
    finally:
        server.kill()
        server.wait()
