"""A generate job that would not fit the batch's memory waits for room, in a real daemon (issue 13).

SmolLM2 (fp32, streamed) is planned for prompts of up to 512 tokens under an 800 MiB budget; the
planner fills the budget with resident stages, so the batch's room (``batch_room`` in the model's
status) holds one full-size job, not two. Two long jobs submitted together must then run one after
the other, each exactly as alone, while short jobs of the same daemon still share sweeps: what
separates the long ones is the derived room, not ``max_batch``.
"""

from __future__ import annotations

import time

import pytest
from daemon_support import start_daemon, write_config

from hermesd.plan.batchmem import batch_bytes
from hermesd.store.manifest import Manifest

pytestmark = pytest.mark.slow

PROMPT_LIMIT, NEW_TOKENS = 512, 8
LONG = ["Here is a long note about lighthouses. " * 40 + "Summarise it:",
        "Here is a long note about the sea and its tides. " * 34 + "Summarise it:"]
SHORT = ["Name three colours.", "Count from one to five:"]


@pytest.fixture(scope="module")
def daemon(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-room")
    write_config(root, {"smollm2": {"store": smollm2[1], "memory_budget": "800MiB", "max_batch": 4,
                                    "max_prompt_tokens": PROMPT_LIMIT, "max_new_tokens": 16}},
                 thermal={"enabled": False})
    running = start_daemon(root)
    yield running
    assert running.stop() == 0


def _queued_together(client, prompts):
    """Submit ``prompts`` while a blocker holds the executor, so that they are all queued when a batch opens."""
    blocker = client.submit("generate", "smollm2", "Hello.", {"max_new_tokens": 2})
    deadline = time.monotonic() + 60
    while client.job(blocker.id)["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    jobs = [client.submit("generate", "smollm2", p, {"max_new_tokens": NEW_TOKENS}) for p in prompts]
    blocker.result(120)
    return jobs


def test_a_long_job_that_would_not_fit_waits_for_room_and_short_jobs_still_share(daemon, smollm2):
    client = daemon.client(timeout=120)
    model = next(m for m in client.models() if m["name"] == "smollm2")
    manifest = Manifest.load(smollm2[1])
    alone = {p: client.generate("smollm2", p, max_new_tokens=NEW_TOKENS, timeout=300) for p in LONG + SHORT}
    lengths = [alone[p]["prompt_tokens"] for p in LONG]
    assert all(300 < n <= PROMPT_LIMIT for n in lengths), lengths
    # the daemon's own numbers: one full-size job fits its room, two long ones together do not
    assert model["max_batch"] == 4 and model["max_batch_full_size"] == 1
    two = batch_bytes(manifest, 2, max(lengths) + NEW_TOKENS, 1, max(lengths))
    assert two > model["batch_room"] >= batch_bytes(manifest, 1, max(lengths) + NEW_TOKENS, 1, max(lengths))

    long_jobs = _queued_together(client, LONG)
    results = [job.result(300) for job in long_jobs]
    records = [client.job(job.id) for job in long_jobs]
    for prompt, result in zip(LONG, results):
        assert (result["text"], result["new_tokens"]) == (alone[prompt]["text"], alone[prompt]["new_tokens"])
        assert result["stats"]["batch"] == 1
    assert records[1]["started"] >= records[0]["finished"] - 0.05  # it waited for the first to leave

    short_jobs = _queued_together(client, SHORT)
    for prompt, result in zip(SHORT, [job.result(300) for job in short_jobs]):
        assert (result["text"], result["new_tokens"]) == (alone[prompt]["text"], alone[prompt]["new_tokens"])
        assert result["stats"]["batch"] == 2
