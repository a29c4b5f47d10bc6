"""hermesd serve as a real process: round trips through the real client, hostile input, queue, cancel.

One daemon serves the module (starting one costs seconds); tests that stop, crash or reconfigure a
daemon are in test_daemon_lifecycle.py.
"""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import torch
import zmq
from daemon_support import start_daemon, wait_for_state, write_config
from hermes_client import ErrorCode, JobCancelled, JobFailed, ServerError, TryLater, protocol
from hooked_daemon import hang_input

import hermesd
from hermesd.tasks import run_task

PROMPT = "w5 w17 w230 w42"


@pytest.fixture(scope="module")
def daemon(daemon_stores, tmp_path_factory):
    stores = daemon_stores
    root = tmp_path_factory.mktemp("daemon")
    images = tmp_path_factory.mktemp("images")
    write_config(root, {"llama": {"store": stores["llama"], "prefetch": 1, "max_new_tokens": 64},
                        "bert": {"store": stores["bert"], "prefetch": 2, "max_prompt_tokens": 32},
                        "cls": {"store": stores["bert-cls"]}, "vit": {"store": stores["vit"]}},
                 queue_size=2, max_message_bytes=65536, progress_interval_s=0.0, executor_stall_s=1.0,
                 image_dirs=[str(images)], max_image_bytes=20_000, max_image_pixels=250_000)
    running = start_daemon(root, hooked=True)
    running.images = images
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def client(daemon):
    return daemon.client()


def _reference(store, task, inputs, params):
    with hermesd.load(store, prefetch=1) as engine:
        return run_task(engine, task, inputs, params)


def test_every_task_round_trips_and_equals_the_in_process_engine(daemon, client, daemon_stores):
    stores = daemon_stores
    generated = client.generate("llama", PROMPT, max_new_tokens=8)
    expected = _reference(stores["llama"], "generate", PROMPT, {"max_new_tokens": 8})
    assert generated["text"] == expected["text"] and generated["new_tokens"] == expected["new_tokens"] == 8
    assert generated["stats"]["passes"] == 8 and generated["stats"]["stages_run"] > 0

    embedded = client.embed("bert", ["w1 w2", "w3"], normalize=True)
    expected = _reference(stores["bert"], "embed", ["w1 w2", "w3"], {"normalize": True})
    torch.testing.assert_close(torch.tensor(embedded["embeddings"]), torch.tensor(expected["embeddings"]))

    classified = client.classify("cls", ["w9 w8"], top_k=2)
    assert [p["label"] for p in classified["labels"][0]] == \
        [p["label"] for p in _reference(stores["bert-cls"], "classify", ["w9 w8"], {"top_k": 2})["labels"][0]]

    forward = client.submit("forward", "bert", [[1, 2, 3]]).result(60)
    assert forward["outputs"]["last_hidden_state"]["shape"] == [1, 3, 64]


def test_progress_messages_arrive_before_the_result(client):
    job = client.submit("generate", "llama", PROMPT, {"max_new_tokens": 6}, progress=True)
    events = list(job.progress(timeout=60))
    assert events and events[-1]["tokens"] >= 1 and all(e["job_id"] == job.id for e in events)
    assert [e["tokens"] for e in events] == sorted(e["tokens"] for e in events)
    assert job.result(5)["new_tokens"] == 6


