"""Large quantized layers decode on torch's integer kernels; streamed and resident stay identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bench.quantized as quantized_bench
import hermesd
from hermesd.quant.int4pack import int4_kernel_available
from hermesd.quant.linear import QuantLinear
from hermesd.store.convert import convert, open_source
from hermesd.store.quantized import KERNEL_MIN_WEIGHTS, store_policy

# One Llama block whose Linears reach KERNEL_MIN_WEIGHTS (2048 x 2048), with a small vocabulary.
WIDE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 2048, "num_hidden_layers": 1, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def test_the_policy_takes_kernels_for_large_layers_only():
    assert store_policy(torch.float32, KERNEL_MIN_WEIGHTS).kernel_max_m > 0
    assert store_policy(torch.float32, KERNEL_MIN_WEIGHTS - 1).kernel_max_m == 0  # exact path: small layers


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


@pytest.mark.skipif(not int4_kernel_available(), reason="torch has no CPU int4 kernel on this machine")
def test_large_layers_decode_on_the_int4_kernel_and_streamed_equals_resident(wide_store: Path):
    ids = torch.arange(3, 35)[None, :]
    results = {}
    for label, options in (("resident", {"resident": "all"}), ("streamed", {"prefetch": 2})):
        with hermesd.load(wide_store, **options) as engine, torch.inference_mode():
            paths = {m.small_m_path() for m in engine.model.modules() if isinstance(m, QuantLinear)
                     and m.in_features * m.out_features >= KERNEL_MIN_WEIGHTS}
            prompt = engine.model(ids).logits[0]
            tokens = engine.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
            results[label] = (prompt, tokens)
        assert paths == {"int4"}, paths
    assert torch.equal(results["resident"][0], results["streamed"][0])
    assert torch.equal(results["resident"][1], results["streamed"][1])
