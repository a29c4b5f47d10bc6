"""The HTTP gateway against a real daemon with the bundled models, through clients no one here wrote:
the official ``ollama`` and ``openai`` Python packages, and plain HTTP (httpx) for statuses and bodies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import ollama
import openai
import pytest
from daemon_support import start_daemon, wait_for_state, write_config
from gateway_support import start_gateway
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def daemon(smollm2, minilm, tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway-daemon")
    write_config(root, {"smollm2": {"store": smollm2[1], "memory_budget": "800MiB", "max_new_tokens": 64},
                        "minilm": {"store": minilm[1], "prefetch": 2}}, queue_size=1)
    running = start_daemon(root)
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def gateway(daemon, tmp_path_factory):
    running = start_gateway(tmp_path_factory.mktemp("gateway"), daemon.endpoint)
    yield running
    assert running.stop() == 0, running.log()


def _hermes(daemon, *args):
    done = subprocess.run([sys.executable, "-m", "hermes_client.cli", "--endpoint", daemon.endpoint, *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_ollama_package_lists_generates_chats_and_embeds(daemon, gateway):
    client = ollama.Client(host=gateway.url)
    assert {m.model for m in client.list().models} == {"smollm2:latest", "minilm:latest"}
    options = {"num_predict": 16}
    answer = client.generate(model="smollm2", prompt=QUESTION, options=options)
    assert "Paris" in answer.response and answer.done and answer.eval_count > 0
    streamed = list(client.generate(model="smollm2:latest", prompt=QUESTION, options=options, stream=True))
    assert "Paris" in "".join(part.response for part in streamed) and streamed[-1].done
    chat = client.chat(model="smollm2", messages=[{"role": "user", "content": QUESTION}], options=options)
    assert "Paris" in chat.message.content and chat.message.role == "assistant"
    parts = list(client.chat(model="smollm2", messages=[{"role": "user", "content": QUESTION}], options=options,
                             stream=True))
    assert "Paris" in "".join(part.message.content for part in parts) and parts[-1].done

    texts = ["A man is eating food.", "The stock market fell today."]
    expected = json.loads(_hermes(daemon, "--json", "embed", "--model", "minilm", "--normalize", *texts))
    vectors = client.embed(model="minilm", input=texts).embeddings
    _same_vectors(vectors, expected["result"]["embeddings"])


def test_openai_package_chats_and_embeds(daemon, gateway):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused-on-loopback", max_retries=0)
    assert {m.id for m in client.models.list()} == {"smollm2", "minilm"}
    messages = [{"role": "user", "content": QUESTION}]
    completion = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16)
    assert "Paris" in completion.choices[0].message.content and completion.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, stream=True))
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    texts = ["first text", "second text"]
    expected = json.loads(_hermes(daemon, "--json", "embed", "--model", "minilm", "--normalize", *texts))
    embedded = client.embeddings.create(model="minilm", input=texts)  # the package asks for base64
    _same_vectors([d.embedding for d in embedded.data], expected["result"]["embeddings"])


def _same_vectors(got, expected):
    assert len(got) == len(expected) and len(got[0]) == 384
    for row, reference in zip(got, expected):
        assert list(row) == pytest.approx(reference, abs=1e-6)
