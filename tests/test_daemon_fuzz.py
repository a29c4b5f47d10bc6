"""Generated hostile messages against a real daemon: every message gets a documented reply (an error
code from the protocol, or a well-formed answer), never ``internal``; the daemon logs no traceback;
and its memory does not grow with the messages it has handled.

Hypothesis generates 2,000 messages (half of them near-valid requests, so the deep paths of submit,
job and cancel are reached and jobs run), and 8,000 more are byte-level mutations of those (insert, delete or
change a few bytes: broken msgpack, odd lengths, changed types). Hypothesis draws about 5 ms per
message on a busy 2-core machine; mutating is free, which keeps the test near a minute.
"""

from __future__ import annotations

import random
import time

import msgpack
import pytest
import zmq
from daemon_support import start_daemon, write_config
from hermes_client import ErrorCode
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

OPS = ["submit", "job", "cancel", "status", "models", "ping"]
MODELS = ["llama", "bert", "cls", "vit"]
DOCUMENTED = {code.value for code in ErrorCode} - {ErrorCode.INTERNAL.value}
ANSWERS = {"accepted", "job", "status", "models", "pong"}  # replies to a request (pushes carry a job_id)
PUSHES = {"progress", "result", "cancelled"}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=24),
                    st.binary(max_size=24))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=5)
inputs = st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), min_size=1, max_size=3),
                   st.lists(st.lists(st.integers(-3, 5100), min_size=1, max_size=4), min_size=1, max_size=2),
                   st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=2), values)
params = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.integers(-2, 70), "temperature": st.floats(-1, 11), "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-1, 9), "seed": st.integers(-1, 9), "stop": st.lists(st.text(max_size=6), max_size=3),
    "chat": st.booleans(), "normalize": st.booleans(), "pooling": st.sampled_from(["mean", "cls", "max"]),
    "junk": values})
# Near-valid: the right version and field types, odd values; these reach submit's deep checks and run jobs.
near_valid = st.fixed_dictionaries({
    "v": st.just(1), "op": st.sampled_from(OPS + ["submit"] * 6), "rid": st.integers(0, 1 << 20),
    "task": st.sampled_from(["generate", "embed", "classify", "forward"]), "model": st.sampled_from(MODELS),
    "inputs": inputs}, optional={
    "params": params, "priority": st.integers(-1, 10), "deadline_s": st.floats(-1, 100), "progress": st.booleans(),
    "client_job_id": st.text(max_size=8), "job_id": st.text(max_size=40), "extra": values})
# Hostile: any field may hold anything.
hostile = st.fixed_dictionaries({"v": st.just(1) | values, "op": st.sampled_from(OPS) | values}, optional={
    "rid": st.integers(-(2**63), 2**63 - 1) | st.text(max_size=140) | values,
    "task": st.sampled_from(["generate", "embed", "classify", "forward"]) | values,
    "model": st.sampled_from(MODELS) | values, "inputs": inputs, "params": params | values,
    "job_id": st.text(max_size=40) | values, "client_job_id": st.text(max_size=140) | values,
    "priority": st.integers(-1, 10) | values, "deadline_s": st.floats(-1, 1e9) | values, "progress": values})
payloads = st.one_of(near_valid.map(msgpack.packb), near_valid.map(msgpack.packb), near_valid.map(msgpack.packb),
                     hostile.map(msgpack.packb), values.map(msgpack.packb), st.binary(max_size=64))
messages = st.tuples(payloads, st.sampled_from(["delimited"] * 6 + ["bare", "extra frames"]))


@pytest.fixture(scope="module")
def daemon(daemon_stores, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    write_config(root, {"llama": {"store": daemon_stores["llama"], "max_new_tokens": 8},
                        "bert": {"store": daemon_stores["bert"], "max_prompt_tokens": 32},
                        "cls": {"store": daemon_stores["bert-cls"]}, "vit": {"store": daemon_stores["vit"]}},
                 queue_size=4, max_message_bytes=65536, log_level="info")
    running = start_daemon(root)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(running.endpoint)
    running.sock = sock
    running.seen = {"sent": 0, "errors": {}, "answers": {}}
    yield running
    sock.close()
    assert running.stop() == 0, running.log()


def _exchange(daemon, payload: bytes, framing: str) -> dict:
    """Send one message and return the daemon's reply to it (skipping pushes about accepted jobs)."""
    frames = {"delimited": [b"", payload], "bare": [payload], "extra frames": [b"", payload, b"x", b"y"]}[framing]
    daemon.sock.send_multipart(frames)
    deadline = time.monotonic() + 20
    while daemon.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
        reply = msgpack.unpackb(daemon.sock.recv_multipart()[-1])
        kind = reply.get("type")
        if kind in PUSHES or (kind == "error" and reply.get("job_id")):
            continue  # a job accepted earlier reporting progress or its end
        return reply
    raise AssertionError(f"no reply to {framing} {payload[:80]!r}")


def _check(daemon, message) -> None:
    reply = _exchange(daemon, *message)
    daemon.seen["sent"] += 1
    kind = reply["type"]
    if kind == "error":
        assert reply["code"] in DOCUMENTED, (message, reply)
        daemon.seen["errors"][reply["code"]] = daemon.seen["errors"].get(reply["code"], 0) + 1
    else:
        assert kind in ANSWERS, (message, reply)
        daemon.seen["answers"][kind] = daemon.seen["answers"].get(kind, 0) + 1


def _generated(count: int, batch: int = 50) -> list[tuple[bytes, str]]:
    """``count`` messages from hypothesis (drawn in batches: its per-example overhead is large)."""
    pool: list[tuple[bytes, str]] = []

    @settings(max_examples=count // batch, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(messages, min_size=batch, max_size=batch))
    def collect(drawn):
        pool.extend(drawn)

    collect()
    return pool


def _mutated(pool: list[tuple[bytes, str]], count: int, seed: int = 14) -> list[tuple[bytes, str]]:
    """``count`` copies of pool messages with one to four bytes inserted, deleted or changed."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        payload, framing = rng.choice(pool)
        data = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            where, action = rng.randrange(len(data) + 1), rng.random()
            if action < 0.4 or not data:
                data[where:where] = bytes([rng.randrange(256)])
            elif action < 0.7:
                del data[min(where, len(data) - 1)]
            else:
                data[min(where, len(data) - 1)] = rng.randrange(256)
        out.append((bytes(data), framing))
    return out


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_generated_hostile_messages_get_documented_replies_and_memory_stays_flat(daemon):
    started = time.monotonic()
    generated = _generated(2_000)
    hostile = generated + _mutated(generated, 10_000 - len(generated))
    for message in hostile[:1_000]:
        _check(daemon, message)
    after_first = _rss_bytes(daemon.proc.pid)
    for message in hostile[1_000:]:
        _check(daemon, message)
    after_all = _rss_bytes(daemon.proc.pid)
    seen = daemon.seen
    print(f"\n{seen['sent']} hostile messages in {time.monotonic() - started:.1f} s; daemon RSS "
          f"{after_first / 2**20:.1f} MiB after 1,000, {after_all / 2**20:.1f} MiB after all "
          f"({after_all / after_first:.3f}x); errors {seen['errors']}; answers {seen['answers']}")
    assert seen["sent"] >= 9_500  # hypothesis may stop a little short when it runs out of new examples
    assert seen["answers"].get("accepted", 0) > 0 and seen["errors"].get("invalid_params", 0) > 0  # deep paths
    assert after_all <= 1.25 * after_first
    log = daemon.log()
    assert "Traceback" not in log and "request failed" not in log
    assert daemon.proc.poll() is None
