"""GGML block decoders: de-quantizing our decoded codes and factors equals gguf's own, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf_support import TESTDATA as GGUF_DIR
from gguf_support import float_bits  # noqa: E402

from hermesd.errors import ConvertError  # noqa: E402
from hermesd.quant.ggml_blocks import (  # noqa: E402
    BLOCK_FORMATS,
    block_format,
    decode_blocks,
    decode_float,
    dequantize_blocks,
    row_bytes,
)

SIMPLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def _weights(n: int = 48, k: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    w[0] = 0.0  # an all-zero row: d == 0 blocks
    w[1, :32] = -w[1, :32]  # negative extremes: Q4_0/Q5_0 get negative d (and -0.0 values)
    return w


def kquant_tensors() -> list:
    """Every quantized tensor of the two shipped llama.cpp files (Q4_K, Q5_K and Q6_K)."""
    files = [GGUF_DIR / "tiny-llama-Q4_K_M.gguf", GGUF_DIR / "tiny-llama-Q5_K_M.gguf"]
    if not all(f.exists() for f in files):
        return []
    return [t for f in files for t in gguf.GGUFReader(str(f)).tensors if t.tensor_type.name in BLOCK_FORMATS]


KQUANTS = kquant_tensors()


def test_table_matches_gguf_sizes() -> None:
    for name, fmt in BLOCK_FORMATS.items():
        assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    assert row_bytes("Q4_K", 512) == 288 and row_bytes("F16", 10) == 20


@pytest.mark.parametrize("qtype", SIMPLE)
def test_simple_types_bit_exact(qtype: str) -> None:
    w = _weights()
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    got = dequantize_blocks(raw, qtype, w.shape[1])
    assert np.array_equal(float_bits(got), float_bits(expected))  # signed zeros included
    dec = decode_blocks(raw, qtype, w.shape[1])
    assert dec.codes.shape == w.shape and int(dec.codes.max()) < 1 << block_format(qtype).bits


@pytest.mark.skipif(not KQUANTS, reason="K-quant test files missing from ../shared/testdata/gguf")
def test_kquant_tensors_bit_exact() -> None:
    seen = set()
    for t in KQUANTS:
        k = int(t.shape[0])  # GGUF lists ne0 (K, the contiguous axis) first
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        got = dequantize_blocks(t.data, t.tensor_type, k)
        assert np.array_equal(float_bits(got), float_bits(expected)), t.name
        seen.add(t.tensor_type.name)
    assert seen == {"Q4_K", "Q5_K", "Q6_K"}


@pytest.mark.skipif(not KQUANTS, reason="K-quant test files missing from ../shared/testdata/gguf")
def test_kquant_factor_ranges() -> None:
    q6 = next(t for t in KQUANTS if t.tensor_type.name == "Q6_K")
    dec = decode_blocks(q6.data, "Q6_K", int(q6.shape[0]))
    assert dec.codes.max() <= 63 and dec.scales.dtype == np.int8 and dec.super_scales.shape[-1] == 1
    q4 = next(t for t in KQUANTS if t.tensor_type.name == "Q4_K")
    dec = decode_blocks(q4.data, "Q4_K", int(q4.shape[0]))
    assert dec.scales.max() <= 63 and dec.zeros.max() <= 63 and dec.codes.max() <= 15


def test_float_pass_through() -> None:
    w = _weights(4, 64)
    assert np.array_equal(decode_float(w.view(np.uint8), "F32", 64), w)
    assert np.array_equal(decode_float(w.astype(np.float16).view(np.uint8), "F16", 64), w.astype(np.float16))
    bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncation is a valid bf16 value
    assert np.array_equal(decode_float(bf16.view(np.uint8), "BF16", 64), (bf16.astype(np.uint32) << 16).view(np.float32))


def test_unsupported_type_and_bad_sizes() -> None:
    with pytest.raises(ConvertError, match="IQ2_XS"):
        block_format("IQ2_XS")
    with pytest.raises(ConvertError, match="whole number"):
        row_bytes("Q4_K", 100)
    with pytest.raises(ConvertError, match="whole number"):
        decode_blocks(np.zeros(19, np.uint8), "Q4_0", 32)
    with pytest.raises(ConvertError, match="not a float"):
        decode_float(np.zeros(4, np.uint8), "Q4_0", 32)
