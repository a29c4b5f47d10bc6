"""Batches in process on the small random stores (word-level tokenizers): a batch's memory (plan/batchmem)
against a real batched cache, DecodeBatch against solo generate, merged one-pass jobs against solo runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hermesd.decodebatch import DecodeBatch, prepare
from hermesd.engine import Engine
from hermesd.onepass import merge_key, run_merged
from hermesd.plan.batchmem import allowance, batch_bytes, kv_bytes_per_token, max_batch
from hermesd.plan.workload import Workload
from hermesd.planning import resolve
from hermesd.tasks import GenerateParams, classify, forward, generate

PROMPTS = ["w5 w17 w230 w42", "w9", "w300 w301 w302 w303 w304 w305 w306", "w77 w78"]
NEW = [6, 3, 5, 4]


@pytest.fixture(scope="module")
def engine(daemon_stores):
    store = daemon_stores["llama"]
    with Engine.open(store, resolve(store, None, Workload(16, 8)).plan) as opened:
        yield opened


def test_batched_greedy_equals_solo_generate_with_joins_and_leaves_and_the_cache_matches_the_estimate(engine):
    solo = [generate(engine, p, GenerateParams(max_new_tokens=n)) for p, n in zip(PROMPTS, NEW)]
    batch = DecodeBatch(engine)
    seqs = [prepare(engine, p, GenerateParams(max_new_tokens=n)) for p, n in zip(PROMPTS, NEW)]
    projected = 0
    with engine.span():
        batch.remove(batch.admit(seqs[:2]))
        projected = batch.projected_length(seqs[2:])
        batch.remove(batch.step())
        batch.remove(batch.admit(seqs[2:]))  # two join mid-generation
        longest = 0
        while len(batch):
            layer = batch.cache.layers[0]
            cache_bytes = sum(2 * (lay.keys.numel() * lay.keys.element_size()) for lay in batch.cache.layers)
            assert cache_bytes == len(batch) * batch.length * kv_bytes_per_token(engine.manifest)
            assert layer.keys.shape[0] == len(batch)
            longest = max(longest, batch.length)
            batch.remove(batch.step())  # members leave at different steps
    assert longest <= projected + 1
    for seq, reference in zip(seqs, solo):
        assert batch.result(seq) == reference


def test_seeded_sampling_is_the_same_in_any_batch(engine):
    params = GenerateParams(max_new_tokens=5, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    alone = DecodeBatch(engine)
    one = prepare(engine, PROMPTS[0], params)
    with engine.span():
        alone.remove(alone.admit([one]))
        while len(alone):
            alone.remove(alone.step())
    crowded = DecodeBatch(engine)
    seqs = [prepare(engine, p, params) for p in PROMPTS]
    with engine.span():
        crowded.remove(crowded.admit(seqs))
        while len(crowded):
            crowded.remove(crowded.step())
    assert seqs[0].generated == one.generated


def test_the_largest_batch_is_derived_from_what_the_budget_leaves(daemon_stores):
    store = daemon_stores["llama"]
    work = Workload(16, 8)
    bound = resolve(store, None, work).plan.peak_bound  # every stage resident: what a budget must cover
    small = resolve(store, str(bound + (1 << 20)), work).plan
    large = resolve(store, str(bound + (64 << 20)), work).plan
    from hermesd.store.manifest import Manifest

    manifest = Manifest.load(store)
    assert allowance(small) == small.activation_bytes + small.budget - small.peak_bound
    assert allowance(dataclasses.replace(small, budget=None)) is None  # no budget: only max_batch bounds it
    sizes = [max_batch(manifest, plan, 16, 8, limit=10_000) for plan in (small, large)]
    assert 1 <= sizes[0] <= sizes[1]
    for plan, rows in zip((small, large), sizes):
        assert rows == 1 or batch_bytes(manifest, rows, 24, 1, 16) <= allowance(plan)
        assert batch_bytes(manifest, rows + 1, 24, 1, 16) > allowance(plan)
    assert max_batch(manifest, large, 16, 8, limit=3) == min(3, sizes[1])


def test_one_pass_jobs_merged_into_one_batch_get_exactly_their_own_results(engine, daemon_stores):
    ids_jobs = [([[5, 6, 7]], {}), ([[8, 9, 10], [11, 12, 13]], {})]
    assert merge_key(engine, "forward", *ids_jobs[0]) == merge_key(engine, "forward", *ids_jobs[1])
    assert merge_key(engine, "forward", [[5, 6]], {}) != merge_key(engine, "forward", *ids_jobs[0])  # length
    for merged, (inputs, _) in zip(run_merged(engine, "forward", ids_jobs), ids_jobs):
        alone = forward(engine, inputs)["outputs"]["logits"]
        assert merged["outputs"]["logits"]["shape"] == alone["shape"]
        torch.testing.assert_close(torch.tensor(merged["outputs"]["logits"]["values"]), torch.tensor(alone["values"]),
                                   atol=1e-5, rtol=0)
    store = daemon_stores["bert-cls"]
    with Engine.open(store, resolve(store, None, Workload(16)).plan) as bert:
        jobs = [(["w5 w6 w7 w8", "w9"], {"top_k": 2}), ("w10 w11", {"top_k": 2})]
        assert merge_key(bert, "classify", *jobs[0]) == merge_key(bert, "classify", *jobs[1])
        assert merge_key(bert, "classify", "w1", {"top_k": 1}) != merge_key(bert, "classify", *jobs[1])
        for merged, (inputs, params) in zip(run_merged(bert, "classify", jobs), jobs):
            alone = classify(bert, inputs, **params)["labels"]
            assert [[x["label"] for x in row] for row in merged["labels"]] == [[x["label"] for x in row] for row in alone]
            scores = [[[x["score"] for x in row] for row in result] for result in (merged["labels"], alone)]
            torch.testing.assert_close(torch.tensor(scores[0]), torch.tensor(scores[1]), atol=1e-5, rtol=0)


def test_a_batch_that_may_multiply_in_fp32_counts_the_converted_slices(engine):
    """fp32 prompts (hermesd.fp32linear) hold a converted weight slice and fp32 activations: counted for
    half-precision models when the model enables them, nothing for fp32 models."""
    from hermesd.plan.batchmem import FP32_SLICE_BYTES, fp32_pass_bytes

    half = dataclasses.replace(engine.manifest, dtype="bfloat16")
    widest = max(half.config.get("hidden_size", 0), half.config.get("intermediate_size", 0))
    assert widest > 0
    plain, fp32 = batch_bytes(half, 4, 40, 2, 20), batch_bytes(half, 4, 40, 2, 20, fp32=True)
    assert fp32 - plain >= FP32_SLICE_BYTES + 2 * 20 * widest * 4  # the prompt pass: 40 rows of the widest input
    assert fp32_pass_bytes(engine.manifest, 40) == 0 and engine.manifest.dtype == "float32"
