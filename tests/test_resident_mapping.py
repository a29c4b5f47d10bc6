"""Resident stages are mappings of the store's files, read while the first run goes (engine.resident)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import evict, resident_bytes

import hermesd
from hermesd.engine.reader import StageReader
from hermesd.errors import StageIntegrityError
from hermesd.store.manifest import Manifest

PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10]])


def _files(store):
    return sorted((store / "stages").glob("*.safetensors"))


def _logits(engine):
    with torch.inference_mode():
        return engine.model(PROMPT).logits


def test_load_maps_the_resident_set_and_the_first_run_reads_it(converted):
    store = converted("gpt2").store
    with hermesd.load(store, prefetch=0) as streamed:
        want = _logits(streamed)
    evict(_files(store))
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


def test_wait_resident_reads_everything_and_close_gives_the_pages_back(converted):
    store = converted("llama").store
    files = _files(store)
    evict(files)
    total = sum(path.stat().st_size for path in files)
    with hermesd.load(store, resident="all") as engine:
        engine.wait_resident()
        cached = sum(resident_bytes(path) for path in files)
        assert cached >= 0.9 * total, f"only {cached} of {total} bytes were read by wait_resident"
        _logits(engine)
        assert sum(s.loads for s in engine.stats.stages) == 0  # wait_resident's reads are no run's loads
    left = sum(resident_bytes(path) for path in files)
    assert left < 0.01 * total, f"{left} of {total} bytes stayed in the page cache after close()"


def test_shedding_while_the_first_reads_run_then_restoring_keeps_the_output(converted):
    store = converted("gpt2").store
    with hermesd.load(store, prefetch=0) as streamed:
        want = _logits(streamed)
    evict(_files(store))
    with hermesd.load(store, resident="all", prefetch=1) as engine:
        assert engine.shed_resident() == len(engine.plan.resident)  # at once: reads may be under way
        assert engine.resident_now == [] and engine.shed_bytes > 0
        assert torch.equal(_logits(engine), want)  # every stage loads on demand
        assert engine.restore_resident() == len(engine.plan.resident)
        assert torch.equal(_logits(engine), want)
        assert sum(s.loads for s in engine.stats.stages) == 0


def test_a_mapped_stage_cut_short_before_it_is_read_fails_with_its_name(converted, store_copy):
    store = store_copy(converted("gpt2").store)
    manifest = Manifest.load(store)
    stage = next(s for s in manifest.stages if s.kind == "block")
    mapped = StageReader(store, manifest).map(stage.name)
    os.truncate(store / stage.file, 4096)  # after mapping: touching the lost pages would be SIGBUS
    with pytest.raises(StageIntegrityError, match="cannot read it") as caught:
        mapped.populate()
    assert caught.value.stage == stage.name and caught.value.path == stage.file


def test_a_resident_stage_altered_before_load_is_refused_by_load(converted, store_copy):
    store = store_copy(converted("gpt2").store)
    stage = next(s for s in Manifest.load(store).stages if s.kind == "block")
    os.truncate(store / stage.file, stage.bytes - 100)
    with pytest.raises(StageIntegrityError, match=rf"{stage.name}.*size"):
        hermesd.load(store, resident=[stage.name])
