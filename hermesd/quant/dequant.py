"""De-quantization of stored weights to float, in torch, into a caller's buffer when it has one."""

from __future__ import annotations

import torch

from hermesd.quant.int4pack import ROWMAJOR, repack, unpack_nibbles

# ``qw`` arguments are ``hermesd.quant.qweight.QuantizedWeight``s. Not imported: ``QuantizedWeight.dequantize``
# imports this module, and the package keeps its import graph acyclic (tests/test_layout.py).
QuantizedWeight = "hermesd.quant.qweight.QuantizedWeight"


def group_factors(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 ``scale`` and ``zero`` ``[N, K/group]`` (``zero`` is None for symmetric formats).

    K-quants multiply the integer sub-scale by the fp16 super-block scale in fp32, as ggml does;
    the product has at most 18 significant bits, so it is exact.
    """
    meta = qw.meta
    n, groups = meta.shape[0], meta.groups
    if meta.table:  # the kernel's [groups, N, 2] table: w = scale * (q - 8) + zero
        table = qw.scales.to(torch.float32)
        return table[..., 0].t(), table[..., 1].t()
    scale = qw.scales.to(torch.float32)
    sup = None
    if meta.super_block:
        assert qw.super_scales is not None
        sup = qw.super_scales.to(torch.float32)
        per = meta.super_block // meta.group_size
        scale = (scale.view(n, -1, per) * sup[..., 0:1]).view(n, groups)
    if not meta.affine:
        return scale, None
    assert qw.zeros is not None
    zero = qw.zeros.to(torch.float32)
    if sup is not None:
        per = meta.super_block // meta.group_size
        zero = -(zero.view(n, -1, per) * sup[..., 1:2]).view(n, groups)
    return scale, zero


def codes_into(qw: QuantizedWeight, out: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
    """Write the (centred, for symmetric formats) codes of ``qw`` as floats into ``out[N, K]``.

    ``codes`` replaces ``qw.qweight`` when the caller already holds them row-major (4-bit codes
    stored in a kernel layout are otherwise converted back here).
    """
    meta = qw.meta
    if codes is None and meta.bits == 4:
        codes = qw.qweight
        if meta.packing != ROWMAJOR:
            codes = repack(codes, meta.packing, ROWMAJOR)
    if meta.bits == 4:
        unpack_nibbles(codes, out=out)
    else:
        out.copy_(qw.byte_codes() if codes is None else codes)
    if meta.code_offset:  # exact: small integers
        out.sub_(meta.code_offset)
    return out


def dequantize_into(qw: QuantizedWeight, out: torch.Tensor, codes: torch.Tensor | None = None,
                    factors: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """De-quantize into ``out`` (``[N, K]``, fp32 for exact values; bf16 rounds once per op).

    Symmetric formats compute ``scale * q`` and affine ones ``scale * q + zero``: the product is
    exact in fp32, so the values equal ggml's bit for bit, signed zeros included.
    """
    n, k = qw.meta.shape
    scale, zero = factors if factors is not None else group_factors(qw)
    codes_into(qw, out, codes)
    grouped = out.view(n, scale.shape[1], k // scale.shape[1])
    grouped.mul_(scale.to(out.dtype).unsqueeze(-1))
    if zero is not None:
        grouped.add_(zero.to(out.dtype).unsqueeze(-1))
    return out


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight ``[N, K]``: computed in fp32, then cast to ``dtype`` when that differs."""
    buf = out if out is not None and out.dtype == torch.float32 else torch.empty(qw.meta.shape, dtype=torch.float32)
    dequantize_into(qw, buf)
    if dtype == torch.float32:
        return buf
    return out.copy_(buf) if out is not None else buf.to(dtype)
