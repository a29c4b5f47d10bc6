"""Jobs sharing weight sweeps in a real daemon: one-pass batching (MiniLM embed) and continuous batching
of generate (SmolLM2, fp32), each job's result compared with the same job run alone."""

from __future__ import annotations

import signal
import time

import pytest
from daemon_support import start_daemon, wait_for_state, write_config
from hermes_client import JobCancelled, ServerError

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Count from one to ten:",
           "Name three colours."]
TOKENS = [10, 6, 12, 8]  # different lengths: members leave the batch at different steps
SENTENCES = ["A man is eating food.", "A man is eating pasta.", "The stock market fell today.",
             "Two dogs play in the snow.", "Quantum computers use qubits.", "hello"]
MAX_BATCH = 3


def _config(root, smollm2, minilm):
    (root / "temp").write_text("45000\n")  # a thermal source the watchdog test writes (millidegrees)
    write_config(root, {"smollm2": {"store": smollm2[1], "memory_budget": "800MiB", "max_new_tokens": 64,
                                    "max_prompt_tokens": 128, "max_batch": MAX_BATCH},
                        "minilm": {"store": minilm[1], "prefetch": 2}},
                 thermal={"paths": [str(root / "temp")], "soft_c": 75.0, "hard_c": 82.0, "critical_c": 90.0,
                          "hysteresis_c": 5.0})


