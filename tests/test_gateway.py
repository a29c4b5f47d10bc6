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
from daemon_support import CHILD_PATH, start_daemon, wait_for_state, write_config
from gateway_support import start_gateway
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def daemon(smollm2, minilm, tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway-daemon")
    write_config(root, {"smollm2": {"store": smollm2[1], "max_new_tokens": 64},  # auto budget: resident here
                        "minilm": {"store": minilm[1], "prefetch": 2, "keep_alive": "2s"}}, queue_size=1)
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
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": CHILD_PATH})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_ollama_package_lists_generates_chats_and_embeds(daemon, gateway):
    client = ollama.Client(host=gateway.url)
    assert {m.model for m in client.list().models} == {"smollm2:latest", "minilm:latest"}
    options = {"num_predict": 12}
    answer = client.generate(model="smollm2", prompt=QUESTION, options=options)
    assert "Paris" in answer.response and answer.done and answer.eval_count > 0
    streamed = list(client.generate(model="smollm2:latest", prompt=QUESTION, options=options, stream=True))
    assert "Paris" in "".join(part.response for part in streamed) and streamed[-1].done
    chat = client.chat(model="smollm2", messages=[{"role": "user", "content": QUESTION}], options=options)
    assert "Paris" in chat.message.content and chat.message.role == "assistant"
    parts = list(client.chat(model="smollm2", messages=[{"role": "user", "content": QUESTION}], options=options,
                             stream=True))
    assert "Paris" in "".join(part.message.content for part in parts) and parts[-1].done

    with pytest.raises(ollama.ResponseError, match="longer than"):  # fails after the stream began: in the stream
        list(client.generate(model="smollm2", prompt="word " * 2000, stream=True))

    texts = ["A man is eating food.", "The stock market fell today."]
    expected = json.loads(_hermes(daemon, "--json", "embed", "--model", "minilm", "--normalize", *texts))
    vectors = client.embed(model="minilm", input=texts).embeddings
    _same_vectors(vectors, expected["result"]["embeddings"])


def test_openai_package_chats_and_embeds(daemon, gateway):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused-on-loopback", max_retries=0)
    assert {m.id for m in client.models.list()} == {"smollm2", "minilm"}
    messages = [{"role": "user", "content": QUESTION}]
    completion = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12)
    assert "Paris" in completion.choices[0].message.content and completion.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, stream=True))
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