def _raw(endpoint: str, *payloads: bytes, timeout: float = 10.0) -> list[dict | None]:
    """Send raw frames from a fresh DEALER socket; one decoded reply per payload (None: no reply)."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    replies = []
    try:
        for payload in payloads:
            sock.send_multipart([b"", payload])
            replies.append(msgpack.unpackb(sock.recv_multipart()[-1]) if sock.poll(timeout * 1000) else None)
    finally:
        sock.close()
    return replies


def _nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth):
        value = [value]
    return value


def _submit(**fields) -> bytes:
    return msgpack.packb({"v": 1, "op": "submit", "rid": 7, **fields})


HOSTILE = [
    (b"\xc1\xc1 not msgpack", ErrorCode.BAD_REQUEST),
    (msgpack.packb([1, 2, 3]), ErrorCode.BAD_REQUEST),
    (msgpack.packb({"v": 1, "op": "ping", "x": _nested(40)}), ErrorCode.BAD_REQUEST),
    (msgpack.packb({"v": 99, "op": "ping"}), ErrorCode.UNSUPPORTED_VERSION),
    (msgpack.packb({"v": 1, "op": "rm -rf"}), ErrorCode.UNKNOWN_OP),
    (msgpack.packb({"v": 1, "op": "job"}), ErrorCode.BAD_REQUEST),
    (msgpack.packb({"v": 1, "op": "job", "job_id": "j-nope"}), ErrorCode.NOT_FOUND),
    (_submit(), ErrorCode.BAD_REQUEST),
    (_submit(task=5, model="llama", inputs="x"), ErrorCode.BAD_REQUEST),
    (_submit(task="dance", model="llama", inputs="x"), ErrorCode.UNKNOWN_TASK),
    (_submit(task="generate", model="gpt-9", inputs="x"), ErrorCode.UNKNOWN_MODEL),
    (_submit(task="generate", model="llama"), ErrorCode.BAD_REQUEST),
    (_submit(task="generate", model="llama", inputs={"a": 1}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params={"max_new_tokens": 10**9}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params={"max_new_tokens": 65}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params={"rm": True}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params="fast"), ErrorCode.BAD_REQUEST),
    (_submit(task="embed", model="bert", inputs=[]), ErrorCode.INVALID_PARAMS),
    (_submit(task="embed", model="bert", inputs="x", priority=99), ErrorCode.BAD_REQUEST),
    (_submit(task="embed", model="bert", inputs="x", deadline_s=-1), ErrorCode.BAD_REQUEST),
    (_submit(task="embed", model="bert", inputs="x", priority=True), ErrorCode.BAD_REQUEST),
    (_submit(task="forward", model="bert", inputs=[[1, -2]]), ErrorCode.INVALID_PARAMS),
    # strict types: true is not 1, 1.0 is not 1, keys are strings, op is a string
    (msgpack.packb({"v": True, "op": "ping"}), ErrorCode.UNSUPPORTED_VERSION),
    (msgpack.packb({"v": 1.0, "op": "ping"}), ErrorCode.UNSUPPORTED_VERSION),
    (msgpack.packb({"v": "1", "op": "ping"}), ErrorCode.UNSUPPORTED_VERSION),
    (msgpack.packb({"v": 1, "op": ["ping"]}), ErrorCode.UNKNOWN_OP),
    (msgpack.packb({"v": 1, "op": {"a": 1}}), ErrorCode.UNKNOWN_OP),
    (msgpack.packb({"v": 1, "op": None}), ErrorCode.UNKNOWN_OP),
    (msgpack.packb({"v": 1, "op": "ping", "rid": "r" * 10_000}), ErrorCode.BAD_REQUEST),
    (msgpack.packb({"v": 1, "op": "ping", "rid": True}), ErrorCode.BAD_REQUEST),
    (msgpack.packb({b"v": 1, b"op": b"ping"}, use_bin_type=True), ErrorCode.BAD_REQUEST),
    (msgpack.packb({"v": 1, "op": "ping", "x": {b"k": 1}}, use_bin_type=True), ErrorCode.BAD_REQUEST),
    (msgpack.packb({"v": 1, "op": "ping", "x": {1: 1}}), ErrorCode.BAD_REQUEST),
    (_submit(task="generate", model="llama", inputs="x", params={"max_new_tokens": True}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params={"max_new_tokens": 2.0}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params={"temperature": True}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params={"top_k": False}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params={"seed": True}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params={"stop": "abc"}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params={"stop": {"a": "b"}}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params={"stop": ["a", 1]}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", params={"chat": 1}), ErrorCode.INVALID_PARAMS),
    (_submit(task="generate", model="llama", inputs="x", priority=1.0), ErrorCode.BAD_REQUEST),
    (_submit(task="generate", model="llama", inputs="x", progress=1), ErrorCode.BAD_REQUEST),
    (_submit(task="embed", model="bert", inputs="x", deadline_s=True), ErrorCode.BAD_REQUEST),
    (_submit(task="classify", model="cls", inputs="x", params={"top_k": True}), ErrorCode.INVALID_PARAMS),
    (_submit(task="forward", model="bert", inputs=[[1, True]]), ErrorCode.INVALID_PARAMS),
    (_submit(task="forward", model="bert", inputs=[[1, 2.0]]), ErrorCode.INVALID_PARAMS),
]


def test_hostile_input_gets_error_replies_and_the_daemon_keeps_serving(daemon, client):
    before = client.status()["jobs"]
    replies = _raw(daemon.endpoint, *(payload for payload, _ in HOSTILE))
    for (payload, code), reply in zip(HOSTILE, replies):
        assert reply is not None and reply["type"] == "error", payload
        assert reply["code"] == code.value, (payload, reply)
        assert reply["message"]
    assert replies[-1]["rid"] == 7  # the request id is echoed even on errors
    assert "request failed" not in daemon.log() and "Traceback" not in daemon.log()
    # Oversize: ZeroMQ's MAXMSGSIZE drops the connection before the daemon sees the message.
    assert _raw(daemon.endpoint, msgpack.packb({"v": 1, "op": "ping", "pad": "x" * 200_000}), timeout=2) == [None]
    status = client.status()
    assert status["state"] == "ready" and status["jobs"] == before  # nothing refused was journaled
    assert client.ping()["type"] == "pong"


def test_client_side_errors_are_typed(client):
    with pytest.raises(ServerError) as info:
        client.submit("generate", "nope", "x")
    assert info.value.code == "unknown_model"
    before = client.status()["jobs"]
    with pytest.raises(ServerError) as info:  # a task the model cannot run: refused at submit, not journaled
        client.submit("generate", "cls", "w1")
    assert info.value.code == "invalid_params" and "not a causal language model" in info.value.message
    assert client.status()["jobs"] == before
    with pytest.raises(JobFailed) as info:  # passes validation, fails when the model runs it
        client.embed("bert", " ".join(f"w{i}" for i in range(40)))
    assert info.value.code == "invalid_params"


def test_full_queue_answers_busy_and_cancel_takes_queued_jobs_out(client):
    blocker = client.submit("embed", "bert", hang_input(3))
    wait_for_state(client, blocker.id, "running")
    queued = [client.submit("embed", "bert", "w2"), client.submit("embed", "bert", "w3")]
    with pytest.raises(TryLater) as info:
        client.submit("embed", "bert", "w4")
    assert info.value.code == ErrorCode.BUSY.value
    assert client.cancel(queued[1].id) is True
    with pytest.raises(JobCancelled):
        queued[1].result(30)
    assert queued[0].result(60)["dimensions"] == 64
    assert blocker.result(60)["dimensions"] == 64
    assert client.cancel(blocker.id) is False  # already ended


def test_priority_runs_first(client):
    blocker = client.submit("embed", "bert", hang_input(2))
    wait_for_state(client, blocker.id, "running")
    low = client.submit("embed", "bert", "w2", priority=0)
    high = client.submit("embed", "bert", "w3", priority=9)
    low.result(60), high.result(60)
    assert client.job(high.id)["started"] < client.job(low.id)["started"]


def test_cancel_mid_job_ends_it_between_stages_and_the_executor_moves_on(client):
    job = client.submit("generate", "llama", PROMPT, {"max_new_tokens": 64}, progress=True)
    for event in job.progress(timeout=60):
        if event["tokens"] >= 2:
            assert job.cancel() is True
            break
    with pytest.raises(JobCancelled):
        job.result(60)
    record = client.job(job.id)
    assert record["state"] == "cancelled"
    assert client.generate("llama", PROMPT, max_new_tokens=3)["new_tokens"] == 3


def test_inputs_longer_than_the_plan_allows_fail_the_job(daemon, client):
    with pytest.raises(JobFailed) as info:
        client.embed("bert", " ".join(f"w{i}" for i in range(40)))  # the bert model allows 32 tokens
    assert info.value.code == "invalid_params" and "limit of 32 tokens" in info.value.message
    for task, model in (("embed", "llama"), ("generate", "llama"), ("forward", "bert")):  # found by the fuzz test
        with pytest.raises(JobFailed) as info:  # spaces only: no tokens; the model used to crash on it
            client.submit(task, model, "   ").result(60)
        assert info.value.code == "invalid_params" and "makes no tokens" in info.value.message
    assert "Traceback" not in daemon.log()


def test_deadline_passes_while_queued(client):
    blocker = client.submit("embed", "bert", hang_input(2))
    wait_for_state(client, blocker.id, "running")
    late = client.submit("embed", "bert", "w2", deadline_s=0.5)
    with pytest.raises(JobFailed) as info:
        late.result(60)
    assert info.value.code == ErrorCode.DEADLINE_EXCEEDED.value


def test_a_member_past_its_deadline_leaves_a_merged_batch_without_running(client):
    # Queued together, the two embed jobs share one sweep. The expired one must end before anything runs
    # for it: its input would wedge the executor hook for 30 s (as a job wedged before a restart would).
    blocker = client.submit("embed", "bert", hang_input(2))
    wait_for_state(client, blocker.id, "running")
    expired = client.submit("embed", "bert", [hang_input(30)], deadline_s=0.5)
    live = client.submit("embed", "bert", "w2")
    started = time.monotonic()
    assert live.result(60)["dimensions"] == 64
    assert time.monotonic() - started < 20, "the expired member's hook ran"
    with pytest.raises(JobFailed) as info:
        expired.result(10)
    assert info.value.code == ErrorCode.DEADLINE_EXCEEDED.value


def test_result_outlives_the_client_and_resubmits_are_deduplicated(daemon):
    first = daemon.client()
    job = first.submit("embed", "bert", "w7", client_job_id="sensor-42/reading-1")
    first.close()  # the submitter goes away before the result exists
    second = daemon.client()
    again = second.submit("embed", "bert", "w7", client_job_id="sensor-42/reading-1")
    assert again.id == job.id
    result = again.result(60)
    assert second.job(job.id)["result"] == result
    assert second.status()["jobs"].get("done", 0) >= 1


def test_protocol_limits_are_checked_before_decoding_the_whole_message():
    with pytest.raises(protocol.DecodeError) as info:
        protocol.unpack(b"\x00" * 100, max_bytes=10)
    assert info.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(protocol.DecodeError):
        protocol.unpack(msgpack.packb({"a": list(range(protocol.MAX_ITEMS + 1))}))
    assert protocol.unpack(protocol.pack({"op": "ping"})) == {"v": protocol.PROTOCOL_VERSION, "op": "ping"}
    with pytest.raises(protocol.DecodeError, match="keys must be strings"):
        protocol.unpack(msgpack.packb({"v": 1, "op": "ping", "deep": [{b"k": 1}]}, use_bin_type=True))


COSTLY = [  # (submit fields, the limit or rule the error must name)
    (dict(task="forward", model="llama", inputs=[[1, 5000]]), "vocabulary (0..4999)"),
    (dict(task="forward", model="llama", inputs=[[2**63]]), "vocabulary"),
    (dict(task="forward", model="llama", inputs=[[2**64 - 1, 1]]), "vocabulary"),
    (dict(task="forward", model="llama", inputs=[[1, 2], [3]]), "same length"),
    (dict(task="forward", model="bert", inputs=[[1] * 33]), "max_prompt_tokens"),
    (dict(task="forward", model="llama", inputs=[[1] * 300] * 4), "max_forward_output_bytes"),
    (dict(task="forward", model="llama", inputs=["w1 " * 100]), "max_forward_output_bytes"),
    (dict(task="generate", model="llama", inputs="x", params={"stop": ["s"] * 17}), "max_stop_strings"),
    (dict(task="generate", model="llama", inputs="x", params={"stop": ["s" * 65]}), "max_stop_chars"),
]


def test_costs_are_refused_before_queueing_with_the_limit_named(daemon, client):
    before = client.status()["jobs"]
    replies = _raw(daemon.endpoint, *(_submit(**fields) for fields, _ in COSTLY))
    for (fields, named), reply in zip(COSTLY, replies):
        assert reply["type"] == "error" and reply["code"] == "invalid_params", (fields, reply)
        assert named in reply["message"], (fields, reply)
    assert client.status()["jobs"] == before  # nothing was journaled
    # just under the limits: accepted and run
    fine = client.submit("forward", "llama", [[1, 4999]]).result(60)
    assert fine["outputs"]["logits"]["shape"] == [1, 2, 5000]
    at_limit = client.submit("generate", "llama", PROMPT, {"max_new_tokens": 2, "stop": ["s" * 64] * 16})
    assert at_limit.result(60)["new_tokens"] == 2


def test_stop_strings_end_generation_on_a_word_level_vocabulary(client):
    # transformers' own stop_strings failed here ("substring not found"): this vocabulary is not byte-level
    full = client.generate("llama", PROMPT, max_new_tokens=12)
    stop = full["text"].split()[4]
    cut = client.generate("llama", PROMPT, max_new_tokens=12, stop=[stop, "never there"])
    assert cut["text"] == full["text"][: full["text"].find(stop)]
    assert cut["finish_reason"] == "stop" and cut["new_tokens"] <= 5 < full["new_tokens"]


def test_status_reports_a_stalled_executor_while_a_step_hangs(client):
    job = client.submit("embed", "bert", hang_input(3))
    wait_for_state(client, job.id, "running")
    deadline = time.monotonic() + 2.5
    while client.status()["executor"]["healthy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    stalled = client.status()["executor"]
    assert stalled["healthy"] is False and stalled["since_progress_s"] >= 1.0  # executor_stall_s
    job.result(60)
    assert client.status()["executor"]["healthy"] is True


def _raw_frames(endpoint: str, frames: list[bytes], timeout: float = 10.0) -> list[bytes] | None:
    """Send one multipart message from a fresh DEALER; the reply's frames, or None."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        return sock.recv_multipart() if sock.poll(timeout * 1000) else None
    finally:
        sock.close()


