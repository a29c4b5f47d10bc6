"""Compute paths of a quantized Linear: torch's integer CPU kernels and de-quantize + ``F.linear``.

Paths (``x2`` is the input as ``[M, K]``):

* ``int8``: our per-row int8 with ``torch._weight_int8pack_mm`` (codes used as stored, zero-copy).
* ``int4``: 4-bit group formats (Q4_0, Q4_1, Q4_K, int4) with ``aten._weight_int4pack_mm_for_cpu``;
  codes converted to the machine's kernel layout at prepare time (optionally in place).
* ``int4x2``: 5..8-bit group formats (Q5_0, Q5_1, Q5_K, Q8_0): each code split as ``16*h + l``
  into two 4-bit planes stacked along N, so one int4 call computes both halves.
* ``dense``: everything else and large M: de-quantize a few MiB of rows at a time into a reused
  scratch buffer and multiply with ``F.linear`` (Q6_K's 16-wide groups always end up here).

The integer kernels take scales in the activation dtype (bf16 on x86), so those paths differ from
the exact fp32 de-quantization by bf16 rounding of scale/zero and of the activations.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hermesd.quant import fastint4
from hermesd.quant.cpu import KernelPolicy
from hermesd.quant.dequant import dequantize_into, group_factors
from hermesd.quant.int4pack import ROWMAJOR, int4_kernel_available, native_tag, pack_nibbles, repack, to_kernel_layout
from hermesd.quant.qweight import TABLE_VERSION, QuantizedWeight, QuantMeta

INT4_GROUPS = (32, 64, 128, 256)
DENSE, INT8, INT4, INT4X2 = "dense", "int8", "int4", "int4x2"


def int8_kernel_available() -> bool:
    """Whether this torch build has ``torch._weight_int8pack_mm``."""
    return hasattr(torch, "_weight_int8pack_mm")


def kernel_path(meta: QuantMeta, policy: KernelPolicy) -> str:
    """The integer-kernel path a weight can take for small M, or ``dense`` when none fits."""
    n, k = meta.shape
    if policy.kernel_max_m <= 0:
        return DENSE
    if meta.format == "int8" and meta.group_size == k:
        return INT8 if int8_kernel_available() else DENSE
    if meta.group_size not in INT4_GROUPS or meta.super_block and 256 % meta.group_size:
        return DENSE
    if not int4_kernel_available() or k % meta.group_size:
        return DENSE
    if meta.bits == 4 and n % 16 == 0:
        return INT4
    if 5 <= meta.bits <= 8 and policy.use_int4x2 and n % 8 == 0:
        return INT4X2
    return DENSE


def prepared_bytes(meta: QuantMeta, policy: KernelPolicy) -> int:
    """Memory that :func:`prepare` adds beside the stored tensors while a weight is bound.

    int4: the ``[groups, N, 2]`` scale/zero table in the kernel's dtype (a quarter of the codes for
    groups of 32 in bf16), plus a copy of the codes when they are not stored in this CPU's kernel
    layout; int4x2: both planes and their tables; int8: the scales in the kernel's dtype.
    """
    path = kernel_path(meta, policy)
    n, k = meta.shape
    item = policy.kernel_dtype.itemsize
    if path == INT8:
        return n * item
    if path == INT4:
        copy = n * k // 2 if meta.packing != native_tag() else 0
        stored_table = meta.table == str(policy.kernel_dtype).removeprefix("torch.")
        return (0 if stored_table else meta.groups * n * 2 * item) + copy
    if path == INT4X2:
        # a weight stored in bit planes also unpacks to n*k byte codes while preparing (transient)
        return n * k + 2 * meta.groups * n * 2 * item
    return 0


@dataclass
class Prepared:
    """Kernel-ready tensors of one weight and the packing its bound ``qweight`` bytes now have."""

    path: str
    packed: torch.Tensor
    scales: torch.Tensor  # int8: [N]; int4 paths: [groups, N or 2N, 2] (scale, zero)
    bound_packing: str = ROWMAJOR  # differs from the stored packing after an in-place conversion


def _int4_scale_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[groups, N, 2]`` in the kernel's dtype: the kernel computes ``(q - 8) * scale + zero``."""
    return torch.stack([scale.t(), zero.t()], dim=-1).to(dtype)


