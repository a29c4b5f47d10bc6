"""hermesd convert: store layout, generic stages, tied weights, dtypes, atomicity, all three sources."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import make_hf_model
from safetensors import safe_open

import hermesd
from hermesd.errors import ConvertError, UnsupportedModelError
from hermesd.store.convert import convert, open_source
from hermesd.store.manifest import FORMAT_VERSION, Manifest
from hermesd.store.safetensors_io import ALIGNMENT


def test_manifest_describes_every_stage_file(converted):
    model = converted("gpt2")
    manifest = Manifest.load(model.store)
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.architecture == "GPT2LMHeadModel" and manifest.config["n_layer"] == 3
    blocks = [s for s in manifest.stages if s.kind == "block"]
    assert [s.name for s in blocks] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    for stage in manifest.stages:
        path = model.store / stage.file
        assert path.stat().st_size == stage.bytes and len(stage.sha256) == 64
        assert stage.data_start % ALIGNMENT == 0, "tensor data must start page-aligned for O_DIRECT"
        with safe_open(str(path), framework="pt") as handle:  # stage files are plain safetensors
            assert set(handle.keys()) == set(stage.tensors)
            for name, entry in stage.tensors.items():
                assert list(handle.get_slice(name).get_shape()) == entry.shape


def test_stored_tensors_equal_the_checkpoint(converted):
    model = converted("bert-cls")
    reference = model.reference().state_dict()
    manifest = Manifest.load(model.store)
    for stage in manifest.stages:
        with safe_open(str(model.store / stage.file), framework="pt") as handle:
            for local in stage.tensors:
                full = f"{stage.module}.{local}" if stage.module else local
                assert torch.equal(handle.get_tensor(local), reference[full]), full


def test_tied_weights_are_stored_once(converted):
    manifest = Manifest.load(converted("gpt2").store)
    head = manifest.stage("lm_head")
    assert head.tensors == {} and head.tied["weight"].stage == "transformer.wte"
    assert manifest.stage("transformer.wte").gather == ["weight"]
    llama = Manifest.load(converted("llama").store)
    assert llama.stage("lm_head").tied["weight"].tensor == "weight"


def test_side_files_travel_with_the_store(converted):
    model = converted("vit")
    manifest = Manifest.load(model.store)
    assert "preprocessor_config.json" in manifest.files
    assert (model.store / "preprocessor_config.json").is_file()


def test_existing_destination_is_refused_without_force(converted, tmp_path):
    model = converted("bert")
    with pytest.raises(ConvertError, match="--force"):
        convert(open_source(model.hf_dir), model.store)
    replaced = tmp_path / "again"
    replaced.mkdir()
    (replaced / "junk").write_text("old")
    convert(open_source(model.hf_dir), replaced, force=True)
    assert not (replaced / "junk").exists() and (replaced / "manifest.json").is_file()


class _FailingSource:
    """Wraps a real source and fails on its third stage, as a crash or Ctrl-C mid-convert would."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def stage_tensors(self, model, stage, index):
        if index == 2:
            raise KeyboardInterrupt
        return self._inner.stage_tensors(model, stage, index)


def test_interrupted_convert_leaves_nothing_behind(converted, tmp_path):
    model = converted("gpt2")
    dest = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        convert(_FailingSource(open_source(model.hf_dir)), dest)
    assert list(tmp_path.iterdir()) == [], "neither the store nor a partial directory may remain"


def test_sharded_checkpoint_and_bf16_output(tmp_path):
    architecture, hf_dir = make_hf_model("llama", tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    convert(open_source(sharded), tmp_path / "store", dtype="bf16")
    manifest = Manifest.load(tmp_path / "store")
    assert manifest.dtype == "bfloat16"
    assert {t.dtype for s in manifest.stages for t in s.tensors.values()} == {"BF16"}
    reference = transformers.LlamaForCausalLM.from_pretrained(sharded, dtype=torch.bfloat16).eval()
    ids = torch.randint(1, 5000, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), hermesd.load(tmp_path / "store", prefetch=2) as engine:
        got = engine.model(ids).logits
        want = reference(ids).logits
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_random_config_is_deterministic_and_runs(tmp_path):
    config = transformers.GPTJConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, vocab_size=3000)
    config.architectures = ["GPTJForCausalLM"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    convert(open_source(None, random_config=path, seed=5), tmp_path / "a")
    convert(open_source(None, random_config=path, seed=5), tmp_path / "b")
    first, second = Manifest.load(tmp_path / "a"), Manifest.load(tmp_path / "b")
    assert [s.sha256 for s in first.stages] == [s.sha256 for s in second.stages]
    with safe_open(str(tmp_path / "a" / first.stage("transformer.h.0").file), framework="pt") as handle:
        weight = handle.get_tensor("attn.q_proj.weight")
    assert 0.01 < weight.std().item() < 0.05, "the model's own init (std = initializer_range) was used"
    with torch.inference_mode(), hermesd.load(tmp_path / "a") as engine:
        logits = engine.model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 3000) and torch.isfinite(logits).all()


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(ConvertError, match="no such model directory"):
        open_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="config.json"):
        open_source(tmp_path / "empty")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="architectures"):
        open_source(None, random_config=config)
    config.write_text(json.dumps({"model_type": "no-such-model", "architectures": ["NoSuchModel"]}))
    with pytest.raises(UnsupportedModelError, match="no-such-model"):
        open_source(None, random_config=config)


def test_bad_dtype_is_refused(converted, tmp_path):
    with pytest.raises(ConvertError, match="unknown dtype"):
        convert(open_source(converted("bert").hf_dir), tmp_path / "store", dtype="int3")
