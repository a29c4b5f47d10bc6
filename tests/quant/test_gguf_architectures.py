"""The other architectures' fix-ups, on GGUF files of random weights written by the tests.

Weights are random under the names and stored shapes llama.cpp uses; transformers' load of the same
file is the reference, so each case checks our port of that architecture's row or value transform.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_support import TOKENS, assert_matches_transformers, descriptions, kv_for, synthetic

from hermesd.errors import UnsupportedModelError
from hermesd.quant.gguf_file import open_gguf


def test_gemma2_norms_minus_one(tmp_path: Path) -> None:
    kv = kv_for("gemma2", context_length=128, block_count=2, feed_forward_length=128, embedding_length=64,
             attention__key_length=16, attention__head_count=4, attention__head_count_kv=2,
             attention__layer_norm_rms_epsilon=1e-6, attention__sliding_window=64, vocab_size=256)
    model_file = assert_matches_transformers(synthetic(tmp_path, "gemma2", kv))
    assert ("norm weight minus 1", "F32") in descriptions(model_file)
    assert model_file.tied == {"lm_head.weight": "model.embed_tokens.weight"}


def test_bloom_qkv_rows_interleaved_on_blocks(tmp_path: Path) -> None:
    kv = kv_for("bloom", block_count=2, embedding_length=64, attention__head_count=4, vocab_size=256,
             attention__layer_norm_epsilon=1e-5, feed_forward_length=256, context_length=128)
    model_file = assert_matches_transformers(synthetic(tmp_path, "bloom", kv))
    # the weight keeps its Q8_0 blocks; the F32 bias gets the same order element by element
    assert {("q/k/v rows interleaved per head", "Q8_0"), ("q/k/v rows interleaved per head", "F32")} <= \
        descriptions(model_file)


def test_qwen2moe_gate_and_up_experts_joined_on_blocks(tmp_path: Path) -> None:
    kv = kv_for("qwen2moe", context_length=128, block_count=2, feed_forward_length=128, embedding_length=64,
             attention__head_count=4, attention__head_count_kv=2, attention__layer_norm_rms_epsilon=1e-6,
             vocab_size=256, expert_count=4, expert_used_count=2, rope__freq_base=10000.0)

    def stored(name: str, shape: tuple[int, ...]) -> list:
        if name.endswith(("ffn_gate_exps", "ffn_up_exps")):  # one [E, I, H] each, joined into [E, 2I, H]
            return [(name + ".weight", (shape[0], shape[1] // 2, shape[2]))]
        if name.endswith("_exps"):
            return [(name + ".weight", shape)]
        return [(name, shape[1:] if "gate_inp_shexp" in name else shape)]  # stored 1-D, loaded [1, H]

    model_file = assert_matches_transformers(synthetic(tmp_path, "qwen2moe", kv, stored))
    joined = model_file.tensor("model.layers.0.mlp.experts.gate_up_proj")
    assert (joined.ggml_type, joined.shape) == ("Q8_0", (4, 2 * 1408, 64))


def test_gpt2_transposes_need_dequantize(tmp_path: Path) -> None:
    kv = kv_for("gpt2", context_length=128, block_count=2, feed_forward_length=256, embedding_length=64,
             attention__head_count=4, attention__layer_norm_epsilon=1e-5) | TOKENS
    transposed = ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")

    def stored(name: str, shape: tuple[int, ...]) -> list:
        return [(name, shape[::-1] if any(part in name for part in transposed) else shape)]

    path = synthetic(tmp_path, "gpt2", kv, stored)
    with pytest.raises(UnsupportedModelError, match=r"gpt2\.gguf: 8 quantized tensor\(s\) need a value-level "
                       r"transform .*transformer\.h\.0\.attn\.c_attn\.weight \(Q8_0\): transposed.*dequantize=True"):
        open_gguf(path)
    model_file = assert_matches_transformers(path, dequantize=True)
    assert len(model_file.dequantized) == 8
    assert ("de-quantized to F32, then transposed", "F32") in descriptions(model_file)
    f16 = assert_matches_transformers(synthetic(tmp_path, "gpt2", kv, stored, quantized="F16"))
    assert ("transposed", "F16") in descriptions(f16) and not f16.dequantized  # floats transpose exactly


def test_mamba_log_a_and_conv_reshape(tmp_path: Path) -> None:
    kv = kv_for("mamba", context_length=128, block_count=2, embedding_length=64, vocab_size=256,
             attention__layer_norm_rms_epsilon=1e-5, ssm__conv_kernel=4, ssm__state_size=16,
             ssm__time_step_rank=4, ssm__inner_size=128)

    def stored(name: str, shape: tuple[int, ...]) -> list:
        return [(name, (shape[0], shape[2]) if "ssm_conv1d.weight" in name else shape)]

    model_file = assert_matches_transformers(synthetic(tmp_path, "mamba", kv, stored, negative="ssm_a"))
    assert ("log(-A)", "F32") in descriptions(model_file)


def test_lfm2_through_the_conversion_mapping(tmp_path: Path) -> None:
    kv = kv_for("lfm2", context_length=128, block_count=4, embedding_length=64, feed_forward_length=128,
             attention__head_count=4, attention__head_count_kv=[0, 2, 0, 2], attention__layer_norm_rms_epsilon=1e-5,
             shortconv__l_cache=3, rope__freq_base=10000.0) | TOKENS

    def stored(name: str, shape: tuple[int, ...]) -> list:
        return [(name, (shape[0], shape[2]) if "shortconv.conv.weight" in name else shape)]

    model_file = assert_matches_transformers(synthetic(tmp_path, "lfm2", kv, stored, native=True))
    assert ("Unsqueeze", "F32") in descriptions(model_file)


def test_qwen35_value_heads_reordered_on_blocks(tmp_path: Path) -> None:
    """Rows of value heads move on Q8_0 blocks; out_proj's column reorder needs values."""
    kv = kv_for("qwen35", context_length=128, block_count=2, embedding_length=64, feed_forward_length=128,
             attention__head_count=4, attention__head_count_kv=2, attention__key_length=16,
             attention__layer_norm_rms_epsilon=1e-6, full_attention_interval=2, ssm__conv_kernel=4,
             ssm__state_size=32, ssm__group_count=2, ssm__time_step_rank=4, ssm__inner_size=128,
             rope__freq_base=10000.0, rope__dimension_sections=[2, 1, 1, 0], rope__dimension_count=8) | TOKENS

    def stored(name: str, shape: tuple[int, ...]) -> list:
        return [(name, (shape[0], shape[2]) if "ssm_conv1d" in name else shape)]

    path = synthetic(tmp_path, "qwen35", kv, stored, negative="ssm_a", native=True)
    with pytest.raises(UnsupportedModelError, match=r"linear_attn\.out_proj\.weight \(Q8_0\): TiledToGroupedInputs"):
        open_gguf(path)
    model_file = assert_matches_transformers(path, dequantize=True)
    assert {("TiledToGroupedRows", "Q8_0"), ("SubtractOne", "F32"), ("LogNegate, TiledToGroupedRows", "F32"),
            ("de-quantized to F32, then TiledToGroupedInputs", "F32")} <= descriptions(model_file)
