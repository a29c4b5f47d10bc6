"""4-bit code packing: the portable row-major layout and torch's (ISA-dependent) CPU int4 kernel layout.

Row-major layout (``rowmajor``): ``uint8[N, K/2]``, byte ``j`` of row ``n`` holds code ``(n, 2j)`` in
its low nibble and ``(n, 2j+1)`` in its high nibble, the same on every machine.

Kernel layout: what ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` produces and
``_weight_int4pack_mm_for_cpu`` reads. It depends on the CPU capability torch dispatches to at run
time (``aten/src/ATen/native/cpu/int4mm_kernel.cpp``, ``weight_to_int4pack_kernel``): rows are cut
into blocks of ``BLOCK_N = 4 * Vectorized<float>::size()`` (64 on AVX-512, 32 on AVX2, 16 on NEON);
each block is stored K-major, one group of ``nb/2`` bytes per k, and within it AVX-512/AVX2 pair
row ``d`` with row ``d + BLOCK_N/2`` (low/high nibble) while the generic path, and every short tail
block, pairs rows ``2i`` and ``2i+1``. Kernel-packed bytes from one machine are therefore garbage on
another. A store records its packing as a tag (``rowmajor``, ``halves32``, ``halves64``,
``pairs16`` ...); :func:`repack` converts between any two, in place if asked, and the layout of this
machine is found at first use by matching torch's own converter (:func:`kernel_layout`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from hermesd.errors import ConvertError

ROWMAJOR = "rowmajor"
_CHUNK_BYTES = 256 * 1024  # convert a few blocks at a time: the working set stays in L2


@dataclass(frozen=True)
class KernelLayout:
    """How torch's int4 kernel arranges one block of ``block_n`` rows (``halves`` or ``pairs``)."""

    block_n: int
    style: str

    @property
    def tag(self) -> str:
        """Short name recorded with converted tensors, e.g. ``halves32`` on AVX2."""
        return f"{self.style}{self.block_n}"


def layout_from_tag(tag: str) -> KernelLayout | None:
    """The :class:`KernelLayout` a packing tag names; ``None`` for ``rowmajor``."""
    if tag == ROWMAJOR:
        return None
    match = re.fullmatch(r"(halves|pairs)(16|32|64)", tag)
    if not match:
        raise ConvertError(f"unknown 4-bit packing {tag!r}")
    return KernelLayout(int(match.group(2)), match.group(1))


def native_tag() -> str:
    """Packing tag of this machine's int4 kernel (``rowmajor`` when it has none we can reproduce)."""
    layout = kernel_layout()
    return layout.tag if layout is not None else ROWMAJOR


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Row-major packing of 4-bit codes ``uint8[N, K]`` (values 0..15) into ``uint8[N, K/2]``."""
    if codes.shape[-1] % 2:
        raise ConvertError(f"cannot pack an odd number ({codes.shape[-1]}) of 4-bit codes per row")
    pairs = codes.reshape(*codes.shape[:-1], -1, 2).to(torch.uint8)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``uint8[N, K/2]`` to codes ``[N, K]`` (into ``out`` if given)."""
    n, half = packed.shape
    if out is None:
        out = torch.empty(n, half * 2, dtype=torch.uint8)
    view = out.view(n, half, 2)
    view[..., 0].copy_(packed & 0x0F)  # copy_ also widens to out's dtype (int32 for torch's packer)
    view[..., 1].copy_(packed >> 4)
    return out