def kernel_table(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The int4 kernel's ``[groups, N, 2]`` (scale, zero) table in ``dtype``: the stored one when the
    store was made with it (no work), else computed from the format's own scales and zeros."""
    if qw.meta.table:
        return qw.scales if qw.scales.dtype == dtype else qw.scales.to(dtype)
    scale, zero = group_factors(qw)
    # ours is s*(q - offset) or s*q + z; the kernel's (q - 8)*s + z' needs z' = z + 8s (or 0 when offset is 8)
    shift = 8 - qw.meta.code_offset
    kzero = (zero if zero is not None else torch.zeros_like(scale)) + shift * scale
    return _int4_scale_zeros(scale, kzero, dtype)


def with_kernel_table(qw: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
    """``qw`` stored kernel-ready: codes in this CPU's int4 layout and the scale/zero table in ``dtype``
    in place of the format's scales/zeros, so binding the stored tensors is all a decode step needs.

    The table rounds scale and zero to ``dtype`` (bf16 on x86) exactly as the kernel would at every
    load; de-quantizing for prompts then reads the same rounded values, so both paths agree.
    """
    table = kernel_table(qw, dtype).contiguous()
    meta = dataclasses.replace(qw.meta, affine=True, code_offset=8, super_block=0, version=TABLE_VERSION,
                               table=str(dtype).removeprefix("torch."))
    return QuantizedWeight(meta, qw.qweight, table).repacked("native")


def prepare_int4(qw: QuantizedWeight, dtype: torch.dtype, inplace: bool = False) -> Prepared:
    """Kernel layout + scale/zero table for a 4-bit format.

    Codes already stored in this CPU's kernel layout are used as they are (no copy); others are
    re-packed, into ``qw.qweight`` itself when ``inplace``.
    """
    table = kernel_table(qw, dtype)
    stored, target = qw.meta.packing, native_tag()
    if target == ROWMAJOR:  # a layout we cannot reproduce: torch's own (slow) converter, on a copy
        packed = to_kernel_layout(repack(qw.qweight, stored, ROWMAJOR), layout=None)
        return Prepared(INT4, packed, table, stored)
    packed = repack(qw.qweight, stored, target, out=qw.qweight if inplace else None)
    return Prepared(INT4, packed, table, target if packed is qw.qweight else stored)


def prepare_int4x2(qw: QuantizedWeight, dtype: torch.dtype) -> Prepared:
    """Split 5..8-bit codes ``c = 16*h + l`` into two 4-bit planes, stacked as rows ``[h; l]``.

    High plane: code ``h + 8`` (signed codes) or ``h`` (unsigned), scale ``16 s``, zero 0 or
    ``128 s``; low plane: code ``l``, scale ``s``, zero ``8 s + z``. Every zero except the affine
    low one is a power-of-two multiple of ``s``, so no large terms cancel.
    """
    codes = qw.byte_codes()
    signed = codes.dtype == torch.int8
    high = (codes >> 4).to(torch.int16) + (8 if signed else 0)
    low = codes & 0x0F
    planes = torch.cat([pack_nibbles(high.to(torch.uint8)), pack_nibbles(low.to(torch.uint8))])
    scale, zero = group_factors(qw)
    zero = zero if zero is not None else torch.zeros_like(scale)
    hi_zero = torch.zeros_like(scale) if signed else 128 * scale
    sz = torch.cat([_int4_scale_zeros(16 * scale, hi_zero, dtype),
                    _int4_scale_zeros(scale, 8 * scale + zero, dtype)], dim=1)
    return Prepared(INT4X2, to_kernel_layout(planes, out=planes), sz, qw.meta.packing)


def prepare(qw: QuantizedWeight, path: str, dtype: torch.dtype, inplace: bool = False) -> Prepared:
    """Kernel-ready tensors for ``path`` (``int8`` binds the stored codes as they are)."""
    if path == INT8:
        return Prepared(INT8, qw.qweight, qw.scales.reshape(-1).to(dtype), qw.meta.packing)
    if path == INT4:
        return prepare_int4(qw, dtype, inplace)
    if path == INT4X2:
        return prepare_int4x2(qw, dtype)
    raise ValueError(f"no kernel preparation for path {path!r}")


def run_kernel(x2: torch.Tensor, prep: Prepared, group_size: int) -> torch.Tensor:
    """``x2 @ W.T`` with an integer kernel: our own for int4 where it applies (fp32 activations, fp32
    result), else torch's, with ``x2`` rounded to ``prep.scales.dtype`` (the result in that dtype)."""
    if prep.path == INT4 and native_tag() == fastint4.LAYOUT:
        y = fastint4.int4_gemm(x2, prep.packed, prep.scales, group_size)
        if y is not None:
            return y
    x2 = x2.to(prep.scales.dtype).contiguous()
    if prep.path == INT8:
        return torch._weight_int8pack_mm(x2, prep.packed, prep.scales)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, prep.packed, group_size, prep.scales)
    if prep.path == INT4X2:
        n = y.shape[1] // 2
        return y[:, :n] + y[:, n:]
    return y


_scratch = threading.local()


def scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, reused across calls (one per thread and dtype)."""
    pool: dict[torch.dtype, torch.Tensor] = getattr(_scratch, "pool", None) or {}
    _scratch.pool = pool
    buf = pool.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = pool[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def release_scratch() -> None:
    """Drop this thread's scratch buffers (they are as large as the largest weight chunk)."""
    _scratch.pool = {}


def _rows_view(qw: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    """The stored tensors of rows ``start:stop`` (all are row-major along N)."""
    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[start:stop]

    if qw.meta.table:  # the table is [groups, N, 2]: its rows are taken by the caller's factors
        meta = dataclasses.replace(qw.meta, shape=(stop - start, qw.meta.shape[1]))
        return QuantizedWeight(meta, rows(qw.qweight), qw.scales[:, start:stop])  # type: ignore[arg-type]

    meta = dataclasses.replace(qw.meta, shape=(stop - start, qw.meta.shape[1]))
    return QuantizedWeight(meta, rows(qw.qweight), rows(qw.scales), rows(qw.zeros), rows(qw.super_scales),  # type: ignore[arg-type]
                           rows(qw.qhigh))


def run_dense(x2: torch.Tensor, qw: QuantizedWeight, policy: KernelPolicy,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """De-quantize row chunks into scratch and ``F.linear`` each (in ``policy.dense_dtype``).

    4-bit codes in a kernel layout (``qw.meta.packing``) are converted back chunk by chunk; chunks
    are multiples of 64 rows, so they hold whole kernel blocks.
    """
    n, k = qw.meta.shape
    dtype = policy.dense_dtype
    x2 = x2.to(dtype)
    rows = max(64, policy.dense_chunk_bytes // (k * dtype.itemsize) // 64 * 64)
    scale, zero = group_factors(qw)
    out = torch.empty(x2.shape[0], n, dtype=dtype) if rows < n else None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        part = _rows_view(qw, start, stop)
        codes = None
        if qw.meta.bits == 4 and qw.meta.packing != ROWMAJOR:
            buf = scratch(part.qweight.numel(), torch.uint8).view_as(part.qweight)
            codes = repack(part.qweight, qw.meta.packing, ROWMAJOR, out=buf)
        w = scratch((stop - start) * k, dtype).view(stop - start, k)
        factors = (scale[start:stop], None if zero is None else zero[start:stop])
        dequantize_into(part, w, codes=codes, factors=factors)
        y = F.linear(x2, w, None if bias is None else bias[start:stop].to(dtype))
        if out is None:
            return y
        out[:, start:stop] = y
    assert out is not None
    return out
