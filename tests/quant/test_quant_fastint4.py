"""hermesd's own int4 kernel (hermesd/quant/native/q4gemm.c) against the exact fp32 product.

It reads the codes and bf16 scale/zero table a kernel-ready store holds, so the reference is the
de-quantized stored weight times fp32 activations; the kernel keeps the activations in fp32, so it
must agree to fp32 accuracy (torch's kernel, which rounds activations to bf16, errs ~3e-3).
"""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from hermesd.quant import fastint4
from hermesd.quant.cpu import cpu_flags
from hermesd.quant.int4pack import native_tag
from hermesd.quant.kernels import prepare_int4, with_kernel_table
from hermesd.quant.linear import QuantLinear
from hermesd.quant.quantizer import quantize

X86_AVX2 = platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= cpu_flags()
needs_kernel = pytest.mark.skipif(not (fastint4.available() and native_tag() == fastint4.LAYOUT),
                                  reason="hermesd's int4 kernel runs only on x86 with AVX2+FMA, where torch "
                                         "packs int4 codes as halves32 (and where the extension was built)")


def stored_int4(n: int, k: int, group: int, seed: int = 0):
    """An int4 weight as ``convert --quantize int4`` stores it: kernel layout, bf16 table."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    return with_kernel_table(quantize(w, "int4", group), torch.bfloat16)


@pytest.mark.skipif(not (X86_AVX2 and shutil.which("cc")), reason="needs x86 with AVX2+FMA and a C compiler")
def test_the_extension_was_built_where_it_can_be():
    # setup.py marks the extension optional, so a failed build would only print a warning: catch it here
    assert fastint4.available(), "hermesd/quant/_q4gemm was not built: run `pip install -e .` and read its output"


@needs_kernel
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 17])
def test_matches_the_exact_fp32_product(rows, group):
    stored = stored_int4(96, 512, group)
    prep = prepare_int4(stored, torch.bfloat16)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(1))
    exact = x.double() @ stored.dequantize(torch.float32).double().t()
    y = fastint4.int4_gemm(x, prep.packed, prep.scales, group)
    assert y is not None and y.dtype == torch.float32 and y.shape == (rows, 96)
    rel = ((y.double() - exact).norm() / exact.norm()).item()
    assert rel < 1e-6, rel


@needs_kernel
def test_shapes_it_does_not_take_are_left_to_torch():
    stored = stored_int4(64, 256, 32)
    prep = prepare_int4(stored, torch.bfloat16)
    x = torch.randn(1, 256)
    assert fastint4.int4_gemm(torch.randn(fastint4.MAX_ROWS + 1, 256), prep.packed, prep.scales, 32) is None
    assert fastint4.int4_gemm(x, prep.packed, prep.scales.float(), 32) is None  # fp32 table (aarch64 stores)
    odd = prepare_int4(stored_int4(48, 256, 32), torch.bfloat16)  # 48 rows: torch packs the tail differently
    assert fastint4.int4_gemm(x, odd.packed, odd.scales, 32) is None


@needs_kernel
def test_quant_linear_takes_it_for_one_token():
    stored = stored_int4(128, 1024, 32)
    module = QuantLinear.from_quantized(stored)
    x = torch.randn(1, 1, 1024)
    exact = x.double() @ stored.dequantize(torch.float32).double().t()
    y = module(x)
    assert y.dtype == torch.float32
    # fp32 accuracy: torch's bf16 kernel would be ~1e-3 off here, so this also shows which kernel ran
    assert ((y.double() - exact).norm() / exact.norm()).item() < 1e-6


def quant_meta(fmt: str, n: int, k: int):
    """The meta of an ``n`` x ``k`` weight in format ``fmt`` (int4: ours; Q4_0: a GGUF block format)."""
    from hermesd.quant.qweight import QuantMeta

    return QuantMeta(format=fmt, shape=(n, k), bits=4, group_size=32, affine=fmt == "int4")


@needs_kernel
def test_narrow_own_int4_linears_take_the_kernel_and_gguf_ones_stay_exact():
    from hermesd.store.quantized import takes_kernel

    assert takes_kernel(quant_meta("int4", 256, 2048))  # TinyLlama's key/value projections
    assert takes_kernel(quant_meta("int4", 5632, 2048)) and takes_kernel(quant_meta("Q4_0", 5632, 2048))
    assert not takes_kernel(quant_meta("Q4_0", 256, 2048))  # GGUF: kernel tables round scales to bf16
    assert not takes_kernel(quant_meta("int4", 96, 2048))  # 96 outputs: not whole blocks of 32
    assert not takes_kernel(quant_meta("int4", 1536, 576))  # few inputs: the exact path, as before
    assert not takes_kernel(quant_meta("int4", 64, 1024))  # too small to matter


@needs_kernel
def test_a_narrow_stored_linear_decodes_on_the_kernel_exactly():
    from hermesd.store.quantized import linear_policy, stored_meta, to_stored

    weight = quantize(torch.randn(256, 2048, generator=torch.Generator().manual_seed(3)) * 0.02, "int4", 32)
    meta = stored_meta(weight.meta)
    assert meta.table == "bfloat16"  # convert writes it kernel-ready
    stored = to_stored(weight, meta)
    module = QuantLinear.from_quantized(stored, policy=linear_policy(meta, torch.float32))
    x = torch.randn(1, 1, 2048)
    exact = x.double() @ stored.dequantize(torch.float32).double().t()
    y = module(x)
    assert module._prepared is not None  # the kernel path (de-quantizing prepares nothing)
    assert ((y.double() - exact).norm() / exact.norm()).item() < 1e-6