def test_frames_past_the_envelope_and_payload_or_the_byte_limit_are_dropped_with_an_error(daemon, client):
    ping = msgpack.packb({"v": 1, "op": "ping", "rid": 1})
    extra = _raw_frames(daemon.endpoint, [b"", ping, b"one frame too many"])
    assert extra[0] == b"" and len(extra) == 2  # the reply goes back to the envelope, nothing echoed
    error = msgpack.unpackb(extra[-1])
    assert error["code"] == "too_large" and "max_message_frames" in error["message"] and "4 frames" in error["message"]
    # 60 frames of 60 KB: each is under MAXMSGSIZE (64 KiB here), the message is not
    flood = _raw_frames(daemon.endpoint, [b""] + [b"x" * 60_000] * 59 + [ping])
    assert len(flood) == 2 and msgpack.unpackb(flood[-1])["code"] == "too_large"
    # two frames under the frame count but over the byte limit together
    big = _raw_frames(daemon.endpoint, [b"y" * 40_000, msgpack.packb({"v": 1, "op": "ping", "p": "z" * 40_000})])
    error = msgpack.unpackb(big[-1])
    assert error["code"] == "too_large" and "max_message_bytes" in error["message"]
    assert _raw_frames(daemon.endpoint, [b"", ping]) is not None  # a well-formed request still works
    assert client.ping()["type"] == "pong"


