"""Damaged or foreign stores fail loudly, naming the stage and file, and never produce output."""

from __future__ import annotations

import json
import os

import pytest
import torch

import hermesd
from hermesd.errors import StageIntegrityError, StoreError, UnsupportedModelError
from hermesd.store.manifest import MANIFEST_NAME, Manifest
from hermesd.store.verify import VERIFIED_NAME

PROMPT = torch.tensor([[5, 6, 7, 8]])


def _run(store):
    with torch.inference_mode(), hermesd.load(store, prefetch=2) as engine:
        return engine.model(PROMPT).logits


def _block(store):
    return next(s for s in Manifest.load(store).stages if s.kind == "block")


def test_missing_stage_file(converted, store_copy):
    store = store_copy(converted("gpt2").store)
    stage = _block(store)
    os.remove(store / stage.file)
    with pytest.raises(StageIntegrityError) as caught:
        _run(store)
    assert caught.value.stage == stage.name and caught.value.path == stage.file
    assert "missing" in str(caught.value)


def test_truncated_stage_file(converted, store_copy):
    store = store_copy(converted("gpt2").store)
    stage = _block(store)
    os.truncate(store / stage.file, stage.bytes - 100)
    with pytest.raises(StageIntegrityError, match=rf"{stage.name}.*size {stage.bytes - 100} bytes"):
        _run(store)


def test_altered_bytes_of_the_same_size_are_caught_by_sha256(converted, store_copy):
    store = store_copy(converted("gpt2").store)
    _run(store)  # verified and recorded: only a changed stat signature triggers a new hash
    stage = _block(store)
    path = store / stage.file
    with open(path, "r+b") as handle:  # flip one weight byte in place: same size, same header
        handle.seek(stage.data_start + 1000)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StageIntegrityError, match=rf"{stage.name}.*sha256"):
        _run(store)


def test_altered_file_is_caught_even_with_its_mtime_restored(converted, store_copy):
    store = store_copy(converted("llama").store)
    _run(store)
    stage = _block(store)
    path = store / stage.file
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[stage.data_start] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # ctime still moves: caught
    with pytest.raises(StageIntegrityError, match="sha256"):
        _run(store)


def test_a_verified_store_is_not_hashed_again(converted, store_copy, monkeypatch):
    store = store_copy(converted("gpt2").store)
    _run(store)  # the copy has new inodes: this run hashes each file once and records it
    records = json.loads((store / VERIFIED_NAME).read_text())
    assert set(records) == {s.file for s in Manifest.load(store).stages}
    from hermesd.engine import reader

    def refuse(*args):
        raise AssertionError("hashed a file that was already verified")

    monkeypatch.setattr(reader.StageReader, "_check_sha256", refuse)
    _run(store)


def test_newer_format_version_is_refused(converted, store_copy):
    store = store_copy(converted("bert").store)
    raw = json.loads((store / MANIFEST_NAME).read_text())
    raw["format_version"] = 99
    (store / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(StoreError, match="format version 99 is newer"):
        hermesd.load(store)


def test_unsupported_architecture_is_refused(converted, store_copy):
    store = store_copy(converted("bert").store)
    raw = json.loads((store / MANIFEST_NAME).read_text())
    raw["architecture"] = "FluxCapacitorModel"
    (store / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="FluxCapacitorModel"):
        hermesd.load(store)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a hermesd store"):
        hermesd.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(StoreError, match="cannot read"):
        hermesd.load(tmp_path)