@pytest.fixture(scope="module")
def daemon(smollm2, minilm, tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    _config(root, smollm2, minilm)
    running = start_daemon(root)
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def solo(daemon):
    """Each prompt run alone (nothing else queued): the reference for every batched run."""
    client = daemon.client(timeout=120)
    results = {}
    for prompt, tokens in zip(PROMPTS, TOKENS):
        result = client.generate("smollm2", prompt, max_new_tokens=tokens, timeout=300)
        assert result["stats"]["batch"] == 1
        results[prompt] = result
    return results


def _blocker(client):
    """A generate job holding the executor so that the next submits queue up together."""
    job = client.submit("generate", "smollm2", "Tell me about lighthouses.", {"max_new_tokens": 3}, progress=True)
    next(iter(job.progress(timeout=120)))
    return job


def _same(result, reference):
    assert (result["text"], result["new_tokens"], result["finish_reason"]) == (
        reference["text"], reference["new_tokens"], reference["finish_reason"])


def test_embed_jobs_queued_together_share_one_sweep_and_equal_solo_results(daemon):
    client = daemon.client(timeout=120)
    alone = [client.embed("minilm", text)["embeddings"][0] for text in SENTENCES]
    blocker = _blocker(client)
    jobs = [client.submit("embed", "minilm", text) for text in SENTENCES]
    blocker.result(120)
    results = [job.result(120) for job in jobs]
    assert max(r["stats"]["batch"] for r in results) > 1  # they did share sweeps
    for result, reference in zip(results, alone):
        assert result["embeddings"][0] == pytest.approx(reference, abs=1e-5)
    merged = client.embed("minilm", SENTENCES[:2])  # a job of two inputs still gets exactly its two rows
    assert len(merged["embeddings"]) == 2


def test_greedy_generate_batched_is_token_identical_to_solo_with_joins_and_leaves(daemon, solo):
    client = daemon.client(timeout=120)
    jobs = [client.submit("generate", "smollm2", p, {"max_new_tokens": n}) for p, n in zip(PROMPTS, TOKENS)]
    results = [job.result(300) for job in jobs]
    for prompt, result in zip(PROMPTS, results):
        _same(result, solo[prompt])
    assert max(r["stats"]["batch"] for r in results) == MAX_BATCH  # the config's cap, reached
    records = [client.job(job.id) for job in jobs]
    # the fourth waited for room (the cap), joined mid-generation when the shortest member left
    assert records[3]["started"] > min(r["finished"] for r in records[:3]) - 0.5


def test_generate_jobs_queued_before_a_batch_opens_share_its_first_prompt_pass(daemon, solo):
    client = daemon.client(timeout=120)
    texts = [" ".join(["the lighthouse keeper watched the sea"] * 16)] * 48  # a second or so of MiniLM
    blocker = client.submit("embed", "minilm", texts)
    deadline = time.monotonic() + 60
    while client.job(blocker.id)["state"] != "running":  # the executor is busy: the jobs below queue up
        assert time.monotonic() < deadline
        time.sleep(0.01)
    jobs = [client.submit("generate", "smollm2", PROMPTS[i], {"max_new_tokens": TOKENS[i]})
            for i in range(MAX_BATCH)]
    blocker.result(120)
    results = [job.result(300) for job in jobs]
    for index, result in enumerate(results):
        _same(result, solo[PROMPTS[index]])
        assert result["stats"]["batch"] == MAX_BATCH
        # one prompt sweep for all three, then one per step: each job saw the sweeps it sees alone, no
        # joiner's prompt sweep in between
        assert result["stats"]["passes"] == solo[PROMPTS[index]]["stats"]["passes"]


def test_each_member_of_a_batch_streams_its_own_text(daemon, solo):
    client = daemon.client(timeout=120)
    jobs = [client.submit("generate", "smollm2", PROMPTS[i], {"max_new_tokens": TOKENS[i]}, progress=True)
            for i in (0, 1)]
    for index, job in zip((0, 1), jobs):
        events = list(job.progress(timeout=300))
        pieces = [e["text"] for e in events if e.get("text")]
        offsets = [sum(len(e["text"]) for e in events[:n]) for n in range(len(events))]
        assert [e["text_offset"] for e in events] == offsets  # no piece lost or repeated
        result = job.result(0)
        assert "".join(pieces) == result["text"] == solo[PROMPTS[index]]["text"] and len(pieces) >= 2
    assert max(job.result(0)["stats"]["batch"] for job in jobs) == 2


def test_a_cancel_in_the_middle_of_a_batch_leaves_the_others_as_if_alone(daemon, solo):
    client = daemon.client(timeout=120)
    keep = [client.submit("generate", "smollm2", PROMPTS[i], {"max_new_tokens": TOKENS[i]}) for i in (0, 2)]
    victim = client.submit("generate", "smollm2", PROMPTS[1], {"max_new_tokens": 40}, progress=True)
    for event in victim.progress(timeout=120):
        if event["tokens"] >= 2:
            break
    assert victim.cancel() is True
    with pytest.raises(JobCancelled):
        victim.result(60)
    for index, job in zip((0, 2), keep):
        _same(job.result(300), solo[PROMPTS[index]])


def test_a_deadline_expiring_in_a_batch_ends_that_job_only(daemon, solo):
    client = daemon.client(timeout=120)
    keep = client.submit("generate", "smollm2", PROMPTS[2], {"max_new_tokens": TOKENS[2]})
    late = client.submit("generate", "smollm2", PROMPTS[1], {"max_new_tokens": 60}, deadline_s=2.0)
    with pytest.raises(ServerError) as info:
        late.result(120)
    assert info.value.code == "deadline_exceeded"
    _same(keep.result(300), solo[PROMPTS[2]])
    assert client.job(late.id)["state"] == "failed"


def test_a_higher_priority_job_takes_a_full_batchs_place_at_the_next_step(daemon, solo):
    client = daemon.client(timeout=120)
    low = [client.submit("generate", "smollm2", PROMPTS[i], {"max_new_tokens": TOKENS[i]}, progress=True)
           for i in range(MAX_BATCH)]
    for event in low[-1].progress(timeout=120):  # the batch is full and decoding
        if event["tokens"] >= 1:
            break
    high = client.submit("generate", "smollm2", PROMPTS[3], {"max_new_tokens": TOKENS[3]}, priority=5)
    _same(high.result(300), solo[PROMPTS[3]])
    record = client.job(high.id)
    lows = [job.result(300) for job in low]
    for index, result in enumerate(lows):
        _same(result, solo[PROMPTS[index]])
    records = [client.job(job.id) for job in low]
    assert [r["attempts"] for r in records] == [1, 1, 2]  # the newest low job gave up its place, ran again
    assert record["started"] < records[0]["finished"]  # it joined while the longest low job was decoding
    assert records[-1]["finished"] > record["finished"]


def test_a_watchdog_hold_pauses_the_whole_batch_and_it_resumes_as_if_alone(daemon):
    # Long jobs: the watchdog reads its sensors once a second, and with the suite's 10- and 12-token
    # jobs a fast machine finished the first before the hold was read (a CI run failed that way).
    lengths = {0: 40, 2: 48}
    client = daemon.client(timeout=120)
    alone = {i: client.generate("smollm2", PROMPTS[i], max_new_tokens=n, timeout=300) for i, n in lengths.items()}
    jobs = [client.submit("generate", "smollm2", PROMPTS[i], {"max_new_tokens": n}, progress=True)
            for i, n in lengths.items()]
    for event in jobs[-1].progress(timeout=120):
        if event["tokens"] >= 1:
            break
    (daemon.root / "temp").write_text("85000\n")  # hard: execution holds between stages
    try:
        deadline = time.monotonic() + 30
        while not client.status()["watchdogs"]["actions"]["execution_held"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(2.0)
        assert all(client.job(job.id)["state"] == "running" for job in jobs)
    finally:
        (daemon.root / "temp").write_text("50000\n")  # a failure here must not hold the next tests' jobs
    for index, job in zip(lengths, jobs):
        result = job.result(300)
        assert alone[index]["stats"]["batch"] == 1
        _same(result, alone[index])
        assert result["stats"]["paused_s"] >= 1.5 and result["stats"]["batch"] == 2


def test_kill_9_during_a_batched_step_completes_every_job_once_after_restart(daemon, solo, smollm2, minilm):
    root = daemon.root
    client = daemon.client(timeout=120)
    jobs = [client.submit("generate", "smollm2", PROMPTS[i], {"max_new_tokens": TOKENS[i]}, progress=True)
            for i in range(MAX_BATCH)]
    for event in jobs[-1].progress(timeout=120):
        if event["tokens"] >= 1:
            break
    assert all(client.job(job.id)["state"] == "running" for job in jobs)
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    again = start_daemon(root)
    try:
        client = again.client(timeout=120)
        records = [wait_for_state(client, job.id, "done", timeout=300) for job in jobs]
        assert [r["attempts"] for r in records] == [2] * MAX_BATCH
        for index, record in enumerate(records):
            _same(record["result"], solo[PROMPTS[index]])
    finally:
        daemon.proc, daemon.notify, daemon.clients = again.proc, again.notify, again.clients  # the fixture stops it
