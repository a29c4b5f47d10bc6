"""5- and 6-bit codes stored in planes: a row-major 4-bit plane plus the high bits packed tight.

One byte a code (what 8-bit stores use) costs 8 bits for a 5-bit format, so a Q5_K_M store came to
1.37x its GGUF. Split instead, a code ``c = 16*h + l`` is kept as

* ``low``: ``uint8[N, K/2]``, the ``l`` nibbles in the row-major 4-bit layout
  (:mod:`hermesd.quant.int4pack`: even k in the low nibble), and
* ``high``: ``uint8[N, K*(bits-4)/8]``, the ``h`` values packed little-endian: eight 1-bit values a
  byte for 5-bit codes (k = 8j + i in bit i of byte j), four 2-bit values for 6-bit codes
  (k = 4j + i in bits 2i, 2i+1).

That is exactly ``bits`` bits a code, as in the GGUF blocks. Unpacking gives the byte-a-code
tensor back bit for bit; it is done where codes are used (kernel preparation, de-quantization of a
chunk of rows), never kept.
"""

from __future__ import annotations

import torch

from hermesd.quant.int4pack import pack_nibbles, unpack_nibbles

PLANES = "planes"  # the packing tag of a 5/6-bit weight stored this way
PLANE_BITS = (5, 6)


def high_bits_per_byte(bits: int) -> int:
    """How many high values one byte of the ``high`` plane holds (8 for 5-bit codes, 4 for 6-bit)."""
    if bits not in PLANE_BITS:
        raise ValueError(f"{bits}-bit codes are not stored in planes")
    return 8 // (bits - 4)


def high_plane_shape(n: int, k: int, bits: int) -> tuple[int, int]:
    """Shape of the ``high`` plane of an ``[n, k]`` weight of ``bits``-bit codes."""
    return n, k // high_bits_per_byte(bits)


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    width = bits - 4
    return torch.arange(0, 8, width, dtype=torch.uint8, device=device)


def pack_planes(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` planes of unsigned ``codes`` (``uint8[N, K]``, values below ``2**bits``)."""
    n, k = codes.shape
    per = high_bits_per_byte(bits)
    if k % per or k % 2:
        raise ValueError(f"rows of {k} codes do not fill whole bytes of {bits}-bit planes")
    low = pack_nibbles(codes & 0x0F)
    high = (codes >> 4).view(n, k // per, per) << _shifts(bits, codes.device)
    # the shifted values occupy disjoint bits, so their sum is their bitwise or
    return low, high.sum(dim=-1, dtype=torch.uint8)


def unpack_planes(low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """The unsigned codes ``uint8[N, K]`` that :func:`pack_planes` split into ``low`` and ``high``."""
    n, half = low.shape
    mask = (1 << (bits - 4)) - 1
    h = (high.unsqueeze(-1) >> _shifts(bits, high.device)) & mask
    codes = unpack_nibbles(low, out=torch.empty(n, 2 * half, dtype=torch.uint8))
    return codes.bitwise_or_(h.view(n, 2 * half) << 4)
