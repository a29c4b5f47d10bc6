"""A quantized store with TinyLlama-wide layers (2048 x 2048): streamed and resident give identical logits and tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bench.quantized as quantized_bench
import hermesd
from hermesd.store.convert import convert, open_source

# One Llama block with TinyLlama's width (2048 x 2048 Linears), a small vocabulary.
WIDE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 2048, "num_hidden_layers": 1, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wide")
    config = root / "config.json"
    config.write_text(json.dumps(WIDE))
    original = quantized_bench.CONFIG
    quantized_bench.CONFIG = config
    try:
        quantized_bench._write_gguf(root / "wide.gguf", "Q4_0")
    finally:
        quantized_bench.CONFIG = original
    convert(open_source(root / "wide.gguf"), root / "store")
    return root / "store"


def test_wide_layers_streamed_equal_resident(wide_store: Path):
    ids = torch.arange(3, 35)[None, :]
    results = {}
    for label, options in (("resident", {"resident": "all"}), ("streamed", {"prefetch": 2})):
        with hermesd.load(wide_store, **options) as engine, torch.inference_mode():
            prompt = engine.model(ids).logits[0]
            tokens = engine.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
            results[label] = (prompt, tokens)
    assert torch.equal(results["resident"][0], results["streamed"][0])
    assert torch.equal(results["resident"][1], results["streamed"][1])
