"""``hermesd convert --quantize int8|int4``: which weights are quantized, the reported error, streamed
output equal to resident output, quality (perplexity) on the real SmolLM2, and refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hermesd
from hermesd.errors import ConvertError
from hermesd.perplexity import perplexity_of_store
from hermesd.store.convert import convert, open_source
from hermesd.store.manifest import Manifest

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
TEXT = Path(__file__).parent / "data" / "perplexity.txt"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qconv") / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def tiny_stores(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("qstores")
    stores = {}
    for scheme in (None, "int8", "int4"):
        dest = root / (scheme or "float")
        report = convert(open_source(None, random_config=tiny_config, quantize=scheme), dest)
        stores[scheme or "float"] = (dest, report)
    return stores


def _quant_formats(store: Path) -> dict[str, str]:
    manifest = Manifest.load(store)
    return {f"{stage.name}:{local}": meta["format"] for stage in manifest.stages for local, meta in stage.quant.items()}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_linears_quantized_embeddings_and_norms_float(tiny_stores, scheme: str):
    store, report = tiny_stores[scheme]
    formats = _quant_formats(store)
    # 7 Linears per block x 2 blocks + the untied LM head; the embedding, norms stay float
    assert len(formats) == 15 and set(formats.values()) == {scheme}
    assert not any("embed_tokens" in key for key in formats)
    assert "lm_head:" in formats
    assert set(report.quant_errors) == {"model.layers.0", "model.layers.1", "lm_head"}


def test_reported_error_and_size_follow_the_bits(tiny_stores):
    errors = {s: max(tiny_stores[s][1].quant_errors.values()) for s in ("int8", "int4")}
    # Gaussian weights: int8 per row ~0.7 %, int4 affine per 32 ~7.8 %
    assert 0.002 < errors["int8"] < 0.015
    assert 0.04 < errors["int4"] < 0.12
    sizes = {s: tiny_stores[s][1].weight_bytes for s in ("float", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < 0.5 * sizes["float"]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_streamed_equals_resident_and_close_to_float(tiny_stores, scheme: str):
    ids = torch.arange(5, 37)[None, :]
    results = {}
    for label, options in (("resident", {"resident": "all"}), ("streamed", {"prefetch": 1})):
        with hermesd.load(tiny_stores[scheme][0], **options) as engine, torch.inference_mode():
            results[label] = engine.model(ids).logits[0]
    with hermesd.load(tiny_stores["float"][0], resident="all") as engine, torch.inference_mode():
        reference = engine.model(ids).logits[0]
    assert torch.equal(results["resident"], results["streamed"])
    relative = float((results["resident"] - reference).norm() / reference.norm())
    assert relative < (0.03 if scheme == "int8" else 0.25), relative


def test_refusals_before_reading(tiny_config: Path, tmp_path: Path):
    with pytest.raises(ConvertError, match="group size must be one of"):
        open_source(None, random_config=tiny_config, quantize="int4", group_size=48)
    with pytest.raises(ConvertError, match="--group-size needs --quantize"):
        open_source(None, random_config=tiny_config, group_size=64)
    with pytest.raises(ConvertError, match="does not divide|group size"):
        convert(open_source(None, random_config=tiny_config, quantize="int8", group_size=7), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_quantize_refuses_a_gguf_kept_quantized():
    sys.path.insert(0, str(Path(__file__).parent / "quant"))
    from gguf_support import TINY, need

    with pytest.raises(ConvertError, match="already quantized"):
        open_source(need(TINY["Q4_K_M"]), quantize="int8")


def test_cli_reports_errors_per_stage(tiny_config: Path, tmp_path: Path):
    dest = tmp_path / "cli-int4"
    done = subprocess.run([sys.executable, "-m", "hermesd.cli", "convert", "--random-config", str(tiny_config),
                           str(dest), "--quantize", "int4", "--quiet"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "quantization error" in done.stdout and "model.layers.1" in done.stdout
    info = subprocess.run([sys.executable, "-m", "hermesd.cli", "info", str(dest)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert "int4" in info.stdout


@pytest.mark.slow
def test_smollm2_perplexity_int8_within_1pct_int4_within_6pct(smollm2, tmp_path_factory):
    gguf, float_store = smollm2
    text = TEXT.read_text(encoding="utf-8")
    reference, scored = perplexity_of_store(float_store, text)
    assert scored >= 2000
    root = tmp_path_factory.mktemp("smol-q")
    for scheme, limit in (("int8", 0.01), ("int4", 0.06)):
        store = root / scheme
        convert(open_source(gguf, dequantize=True, quantize=scheme), store)
        value, _ = perplexity_of_store(store, text)
        print(f"SmolLM2 perplexity fp32 {reference:.3f}, {scheme} {value:.3f} ({100 * (value / reference - 1):+.2f} %)")
        assert value <= reference * (1 + limit)
        if scheme == "int4":
            assert "Paris" in _answer(store)


def _answer(store: Path) -> str:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with hermesd.load(store, prefetch=2) as engine, torch.inference_mode():
        ids = engine.tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)["input_ids"]
        out = engine.model.generate(ids, max_new_tokens=12, do_sample=False)
        return engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


WIDE = {**TINY, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 1, "num_attention_heads": 16,
        "num_key_value_heads": 16}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_wide_layers_are_stored_kernel_ready_and_planned_with_their_tables(tmp_path: Path, scheme: str):
    from hermesd.engine.reader import StageReader
    from hermesd.plan.budget import compute_bytes, fit_plan
    from hermesd.quant.kernels import int4_kernel_available
    from hermesd.quant.linear import QuantLinear

    config = tmp_path / "config.json"
    config.write_text(json.dumps(WIDE))
    store = tmp_path / scheme
    convert(open_source(None, random_config=config, quantize=scheme), store)
    manifest = Manifest.load(store)
    metas = manifest.stage("model.layers.0").quant
    assert len(metas) == 7  # q, k, v, o (2048 x 2048: 4 M weights each) and the MLP's three
    if scheme == "int4" and int4_kernel_available():
        # the int4 kernel's table is stored in place of scales/zeros: nothing to prepare at bind
        assert {m["table"] for m in metas.values()} in ({"bfloat16"}, {"float32"})
        assert compute_bytes(manifest)["model.layers.0"] == 0
    if scheme == "int8":  # per-row scales cast to the kernel's dtype at bind: 2048 of them per Linear
        assert compute_bytes(manifest)["model.layers.0"] in (7 * 2048 * 2, 7 * 2048 * 4)
    reader = StageReader(store, manifest)
    extra = compute_bytes(manifest)
    plan = fit_plan(manifest, reader.span, 0, resident="all")
    assert plan.resident_bytes == sum(reader.span(s.name) + extra[s.name] for s in manifest.stages)
    ids = torch.arange(3, 19)[None, :]
    tokens = {}
    for label, options in (("resident", {"resident": "all"}), ("streamed", {"prefetch": 1})):
        with hermesd.load(store, **options) as engine, torch.inference_mode():
            assert any(isinstance(m, QuantLinear) and m.small_m_path() != "dense" for m in engine.model.modules())
            tokens[label] = engine.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens["resident"], tokens["streamed"])


@pytest.mark.slow  # the real bundled model
def test_quiet_convert_prints_no_progress_bar(smollm2, tmp_path: Path):
    gguf, _ = smollm2
    done = subprocess.run([sys.executable, "-m", "hermesd.cli", "convert", str(gguf), str(tmp_path / "q"),
                           "--dequantize", "--quantize", "int8", "--quiet"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "it/s" not in done.stderr and "%|" not in done.stderr, done.stderr[-500:]
    assert "quantization error" in done.stdout


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_by_row_blocks_equals_quantizing_whole(scheme, monkeypatch):
    # convert quantizes a block of rows at a time to bound its temporaries; the stored tensors and the
    # reported error must be those of quantizing the weight whole. 2080x2048 is large enough for the
    # kernel-ready int4 form (its [groups, N, 2] table joins along N); blocks of 640 rows + a 160-row tail
    from hermesd.quant.quantizer import quantize, relative_rms_error
    from hermesd.store import quantizing
    from hermesd.store.quantized import stored_meta, to_stored

    weight = torch.randn(2080, 2048, generator=torch.Generator().manual_seed(3)) * 0.02
    meta = stored_meta(quantizing.quant_meta(scheme, (2080, 2048), None))
    assert scheme == "int8" or meta.table, "the int4 case must cover the kernel-ready form"
    whole = to_stored(quantize(weight, scheme, meta.group_size), meta)
    monkeypatch.setattr(quantizing, "ROW_BLOCK_BYTES", 640 * 2048 * 4)
    blocks, squared_error, squared_norm = quantizing.quantize_by_rows(weight, scheme, meta)
    assert blocks.meta == whole.meta
    for name in ("qweight", "scales", "zeros", "super_scales"):
        a, b = getattr(blocks, name), getattr(whole, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    expected = relative_rms_error(weight, whole.dequantize())
    assert (squared_error / squared_norm) ** 0.5 == pytest.approx(expected, rel=1e-9)