def test_errors_map_to_http_statuses_with_each_apis_body(daemon, gateway):
    http = httpx.Client(base_url=gateway.url, timeout=60)
    cases = [  # (method, path, body, status, hermesd code)
        ("POST", "/api/generate", {"model": "nope", "prompt": "hi"}, 404, "unknown_model"),
        ("POST", "/api/generate", {"model": "smollm2", "prompt": "hi", "options": {"temperature": "hot"}}, 400,
         "invalid_params"),
        ("POST", "/api/generate", {"model": "smollm2", "prompt": "hi", "options": {"num_predict": 100000}}, 400,
         "invalid_params"),
        ("POST", "/api/generate", {"model": "minilm", "prompt": "hi"}, 400, "unsupported"),
        ("POST", "/api/generate", {"model": "smollm2", "prompt": 3}, 400, "bad_request"),
        ("POST", "/api/chat", {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                               "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported"),
        ("POST", "/api/chat", {"model": "smollm2", "messages": []}, 400, "bad_request"),
        ("POST", "/api/embed", {"model": "minilm", "input": []}, 400, "bad_request"),
        ("POST", "/api/embed", {"model": "nope", "input": "x"}, 404, "unknown_model"),
        ("POST", "/api/embeddings", {"model": "minilm"}, 400, "bad_request"),
        ("POST", "/api/show", {"model": "nope"}, 404, "unknown_model"),
        ("POST", "/api/pull", {"model": "llama3"}, 501, "not_implemented"),
        ("GET", "/api/nothing", None, 404, "not_found"),
        ("GET", "/api/generate", None, 405, "bad_request"),
        ("POST", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404,
         "unknown_model"),
        ("POST", "/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 0}, 400, "invalid_params"),
        ("POST", "/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                                          "n": 2}, 400, "bad_request"),
        ("POST", "/v1/completions", {"model": "smollm2", "prompt": ""}, 400, "bad_request"),
        ("POST", "/v1/embeddings", {"model": "minilm", "input": [[1, 2]]}, 400, "bad_request"),
        ("POST", "/v1/embeddings", {"model": "minilm", "input": "x", "encoding_format": "hex"}, 400, "bad_request"),
    ]
    for method, path, body, status, code in cases:
        response = http.request(method, path, json=body)
        assert response.status_code == status, (path, body, response.text)
        error = response.json()["error"]
        if path.startswith("/v1/"):
            assert error["code"] == code and error["message"], (path, error)
        else:
            assert isinstance(error, str) and error and response.json()["code"] == code, (path, response.text)
    bad_json = http.post("/api/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "not JSON" in bad_json.json()["error"]
    assert "hermesd convert" in http.post("/api/pull", json={"model": "llama3"}).json()["error"]

    assert http.get("/api/version").json()["version"].startswith("0.")
    ps = http.get("/api/ps").json()["models"]
    assert {m["name"] for m in ps} == {"smollm2:latest", "minilm:latest"} and all(m["size"] > 0 for m in ps)
    shown = http.post("/api/show", json={"model": "minilm"}).json()
    assert shown["capabilities"] == ["embedding"] and shown["model_info"]["general.architecture"] == "BertModel"
    legacy = http.post("/api/embeddings", json={"model": "minilm", "prompt": "hello"}).json()["embedding"]
    assert len(legacy) == 384
    text = http.post("/v1/completions", json={"model": "smollm2", "prompt": "The capital of France is",
                                              "max_tokens": 4}).json()
    assert text["object"] == "text_completion" and text["choices"][0]["text"]


def test_busy_daemon_is_503_with_retry_after_and_a_missing_daemon_too(daemon, gateway, tmp_path):
    client = daemon.client()
    running = client.submit("generate", "smollm2", "Tell me a long story about a dragon.", {"max_new_tokens": 64})
    jobs = [running]
    try:
        wait_for_state(client, running.id, "running")  # the queue (size 1) is empty again
        jobs.append(client.submit("generate", "smollm2", "And another one.", {"max_new_tokens": 64}))
        busy = httpx.post(f"{gateway.url}/api/generate", json={"model": "smollm2", "prompt": "hi"}, timeout=60)
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "5" and busy.json()["code"] == "busy"
    finally:
        for job in reversed(jobs):
            job.cancel()
        for job in jobs:
            wait_for_state(client, job.id, "cancelled")
    orphan = start_gateway(tmp_path, f"ipc://{tmp_path}/no-daemon.sock")
    try:
        down = httpx.post(f"{orphan.url}/v1/chat/completions", json={"model": "smollm2", "messages": []}, timeout=30)
        assert down.status_code == 503 and down.headers["Retry-After"] and down.json()["error"]["code"] == "unreachable"
        metrics = httpx.get(f"{orphan.url}/metrics", timeout=30)
        assert metrics.status_code == 200 and "hermesd_up 0" in metrics.text
    finally:
        assert orphan.stop() == 0


def test_a_client_that_disconnects_cancels_its_job(daemon, gateway):
    client = daemon.client()
    assert client.status()["current_job"] is None and client.status()["queued"] == 0
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "smollm2", "prompt": "Tell me a long story about a dragon.",
                       "options": {"num_predict": 64}}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        while (current := client.status()["current_job"]) is None:
            assert time.monotonic() < deadline, "the gateway's job never started"
            time.sleep(0.05)
    record = wait_for_state(client, current["id"], "cancelled", timeout=60)
    assert record["cancel_requested"] is not None


def test_metrics_parse_and_move_with_a_job(daemon, gateway):
    def scrape() -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{gateway.url}/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    jobs_key = ("hermesd_jobs_total", (("model", "minilm"), ("outcome", "done"), ("task", "embed")))
    before = scrape()
    assert before[("hermesd_up", ())] == 1 and ("hermesd_rss_bytes", ()) in before
    assert ("hermesd_watchdog_level", (("watchdog", "thermal"),)) in before
    ollama.Client(host=gateway.url).embed(model="minilm", input="one more")
    after = scrape()
    assert after[jobs_key] == before.get(jobs_key, 0) + 1
    count = ("hermesd_job_latency_seconds_count", (("task", "embed"),))
    assert after[count] == before.get(count, 0) + 1
    read = ("hermesd_stage_bytes_read_total", (("model", "minilm"),))
    assert after[read] >= before.get(read, 0)
    route = ("hermesd_gateway_requests_total", (("route", "/api/embed"), ("status", "200")))
    assert after[route] == before.get(route, 0) + 1

    textfile = _hermes(daemon, "status", "--prometheus")
    names = {family.name for family in text_string_to_metric_families(textfile)}
    assert {"hermesd_queue_depth", "hermesd_jobs", "hermesd_job_latency_seconds", "hermesd_watchdog_transitions",
            "hermesd_tokens_generated"} <= names


def test_bearer_token_and_exposure_rules(daemon, tmp_path):
    token = "s3cret-token-for-tests"
    guarded = start_gateway(tmp_path, daemon.endpoint, env={"HERMESD_GATEWAY_TOKEN": token})
    try:
        assert httpx.get(f"{guarded.url}/api/version", timeout=30).status_code == 401
        wrong = httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        good = httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert good.status_code == 200
    finally:
        assert guarded.stop() == 0
    check = [sys.executable, "-m", "hermesd.cli", "gateway", "--check", "--host", "0.0.0.0"]
    env = {**os.environ, "HERMESD_GATEWAY_CONFIG": "", "PYTHONPATH": CHILD_PATH}
    refused = subprocess.run(check, capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 78 and "token" in refused.stderr
    allowed = subprocess.run(check, capture_output=True, text=True, timeout=60,
                             env={**env, "HERMESD_GATEWAY_ALLOW_UNAUTHENTICATED_REMOTE": "true"})
    assert allowed.returncode == 0, allowed.stderr


def test_hermes_generate_reads_the_prompt_from_stdin(daemon):
    done = subprocess.run([sys.executable, "-m", "hermes_client.cli", "--endpoint", daemon.endpoint, "--json",
                           "generate", "--model", "smollm2", "--max-new-tokens", "12", "-"], input=QUESTION,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": CHILD_PATH})
    assert done.returncode == 0, done.stderr
    assert "Paris" in json.loads(done.stdout)["result"]["text"]


def test_an_idle_model_is_released_and_reopens_identically(daemon, gateway):
    client = daemon.client()
    first = client.embed("minilm", ["kept alive for two seconds"])["embeddings"]
    loaded_rss = client.status()["memory"]["rss_bytes"]
    deadline = time.monotonic() + 30
    while next(m for m in client.models() if m["name"] == "minilm")["loaded"]:
        assert time.monotonic() < deadline, "minilm was never released"
        time.sleep(0.2)
    released_rss = client.status()["memory"]["rss_bytes"]
    print(f"RSS with minilm loaded {loaded_rss / 2**20:.1f} MiB, released {released_rss / 2**20:.1f} MiB")
    assert released_rss < loaded_rss - (4 << 20)
    assert [m["name"] for m in httpx.get(f"{gateway.url}/api/ps", timeout=30).json()["models"]] == ["smollm2:latest"]
    assert client.embed("minilm", ["kept alive for two seconds"])["embeddings"] == first  # reopened, same answer

    assert "smollm2: released" in _hermes(daemon, "unload", "smollm2")  # keep_alive -1: only on request
    assert "smollm2" not in _hermes(daemon, "ps")
    answer = ollama.Client(host=gateway.url).generate(model="smollm2", prompt=QUESTION, options={"num_predict": 12})
    assert "Paris" in answer.response and "smollm2:" in _hermes(daemon, "ps")
