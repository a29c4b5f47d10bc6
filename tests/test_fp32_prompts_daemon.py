"""A real daemon serving SmolLM2 in bf16 with ``fp32_prompts`` (hermesd.fp32linear): the prompt passes
run their linears in fp32, and batched generate jobs still give exactly their solo answers."""

from __future__ import annotations

import pytest
from daemon_support import start_daemon, write_config

from hermesd.store.convert import convert, open_source

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colours."]
TOKENS = 8


@pytest.fixture(scope="module")
def bf16_store(smollm2, tmp_path_factory):
    store = tmp_path_factory.mktemp("fp32-prompts") / "smollm2-bf16"
    convert(open_source(smollm2[0], dequantize=True), store, dtype="bf16")
    return store


def _serve(root, store, fp32_prompts: bool):
    write_config(root, {"smol": {"store": store, "memory_budget": "800MiB", "max_prompt_tokens": 128,
                                 "max_new_tokens": 32, "max_batch": len(PROMPTS), "fp32_prompts": fp32_prompts}})
    return start_daemon(root)


def _answers(daemon, together: bool) -> list[dict]:
    client = daemon.client(timeout=300)
    if not together:
        return [client.generate("smol", p, max_new_tokens=TOKENS, timeout=300) for p in PROMPTS]
    blocker = client.submit("generate", "smol", "Tell me about lighthouses.", {"max_new_tokens": 2}, progress=True)
    next(iter(blocker.progress(timeout=120)))  # the executor is busy: the jobs below queue up together
    jobs = [client.submit("generate", "smol", p, {"max_new_tokens": TOKENS}) for p in PROMPTS]
    blocker.result(300)
    return [job.result(300) for job in jobs]


def test_batched_answers_equal_solo_ones_with_fp32_prompts(bf16_store, tmp_path):
    daemon = _serve(tmp_path / "on", bf16_store, fp32_prompts=True)
    try:
        solo, batched = _answers(daemon, together=False), _answers(daemon, together=True)
    finally:
        assert daemon.stop() == 0
    assert all(r["stats"]["batch"] == 1 for r in solo)
    layers = 30  # SmolLM2-135M: 7 projections in each of its 30 layers, and the head
    assert all(r["stats"]["fp32_linears"] >= 7 * layers for r in solo + batched)
    assert max(r["stats"]["batch"] for r in batched) == len(PROMPTS)  # they shared the sweeps
    assert [r["text"] for r in batched] == [r["text"] for r in solo]
    assert [r["new_tokens"] for r in batched] == [r["new_tokens"] for r in solo]
