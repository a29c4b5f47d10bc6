"""GGUF files converted into stores that keep their quantization, run streamed by the engine.

The reference is transformers' own load of the same file, ``from_pretrained(dir, gguf_file=...,
dtype=float32)``, which de-quantizes every tensor with gguf-py. Our stored tensors de-quantize to
ggml's fp32 values bit for bit (``tests/quant/test_quant_store.py``) and a quantized store multiplies
them with ``F.linear`` in fp32 as transformers does, so logits agree to float rounding (1e-5; we see
0.0) and greedy decoding picks the same tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import hermesd
from hermesd.quant.embedding import QuantEmbedding
from hermesd.quant.linear import QuantLinear
from hermesd.store.convert import convert, open_source
from hermesd.store.manifest import FORMAT_VERSION, Manifest

sys.path.insert(0, str(Path(__file__).parent / "quant"))
from gguf_support import SMOLLM2, TINY, need, rewrite, write_gguf  # noqa: E402

transformers.logging.disable_progress_bar()

KINDS = ["Q4_K_M", "Q5_K_M", "Q4_0", "Q8_0"]
PROMPT = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]])
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """kind -> (GGUF file, its quantized store); Q4_0/Q8_0 files are the Q4_K_M model re-quantized here."""
    root = tmp_path_factory.mktemp("quantized-stores")
    made: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            path = TINY.get(kind)
            if path is None:
                path = rewrite(need(TINY["Q4_K_M"]), root / f"tiny-{kind}.gguf",
                               lambda name, ndim: kind if ndim == 2 else "F32")
            store = root / f"store-{kind}"
            convert(open_source(need(path)), store)
            made[kind] = (path, store)
        return made[kind]

    return get


def _reference(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True)


def _greedy(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_store_gives_transformers_logits_and_greedy_tokens(tiny, kind: str) -> None:
    path, store = tiny(kind)
    full = _reference(path)
    with torch.inference_mode():
        want_logits, want_tokens = full(PROMPT).logits, _greedy(full, PROMPT, 32)
    with hermesd.load(store, prefetch=2) as engine:
        assert engine.plan.streamed and not engine.plan.resident
        with torch.inference_mode():
            logits = engine.model(PROMPT).logits
            tokens = _greedy(engine.model, PROMPT, 32)
        assert engine.stats.on_demand_loads == 0
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    assert tokens.shape[1] == PROMPT.shape[1] + 32
    assert torch.equal(tokens, want_tokens)


@pytest.mark.parametrize("kind", ["Q4_K_M", "Q8_0"])
def test_streamed_and_resident_give_identical_logits(tiny, kind: str) -> None:
    _, store = tiny(kind)
    with torch.inference_mode():
        with hermesd.load(store, prefetch=2) as engine:
            streamed = engine.model(PROMPT).logits
            step = engine.model(PROMPT[:, :1]).logits  # one row: the decode shape
        with hermesd.load(store, resident="all") as engine:
            assert not engine.plan.streamed
            resident = engine.model(PROMPT).logits
            resident_step = engine.model(PROMPT[:, :1]).logits
    assert torch.equal(streamed, resident) and torch.equal(step, resident_step)


@pytest.mark.parametrize("kind", ["Q4_K_M", "Q5_K_M"])
def test_store_keeps_the_files_quantization(tiny, kind: str) -> None:
    path, store = tiny(kind)
    manifest = Manifest.load(store)
    assert manifest.format_version == FORMAT_VERSION == 2 and manifest.dtype == "float32"
    formats = {f for stage in manifest.stages for f in stage.quant_formats}
    assert formats == {"Q4_K" if kind == "Q4_K_M" else "Q5_K", "Q6_K"}
    layer = manifest.stage("model.layers.0")
    assert set(layer.quant) == {f"{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    q_proj = layer.quant["self_attn.q_proj"]
    assert (q_proj["group_size"], q_proj["shape"], q_proj["super_block"]) == (32, [256, 256], 256)
    # the stage file is ordinary safetensors carrying the same metadata; norms stay fp32
    with safe_open(str(store / layer.file), framework="pt") as handle:
        assert json.loads(handle.metadata()["hermesd.quant.self_attn.q_proj"]) == q_proj
        assert handle.get_tensor("self_attn.q_proj.qweight").dtype == torch.uint8
        assert handle.get_tensor("input_layernorm.weight").dtype == torch.float32
    embed = manifest.stage("model.embed_tokens")
    assert embed.gather and all(name.startswith("weight.") is False for name in embed.gather)
    with hermesd.load(store, prefetch=1) as engine:
        assert isinstance(engine.model.model.embed_tokens, QuantEmbedding)
        assert isinstance(engine.model.model.layers[0].self_attn.q_proj, QuantLinear)
        assert isinstance(engine.model.lm_head, QuantLinear)
    stored = sum((store / s.file).stat().st_size for s in manifest.stages)
    # codes keep their bits (4-bit nibbles, 5/6-bit planes): within the 1.15x of the GGUF
    assert stored <= path.stat().st_size * 1.15


def test_info_shows_quantization_and_bytes_per_token(tiny) -> None:
    _, store = tiny("Q4_K_M")
    done = subprocess.run([sys.executable, "-m", "hermesd.cli", "info", str(store), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["quantized"] == ["Q4_K", "Q6_K"] and info["format_version"] == 2
    by_name = {s["name"]: s for s in info["stages"]}
    assert by_name["model.layers.3"]["quant"] == ["Q4_K", "Q6_K"] and by_name["model.norm"]["quant"] == []
    assert info["streamed_bytes_per_token"] == sum(s["bytes"] for s in info["stages"])
    text = subprocess.run([sys.executable, "-m", "hermesd.cli", "info", str(store)],
                          capture_output=True, text=True, timeout=120).stdout
    assert "Q4_K, Q6_K quantized weights" in text and "streamed per token" in text and "quant:Q4_K" in text


@pytest.fixture(scope="module")
def smollm2_quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    gguf = need(SMOLLM2)
    store = tmp_path_factory.mktemp("smollm2-q") / "smollm2"
    convert(open_source(gguf), store)
    return gguf, store


@pytest.mark.slow  # the real bundled model
def test_smollm2_q4_1_store_answers_paris_and_stays_the_files_size(smollm2_quantized) -> None:
    gguf, store = smollm2_quantized
    manifest = Manifest.load(store)
    stored = sum((store / s.file).stat().st_size for s in manifest.stages)
    assert stored <= 1.15 * gguf.stat().st_size
    head = manifest.stage("lm_head")  # tied: reads the embedding's stored Q8_0 tensors
    assert set(head.tied) == {"qweight", "scales"} and head.quant[""]["format"] == "Q8_0"
    with hermesd.load(store, prefetch=2) as engine:
        ids = engine.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)["input_ids"]
        with torch.inference_mode():
            out = engine.model.generate(ids, max_new_tokens=12, do_sample=False)
        answer = engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow  # the real bundled model
def test_smollm2_convert_never_holds_the_float_model(tmp_path: Path) -> None:
    # Fresh process, one tensor at a time, a block of rows at a time: the peak RSS is the interpreter
    # with torch and transformers (~350 MiB, ~95 of it shared libraries) plus the 28.7 MiB embedding
    # stage and a few MiB of decoded rows (406 MiB measured) -- not the 513 MiB fp32 model that
    # --dequantize holds (1.1 GiB peak measured here). test_convert_memory_cap.py shows the cgroup side.
    done = _cli_convert(need(SMOLLM2), tmp_path / "store", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["peak_rss_bytes"] < 450 << 20


@pytest.mark.slow  # the real bundled model
def test_smollm2_quantized_runs_under_a_budget_the_float_store_cannot_meet(smollm2_quantized) -> None:
    # 560 MiB is below the fp32 store's minimum here (588 MiB: runtime + its 113 MiB tied head in the
    # ring); the quantized store streams 92 MiB a token. Fresh process: the budget covers all of it.
    _, store = smollm2_quantized
    command = [sys.executable, "-m", "hermesd.cli", "run", str(store), "--task", "generate", "--json",
               "--memory-budget", "560MiB", "--max-new-tokens", "12", "What is the capital of France?"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert "Paris" in report["result"]["text"]
    assert report["stats"]["peak_rss_bytes"] <= report["plan"]["budget"] == 560 << 20


def test_cli_converts_a_gguf_named_inside_a_directory(tmp_path: Path) -> None:
    src = need(TINY["Q5_K_M"])
    dest = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "hermesd.cli", "convert", str(src.parent), str(dest),
                           "--gguf-file", src.name, "--json", "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    manifest = Manifest.load(dest)
    assert report["stages"] == len(manifest.stages) == 7 and report["peak_rss_bytes"] > 0
    assert report["weight_bytes"] == manifest.weight_bytes()
    assert manifest.source["quantized"] is True and manifest.source["path"] == str(src)
    assert (dest / "tokenizer.json").is_file() and not list(tmp_path.glob(".store.partial-*"))


# ---- bad input: one clear error, exit 1, nothing left behind ------------------------------------

def _cli_convert(src: Path, dest: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hermesd.cli", "convert", str(src), str(dest), "--quiet", *options],
                          capture_output=True, text=True, timeout=300)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    data = need(TINY["Q4_K_M"]).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    q2k = write_gguf(tmp_path / "q2k.gguf", "llama",
                     {"blk.0.ffn_up.weight": (np.zeros((4, 84), dtype=np.uint8), "Q2_K")})
    nosuch = write_gguf(tmp_path / "nosuch.gguf", "nosuchmodel",
                        {"token_embd.weight": (np.zeros((8, 32), np.float32), "F32")}, nosuchmodel__block_count=1)
    return {"truncated": (cut, "truncated: tensor"), "unknown type": (q2k, "Q2_K"),
            "architecture": (nosuch, "architecture 'nosuchmodel' is not supported")}


def test_bad_gguf_files_fail_with_one_clear_error_and_leave_nothing(tmp_path: Path) -> None:
    for what, (path, expected) in _bad_inputs(tmp_path).items():
        out = tmp_path / "stores"
        out.mkdir(exist_ok=True)
        done = _cli_convert(path, out / "dest")
        assert done.returncode == 1, (what, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hermesd: error: ") and expected in lines[0], (what, lines)
        assert path.name in lines[0] and "Traceback" not in done.stderr
        assert list(out.iterdir()) == [], what


def test_dequantize_flag_keeps_the_float_path(tmp_path: Path) -> None:
    source = open_source(need(TINY["Q4_K_M"]), dequantize=True)
    assert type(source).__name__ == "GGUFSource"
    store = tmp_path / "float"
    convert(source, store)
    manifest = Manifest.load(store)
    assert not any(stage.quant for stage in manifest.stages) and manifest.dtype == "float32"
    with hermesd.load(store) as engine, torch.inference_mode():
        logits = engine.model(PROMPT).logits
    # a version 1 store (written before quantized stores existed: no "quant" fields) still reads
    raw = json.loads((store / "manifest.json").read_text())
    raw["format_version"] = 1
    for stage in raw["stages"]:
        del stage["quant"]
    (store / "manifest.json").write_text(json.dumps(raw))
    with hermesd.load(store) as engine, torch.inference_mode():
        assert torch.equal(engine.model(PROMPT).logits, logits)


def test_a_quantized_import_refuses_a_float_dtype_other_than_fp32(tmp_path: Path) -> None:
    # bf16 compute on a quantized SmolLM2 store gave wrong text (not "Paris"): refused until it is right
    from hermesd.errors import ConvertError

    with pytest.raises(ConvertError, match="use --dequantize"):
        convert(open_source(need(TINY["Q4_K_M"])), tmp_path / "bf16", dtype="bf16")
    assert not (tmp_path / "bf16").exists()


# ---- other architectures: files of random weights written here -----------------------------------

ARCHS = {
    # biases on q/k/v: QuantLinear keeps them as float parameters
    "qwen2": dict(context_length=128, block_count=2, feed_forward_length=128, embedding_length=64,
                  attention__head_count=4, attention__head_count_kv=2, attention__layer_norm_rms_epsilon=1e-6,
                  vocab_size=256, rope__freq_base=10000.0),
    # a scaled embedding (its own forward) tied to the head: both stay float, the rest quantized
    "gemma2": dict(context_length=128, block_count=2, feed_forward_length=128, embedding_length=64,
                   attention__key_length=16, attention__head_count=4, attention__head_count_kv=2,
                   attention__layer_norm_rms_epsilon=1e-6, attention__sliding_window=64, vocab_size=256),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_other_architectures_match_transformers(tmp_path: Path, arch: str) -> None:
    from gguf_support import TOKENS, kv_for, synthetic

    tokenizer = TOKENS | {"tokenizer__ggml__model": "llama", "tokenizer__ggml__scores": [0.0] * 256,
                          "tokenizer__ggml__token_type": [1] * 256}
    path = synthetic(tmp_path, arch, kv_for(arch, **ARCHS[arch]) | tokenizer)
    store = tmp_path / "store"
    convert(open_source(path), store)
    manifest = Manifest.load(store)
    assert {f for s in manifest.stages for f in s.quant_formats} == {"Q8_0"}
    if arch == "gemma2":  # de-quantized at convert: Gemma's embedding scales its output in its own forward
        assert not manifest.stage("model.embed_tokens").quant and not manifest.stage("lm_head").quant
        assert manifest.source["dequantized"] == ["model.embed_tokens.weight (Q8_0)"]
    else:
        layer = manifest.stage("model.layers.0")  # QuantLinear keeps q/k/v biases as float parameters
        assert "self_attn.q_proj" in layer.quant and layer.tensors["self_attn.q_proj.bias"].dtype == "F32"
    full = _reference(path)
    ids = torch.tensor([[1, 17, 200, 3, 45, 99, 128, 7]])
    with torch.inference_mode():
        want_logits, want_tokens = full(ids).logits, _greedy(full, ids, 8)
        with hermesd.load(store, prefetch=2) as engine:
            logits, tokens = engine.model(ids).logits, _greedy(engine.model, ids, 8)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, want_tokens)


# ---- QuantEmbedding on its own ------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quant_embedding_rows_are_ggmls_values(qtype: str) -> None:
    import dataclasses

    import gguf

    from hermesd.errors import ConvertError
    from hermesd.quant.qweight import from_gguf

    weights = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[qtype])
    qw = from_gguf(raw, qtype, (64, 256), packing="rowmajor")
    table = QuantEmbedding(qw.meta, device="meta")
    table.load_state_dict({name[1:]: t for name, t in qw.tensors("").items()}, assign=True)
    ids = torch.tensor([[3, 5, 3, 63, 0], [1, 1, 2, 62, 5]])
    want = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(64, 256))
    assert torch.equal(table(ids), want[ids])  # bit for bit, repeated ids included
    with pytest.raises(ConvertError, match="row-major"):
        QuantEmbedding(dataclasses.replace(qw.meta, packing="halves32"))
