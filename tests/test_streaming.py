"""Streamed text (issue 13 part 5): TextStream on real tokenizers, then a real daemon with SmolLM2 through
``hermes_client``, the ``hermes`` command on a terminal, and the gateway's Ollama NDJSON and OpenAI SSE."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time

import ollama
import openai
import pytest
from daemon_support import CHILD_PATH, start_daemon, write_config
from gateway_support import start_gateway
from hermes_client import Client
from hermes_client.textchunks import TextChunks
from pty_support import read_terminal
from transformers import AutoTokenizer

from hermesd.textstream import TextStream

pytestmark = pytest.mark.slow
STORY = "Write a short story about a lighthouse keeper."
MIXED = "Café naïve — 你好世界 🎉🇫🇷👩‍👩‍👧 déjà vu. Ünïcödé ✓ «ok» ñ 😀 the end"


def _pieces(tokenizer, ids, stops=()):
    stream = TextStream(tokenizer, stops)
    return [stream.push(i) for i in ids] + [stream.flush()]


@pytest.mark.parametrize("model", ["smollm2", "minilm"])
def test_pieces_are_whole_characters_and_add_up_to_decode(model, request):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(model)[1])
    ids = tokenizer(MIXED, add_special_tokens=False).input_ids
    pieces = _pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p and p.encode("utf-8") for p in pieces if p), pieces
    assert sum(1 for p in pieces if p) > 5, "text comes out as it goes, not at the end"
    if model == "smollm2":  # byte-level BPE: the emoji span several tokens, yet no piece splits them
        assert len(ids) > len(MIXED.split()) + 10 and "🎉" in "".join(pieces)


def test_nothing_past_a_stop_string_is_ever_released(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2[1])
    ids = tokenizer(MIXED, add_special_tokens=False).input_ids
    for stop in ("vu.", "🇫🇷", "the end", "not there"):
        stream, released = TextStream(tokenizer, (stop, "Zz")), ""
        for token in ids:
            released += stream.push(token)
            assert stop not in released and not any(released.endswith(stop[:n]) for n in range(1, len(stop))) \
                or stop == "not there", (stop, released)
        released += stream.flush()
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert released == full.split(stop)[0]


def test_a_lost_progress_message_never_garbles_the_text():
    """A gap in text_offset (a dropped message) stops the pieces until the end, which fills in the rest;
    a repeated message adds nothing."""
    chunks = TextChunks()
    taken = [chunks.take({"text": "Hel", "text_offset": 0}), chunks.take({"text": "Hel", "text_offset": 0}),
             chunks.take({"text": "lo", "text_offset": 3}), chunks.take({"text": "rld", "text_offset": 7}),
             chunks.take({"text": "!", "text_offset": 10}), chunks.rest("Hello world!")]
    assert taken == ["Hel", "", "lo", "", "", " world!"] and chunks.broken
    assert "".join(taken) == "Hello world!"


NEW = 24  # tokens per generation: enough for several progress messages, short enough for the suite


@pytest.fixture(scope="module")
def daemon(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-daemon")
    write_config(root, {"smollm2": {"store": smollm2[1], "max_new_tokens": 64}}, progress_interval_s=0.0)
    running = start_daemon(root)
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def reference(daemon) -> str:
    """STORY's greedy answer, unstreamed: every streamed way of asking must add up to exactly this."""
    with Client(daemon.endpoint) as client:
        result = client.generate("smollm2", STORY, timeout=120, max_new_tokens=NEW)
    assert result["new_tokens"] == NEW and len(result["text"].split()) > 8
    return result["text"]


def test_streamed_pieces_equal_the_final_text(daemon, reference):
    with Client(daemon.endpoint) as client:
        job = client.submit("generate", "smollm2", STORY, {"max_new_tokens": NEW}, progress=True)
        pieces = []
        for event in job.progress(120):
            assert event["text_offset"] == sum(map(len, pieces)), "contiguous: no gap, no overlap"
            pieces.append(event["text"])
        assert "".join(pieces) == job.result(0)["text"] == reference
        assert sum(1 for p in pieces if p) > 5


def test_no_piece_reaches_past_a_stop_string(daemon, reference):
    words = reference.split()
    stop = max(words[len(words) // 2:], key=len)  # a word from the second half of the answer
    assert reference.index(stop) > 10
    with Client(daemon.endpoint) as client:
        pieces = list(client.generate_stream("smollm2", STORY, timeout=120, max_new_tokens=NEW, stop=[stop]))
    assert "".join(pieces) == reference[:reference.index(stop)]
    assert not any(stop in p for p in pieces), pieces


def test_hermes_generate_prints_text_as_it_arrives_on_a_terminal(daemon, reference):
    master, slave = pty.openpty()
    command = [sys.executable, "-m", "hermes_client.cli", "--endpoint", daemon.endpoint, "generate",
               "--model", "smollm2", "--max-new-tokens", str(NEW), STORY]
    proc = subprocess.Popen(command, stdout=slave, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": CHILD_PATH})
    os.close(slave)
    arrivals: list[float] = []
    output = read_terminal(master, 60, lambda data: arrivals.append(time.monotonic()))
    first_text_at = arrivals[0]
    assert proc.wait(30) == 0, proc.stderr.read()
    assert time.monotonic() - first_text_at > 0.5, "text came while the job was still generating"
    assert output.decode().replace("\r\n", "\n") == reference + "\n"


def test_hermes_generate_json_prints_only_the_final_document(daemon):
    done = subprocess.run([sys.executable, "-m", "hermes_client.cli", "--endpoint", daemon.endpoint, "generate",
                           "--model", "smollm2", "--max-new-tokens", "3", "--stream", "--json", STORY],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": CHILD_PATH})
    assert json.loads(done.stdout)["result"]["new_tokens"] == 3  # one JSON document and nothing else


def test_gateway_streams_ollama_and_openai_in_many_chunks(daemon, reference, tmp_path):
    gateway = start_gateway(tmp_path / "gateway", daemon.endpoint)
    try:
        parts = list(ollama.Client(host=gateway.url).generate(model="smollm2", prompt=STORY, stream=True,
                                                              options={"num_predict": NEW}))
        assert sum(1 for p in parts if p.response) > 5 and parts[-1].done
        assert "".join(p.response for p in parts) == reference
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused-on-loopback", max_retries=0)
        chunks = list(client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": STORY}],
                                                     max_tokens=NEW, stream=True))
        contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(contents) > 5 and chunks[-1].choices[0].finish_reason == "length"
        assert "".join(contents) == reference
    finally:
        assert gateway.stop() == 0, gateway.log()