def _split_rows(rows: torch.Tensor, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows whose codes go to the low and to the high nibble of a kernel byte."""
    if style == "pairs":
        return rows[..., 0::2, :], rows[..., 1::2, :]
    half = rows.shape[-2] // 2
    return rows[..., :half, :], rows[..., half:, :]


def _pack_blocks(src: torch.Tensor, dst: torch.Tensor, style: str) -> None:
    """Row-major ``src[nb, b, K/2]`` to kernel-layout ``dst[nb, K/2, 2, b/2]`` (whole blocks)."""
    lo, hi = _split_rows(src, style)
    # code (r, 2j) is the low nibble of byte j, code (r, 2j+1) the high one; the kernel byte for
    # column k puts the low-half row's code in its low nibble and the high-half row's above it.
    dst[:, :, 0, :].copy_(((lo & 0x0F) | (hi << 4)).transpose(1, 2))
    dst[:, :, 1, :].copy_(((lo >> 4) | (hi & 0xF0)).transpose(1, 2))


def _unpack_blocks(src: torch.Tensor, dst: torch.Tensor, style: str) -> None:
    """Inverse of :func:`_pack_blocks`: kernel ``src[nb, K/2, 2, b/2]`` to row-major ``dst[nb, b, K/2]``."""
    even, odd = src[:, :, 0, :].transpose(1, 2), src[:, :, 1, :].transpose(1, 2)
    lo, hi = _split_rows(dst, style)
    lo.copy_((even & 0x0F) | (odd << 4))
    hi.copy_((even >> 4) | (odd & 0xF0))


def _convert_piece(src: torch.Tensor, dst: torch.Tensor, rows: int, half: int, block: int,
                   style: str, to_kernel: bool) -> None:
    """Convert ``rows`` rows (whole blocks of ``block`` rows) from flat ``src`` into flat ``dst``."""
    nb = rows // block
    if to_kernel:
        _pack_blocks(src.view(nb, block, half), dst.view(nb, half, 2, block // 2), style)
    else:
        _unpack_blocks(src.view(nb, half, 2, block // 2), dst.view(nb, block, half), style)


def _convert(src: torch.Tensor, layout: KernelLayout, out: torch.Tensor, to_kernel: bool) -> torch.Tensor:
    """Convert block by block; each block keeps its byte range, so ``out`` may be ``src`` itself."""
    n, half = src.shape
    block = layout.block_n
    in_place = out.data_ptr() == src.data_ptr()
    flat_src, flat_out = src.reshape(-1), out.reshape(-1)
    step = max(1, _CHUNK_BYTES // (block * half)) * block
    full = n - n % block
    # whole blocks in chunks of a few hundred KiB, then the short tail (always paired rows)
    pieces = [(start, min(step, full - start), block, layout.style) for start in range(0, full, step)]
    if n > full:
        pieces.append((full, n - full, n - full, "pairs"))
    for start, rows, b, style in pieces:
        span = slice(start * half, (start + rows) * half)
        # the converters read the source twice, so an in-place chunk needs a private copy first
        piece = flat_src[span].clone() if in_place else flat_src[span]
        _convert_piece(piece, flat_out[span], rows, half, b, style, to_kernel)
    return out


def _check_shape(packed: torch.Tensor) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2 or not packed.is_contiguous():
        raise ConvertError("int4 codes must be a contiguous uint8 [N, K/2] tensor")
    if packed.shape[0] % 16:
        raise ConvertError(f"torch's int4 kernel needs N divisible by 16, got N={packed.shape[0]}")


def to_kernel_layout(packed: torch.Tensor, layout: KernelLayout | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Row-major nibbles ``uint8[N, K/2]`` to the kernel layout of this machine.

    ``out`` may be ``packed`` itself (in-place conversion of a stage buffer); otherwise a new tensor.
    """
    _check_shape(packed)
    layout = layout or kernel_layout()
    if layout is None:  # unknown packing: fall back to torch's converter (slow, never in place)
        return _torch_convert(packed)
    return _convert(packed, layout, torch.empty_like(packed) if out is None else out, True)


def from_kernel_layout(packed: torch.Tensor, layout: KernelLayout | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`to_kernel_layout` (kernel layout back to row-major nibbles)."""
    _check_shape(packed)
    layout = layout or kernel_layout()
    if layout is None:
        raise ConvertError("torch's int4 layout on this machine is unknown; it cannot be unpacked")
    return _convert(packed, layout, torch.empty_like(packed) if out is None else out, False)


def repack(packed: torch.Tensor, src: str, dst: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Convert 4-bit codes from packing ``src`` to ``dst`` (tags); ``out`` may be ``packed`` (in place).

    Returns ``packed`` itself (no copy) when the two tags are equal and no ``out`` is given.
    """
    if src == dst:
        return packed if out is None or out is packed else out.copy_(packed)
    _check_shape(packed)
    target = torch.empty_like(packed) if out is None else out
    if src != ROWMAJOR:  # via row-major: both steps keep every block in its byte range
        from_kernel_layout(packed, layout_from_tag(src), out=target)
        packed = target
    if dst != ROWMAJOR:
        to_kernel_layout(packed, layout_from_tag(dst), out=target)
    return target


def _torch_convert(packed: torch.Tensor) -> torch.Tensor:
    """torch's own converter (needs the codes widened to int32: 8x the bytes, hence row chunks)."""
    n, half = packed.shape
    result = torch.empty_like(packed)
    step = 256  # a multiple of every BLOCK_N, so chunks hold whole blocks
    for start in range(0, n, step):
        rows = packed[start:start + step]
        codes = unpack_nibbles(rows, out=torch.empty(rows.shape[0], half * 2, dtype=torch.int32))
        result[start:start + rows.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return result


def int4_kernel_available() -> bool:
    """Whether this torch build has the CPU int4 kernel and its weight converter."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


@functools.lru_cache(maxsize=1)
def kernel_layout() -> KernelLayout | None:
    """The int4 kernel layout of this machine, found by matching torch's converter on a probe.

    The probe has 208 rows (three 64-row blocks and a 16-row tail), so it tells every candidate
    apart; ``None`` when the kernel is missing or packs in a way none of the candidates reproduce.
    """
    if not int4_kernel_available():
        return None
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (208, 64), dtype=torch.int32, generator=gen)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    packed = pack_nibbles(codes)
    for block_n, style in ((64, "halves"), (32, "halves"), (16, "pairs"), (32, "pairs"), (64, "pairs")):
        candidate = KernelLayout(block_n, style)
        if torch.equal(_convert(packed, candidate, torch.empty_like(packed), True), expected):
            return candidate
    return None