def _png(size: tuple[int, int], noise: bool = False) -> bytes:
    import io

    from PIL import Image

    image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise else Image.new("RGB", size, "red")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_classify_takes_image_bytes_within_the_byte_and_pixel_limits(daemon, client):
    assert client.classify("vit", [_png((40, 40))], top_k=1)["labels"][0][0]["label"] in {"cat", "dog", "bird"}
    before = client.status()["jobs"]
    for inputs, named in (([_png((600, 600))], "max_image_pixels"), ([_png((100, 100), noise=True)], "max_image_bytes"),
                          ([_png((8, 8)), b"GIF89a but not really"], "image 1: not an image")):
        with pytest.raises(ServerError) as info:  # refused at submit: the header is read, nothing decoded
            client.submit("classify", "vit", inputs)
        assert info.value.code == "invalid_params" and named in info.value.message, info.value.message
    with pytest.raises(ServerError) as info:
        client.submit("classify", "cls", [_png((8, 8))])
    assert info.value.code == "invalid_params" and "inputs must be strings" in info.value.message
    assert client.status()["jobs"] == before


def test_classify_reads_files_only_under_image_dirs_and_refuses_the_rest_alike(daemon, client, tmp_path):
    images = daemon.images
    good = images / "red.png"
    good.write_bytes(_png((40, 40)))
    os.mkfifo(images / "fifo.png")  # opened for reading with blocking I/O, this would hold the executor
    (images / "link.png").symlink_to(good)
    (images / "notes.png").write_text("not an image")
    (images / "etc").symlink_to("/etc")
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png((40, 40)))
    messages = set()
    for name in ("fifo.png", "link.png", "missing.png", "notes.png"):  # allowed place, refused when read
        with pytest.raises(JobFailed) as info:  # a TimeoutError if the executor blocked on it
            client.classify("vit", [str(good), str(images / name)], timeout=15)
        assert info.value.code == "invalid_params", (name, info.value.message)
        messages.add(info.value.message)
    for path in ("/dev/zero", "/etc/passwd", outside, images / "etc" / "passwd", f"{images}/../{tmp_path.name}/x"):
        with pytest.raises(ServerError) as info:  # outside image_dirs: refused at submit
            client.submit("classify", "vit", [str(good), str(path)])
        assert info.value.code == "invalid_params", (path, info.value.message)
        messages.add(info.value.message)
    assert len(messages) == 1 and next(iter(messages)).startswith("image 1: not allowed or not readable")
    assert client.classify("vit", [str(good)], top_k=1)["labels"][0][0]["label"] in {"cat", "dog", "bird"}
