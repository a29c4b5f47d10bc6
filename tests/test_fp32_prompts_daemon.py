"""A real daemon serving a bf16 decoder with ``fp32_prompts`` (hermesd.fp32linear): the prompt passes
run their linears in fp32, and batched generate jobs still give exactly their solo answers."""

from __future__ import annotations

import pytest
from conftest import VOCAB
from daemon_support import save_tiny_tokenizer, start_daemon, write_config

from hermesd.store.convert import convert, open_source

pytestmark = pytest.mark.slow

PROMPTS = ["w5 w17 w230 w42 w7 w8", "w9 w10", "w300 w301 w302 w303 w304 w305 w306 w307 w308", "w77 w78 w79"]
TOKENS = 8


@pytest.fixture(scope="module")
def bf16_store(converted, tmp_path_factory):
    """The tiny random Llama as a bf16 store with a word-level tokenizer."""
    store = tmp_path_factory.mktemp("fp32-prompts") / "llama-bf16"
    convert(open_source(converted("llama").hf_dir), store, dtype="bf16")
    save_tiny_tokenizer(store, VOCAB)
    return store


def _answers(daemon, together: bool) -> list[dict]:
    client = daemon.client(timeout=120)
    if not together:
        return [client.generate("llama", p, max_new_tokens=TOKENS, timeout=120) for p in PROMPTS]
    blocker = client.submit("generate", "llama", "w1 w2 w3", {"max_new_tokens": 40}, progress=True)
    next(iter(blocker.progress(timeout=120)))  # the executor is busy: the jobs below queue up together
    jobs = [client.submit("generate", "llama", p, {"max_new_tokens": TOKENS}) for p in PROMPTS]
    blocker.result(120)
    return [job.result(120) for job in jobs]


def test_batched_answers_equal_solo_ones_with_fp32_prompts(bf16_store, tmp_path):
    write_config(tmp_path, {"llama": {"store": bf16_store, "max_new_tokens": 64, "max_batch": len(PROMPTS) + 1,
                                      "fp32_prompts": True}})
    daemon = start_daemon(tmp_path)
    try:
        solo, batched = _answers(daemon, together=False), _answers(daemon, together=True)
    finally:
        assert daemon.stop() == 0
    assert all(r["stats"]["batch"] == 1 for r in solo)
    assert max(r["stats"]["batch"] for r in batched) > 1  # they shared the sweeps
    assert all(r["stats"]["fp32_linears"] > 0 for r in solo + batched)  # the prompts ran in fp32
    assert [r["text"] for r in batched] == [r["text"] for r in solo]
    assert [r["new_tokens"] for r in batched] == [r["new_tokens"] for r in solo]
