"""Resident stages are read while the first run goes, not in load() (engine.resident)."""

from __future__ import annotations

import os

import pytest
import torch

import hermesd
from hermesd import memory
from hermesd.errors import StageIntegrityError
from hermesd.store.manifest import Manifest

PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10]])


def _logits(engine):
    with torch.inference_mode():
        return engine.model(PROMPT).logits


def test_load_reads_no_resident_stage_and_the_first_run_reads_each_once(converted):
    store = converted("gpt2").store
    with hermesd.load(store, prefetch=0) as streamed:
        want = _logits(streamed)
    with hermesd.load(store, resident="all") as engine:
        total = sum(engine.reader.read_bytes(name) for name in engine.plan.resident)
        assert engine.open_stats.resident_bytes == total and engine.open_stats.ring_bytes == 0
        got = _logits(engine)
        first = engine.stats
        assert torch.equal(got, _logits(engine))
        again = engine.stats
    assert torch.equal(got, want)
    assert sum(s.loads for s in first.stages) == len(engine.plan.resident)
    assert first.bytes_read - first.gathered_bytes == total
    assert again.bytes_read == again.gathered_bytes and sum(s.loads for s in again.stages) == 0


def test_wait_resident_reads_everything_before_a_run(converted):
    store = converted("llama").store
    before = memory.rss_bytes()
    with hermesd.load(store, resident="all") as engine:
        engine.wait_resident()
        total = engine.open_stats.resident_bytes
        assert memory.rss_bytes() - before >= 0.9 * total
        _logits(engine)
        assert sum(s.loads for s in engine.stats.stages) == 0  # wait_resident's reads are no run's loads
        assert engine.resident_now == sorted(engine.plan.resident)


def test_shedding_while_the_first_reads_run_then_restoring_keeps_the_output(converted):
    store = converted("gpt2").store
    with hermesd.load(store, prefetch=0) as streamed:
        want = _logits(streamed)
    with hermesd.load(store, resident="all", prefetch=1) as engine:
        assert engine.shed_resident() == len(engine.plan.resident)  # at once: reads may be under way
        assert engine.resident_now == [] and engine.shed_bytes > 0
        assert torch.equal(_logits(engine), want)  # every stage loads on demand
        assert engine.restore_resident() == len(engine.plan.resident)
        assert torch.equal(_logits(engine), want)
        assert sum(s.loads for s in engine.stats.stages) == 0


def test_a_damaged_resident_stage_fails_every_run_that_needs_it_with_its_name(converted, store_copy):
    store = store_copy(converted("gpt2").store)
    stage = next(s for s in Manifest.load(store).stages if s.kind == "block")
    os.truncate(store / stage.file, stage.bytes - 100)
    with hermesd.load(store, resident=[stage.name]) as engine:  # load() does not read it
        for _ in range(2):
            with pytest.raises(StageIntegrityError, match=rf"{stage.name}.*size {stage.bytes - 100} bytes"):
                _logits(engine)
        with pytest.raises(StageIntegrityError):
            engine.wait_resident()
