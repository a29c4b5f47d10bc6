"""GGML block formats: byte layout per type and vectorised decoders into codes + group factors.

A quantized GGUF tensor of logical shape [N, K] (N output features, K input features) is stored as N
rows of ``K / block_size`` blocks, ``type_size`` bytes each. The decoders here turn a whole
``uint8[N, row_bytes]`` array into:

* ``codes``: unsigned integer codes, ``uint8[N, K]`` (0 .. 2**bits - 1), and
* the per-group factors the stored representation keeps, in the narrowest dtype that is exact:
  ``scales``/``zeros`` per group of ``group_size`` along K and, for the K-quants, ``super_scales``
  (the fp16 ``d``/``dmin`` of each 256-wide super-block).

:func:`group_scale_offset` expands those factors to fp32 ``scale``/``offset`` per group. Affine types
(Q4_1, Q5_1, Q4_K, Q5_K) are ``w = scale * q + offset``; symmetric types (Q4_0, Q5_0, Q8_0, Q6_K)
are ``w = scale * (q - code_offset)`` with ``offset == 0``: subtracting the code offset first (it is
exact) instead of adding ``-code_offset * scale`` keeps ggml's sign of zero (``d * 0`` is ``-0.0``
when ``d < 0``; ``x + (-x)`` is always ``+0.0``). Both reproduce ggml's fp32 values bit for bit.
All work is numpy array arithmetic over every block at once, no loop per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hermesd.errors import ConvertError

QK_K = 256  # elements in a K-quant super-block


@dataclass(frozen=True)
class BlockFormat:
    """Byte layout and value semantics of one GGML quantization type."""

    name: str
    block_size: int  # elements per block along K
    type_size: int  # bytes per block
    bits: int  # bits per code
    group_size: int  # elements sharing one (scale, offset) pair
    affine: bool  # True: w = scale*q + zero; False: w = scale*(q - code_offset)
    code_offset: int  # subtracted from the unsigned code in symmetric types
    super_block: bool  # scales are small integers times an fp16 super-block scale


BLOCK_FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("Q4_0", 32, 18, 4, 32, False, 8, False),
        BlockFormat("Q4_1", 32, 20, 4, 32, True, 0, False),
        BlockFormat("Q5_0", 32, 22, 5, 32, False, 16, False),
        BlockFormat("Q5_1", 32, 24, 5, 32, True, 0, False),
        BlockFormat("Q8_0", 32, 34, 8, 32, False, 128, False),
        BlockFormat("Q4_K", QK_K, 144, 4, 32, True, 0, True),
        BlockFormat("Q5_K", QK_K, 176, 5, 32, True, 0, True),
        BlockFormat("Q6_K", QK_K, 210, 6, 16, False, 32, True),
    )
}

FLOAT_FORMATS: dict[str, np.dtype] = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                                      "BF16": np.dtype(np.uint16)}


def type_name(ggml_type: object) -> str:
    """Normalise a GGML type given as a name, a ``gguf.GGMLQuantizationType`` or its integer value."""
    if isinstance(ggml_type, str):
        return ggml_type.upper()
    name = getattr(ggml_type, "name", None)
    if name is None:  # a bare integer: map it through gguf's enum
        import gguf

        name = gguf.GGMLQuantizationType(int(ggml_type)).name  # type: ignore[call-overload]
    return str(name)


def block_format(ggml_type: object) -> BlockFormat:
    """The :class:`BlockFormat` of a quantized type; :class:`ConvertError` for any other type."""
    name = type_name(ggml_type)
    if name not in BLOCK_FORMATS:
        known = ", ".join([*BLOCK_FORMATS, *FLOAT_FORMATS])
        raise ConvertError(f"GGML type {name} is not supported for quantized stores (supported: {known})")
    return BLOCK_FORMATS[name]


def row_bytes(ggml_type: object, k: int) -> int:
    """Bytes of one row of ``k`` elements of a GGML type (quantized or float)."""
    name = type_name(ggml_type)
    if name in FLOAT_FORMATS:
        return k * FLOAT_FORMATS[name].itemsize
    fmt = block_format(name)
    if k % fmt.block_size:
        raise ConvertError(f"{name} row of {k} elements is not a whole number of {fmt.block_size}-element blocks")
    return k // fmt.block_size * fmt.type_size


@dataclass
class DecodedBlocks:
    """Codes and stored group factors of one quantized tensor (numpy arrays, N rows)."""

    fmt: BlockFormat
    codes: np.ndarray  # uint8 [N, K], unsigned codes
    scales: np.ndarray  # [N, K/group]: fp16 d (simple types) or integer sub-scales (K-quants)
    zeros: np.ndarray | None  # [N, K/group]: fp16 m (Q4_1/Q5_1), uint8 sub-mins (Q4_K/Q5_K), else None
    super_scales: np.ndarray | None  # fp16 [N, K/256, 2] (d, dmin) or [N, K/256, 1] (Q6_K d)


def _blocks(raw: np.ndarray, fmt: BlockFormat, k: int) -> np.ndarray:
    """View ``raw`` as ``uint8[N, K/block_size, type_size]``, checking its size."""
    raw = np.ascontiguousarray(raw).view(np.uint8)
    n = raw.size // row_bytes(fmt.name, k) if raw.size else 0
    if raw.size != n * row_bytes(fmt.name, k) or n == 0:
        raise ConvertError(f"{fmt.name} data of {raw.size} bytes is not a whole number of rows of K={k}")
    return raw.reshape(n, k // fmt.block_size, fmt.type_size)


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 from a trailing axis of 2 bytes (the block's ``d``/``m`` fields)."""
    return np.ascontiguousarray(b).view(np.float16)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """Unpack bytes whose low nibbles hold ``run`` elements and high nibbles the next ``run``."""
    b = qs.reshape(*qs.shape[:-1], -1, 1, run)
    return np.concatenate([b & 0x0F, b >> 4], axis=-2).reshape(*qs.shape[:-1], -1)


def _bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Bit i of the little-endian bit string ``qh`` (last axis) for i in range(count)."""
    return np.unpackbits(qh, axis=-1, count=count, bitorder="little")


def _decode_simple(blocks: np.ndarray, fmt: BlockFormat) -> DecodedBlocks:
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: one fp16 scale (and fp16 min for _1 types) per 32."""
    n, nb, _ = blocks.shape
    d = _f16(blocks[..., 0:2])[..., 0]
    pos = 4 if fmt.affine else 2
    zeros = _f16(blocks[..., 2:4])[..., 0] if fmt.affine else None
    if fmt.bits == 8:
        q = (blocks[..., pos:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        high = None
        if fmt.bits == 5:  # 32 fifth bits, one per element, little-endian bit order
            high = _bits(blocks[..., pos:pos + 4], 32)
            pos += 4
        q = _nibbles(blocks[..., pos:], 16)
        if high is not None:
            q = q | (high << 4)
    return DecodedBlocks(fmt, q.reshape(n, nb * 32), d, zeros, None)


def _kquant_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs packed into Q4_K/Q5_K's 12 scale bytes.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 likewise; the top two bits
    of those eight bytes are the high bits of scales/mins 4-7, whose low nibbles sit in bytes 8-11.
    """
    lo_sc, lo_m, tail = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo_sc & 0x3F, (tail & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 0x3F, (tail >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc, mn


def _decode_k45(blocks: np.ndarray, fmt: BlockFormat) -> DecodedBlocks:
    """Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scale and min, w = d*sc*q - dmin*m."""
    n, nb, _ = blocks.shape
    supers = _f16(blocks[..., 0:4]).reshape(n, nb, 2)  # (d, dmin)
    sc, mn = _kquant_scale_min(blocks[..., 4:16])
    pos = 16
    high = None
    if fmt.bits == 5:  # 32 bytes: bit j of byte l is the fifth bit of element 32*j + l
        qh = blocks[..., pos:pos + 32]
        high = ((qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(n, nb, QK_K)
        pos += 32
    q = _nibbles(blocks[..., pos:pos + 128], 32)  # four chunks of 64: 32 low nibbles, 32 high
    if high is not None:
        q = q | (high << 4)
    return DecodedBlocks(fmt, q.reshape(n, nb * QK_K), sc.reshape(n, nb * 8), mn.reshape(n, nb * 8), supers)


def _decode_q6k(blocks: np.ndarray, fmt: BlockFormat) -> DecodedBlocks:
    """Q6_K: 16 sub-blocks of 16 with int8 scales, w = d*sc*(q - 32).

    Each half (128 elements) uses 64 low-nibble bytes and 32 high-bit bytes: element
    ``64*j + l`` of the half takes nibble j of ql byte l and bits ``2*(2*j + l//32)`` of qh byte l%32.
    """
    n, nb, _ = blocks.shape
    ql = blocks[..., 0:128].reshape(n, nb, 2, 64)
    qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # [.., half, 128]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    high = ((qh >> shifts) & 0x03).reshape(n, nb, 2, 128)
    q = (low | (high << 4)).reshape(n, nb * QK_K)
    sc = blocks[..., 192:208].view(np.int8).reshape(n, nb * 16)
    d = _f16(blocks[..., 208:210]).reshape(n, nb, 1)
    return DecodedBlocks(fmt, q, sc, None, d)


def decode_blocks(raw: np.ndarray, ggml_type: object, k: int) -> DecodedBlocks:
    """Decode a quantized tensor's raw blocks (``uint8[N, row_bytes]``, rows = output features).

    Raises :class:`ConvertError` for a type outside :data:`BLOCK_FORMATS` or a size that is not a
    whole number of rows of ``k`` elements.
    """
    fmt = block_format(ggml_type)
    blocks = _blocks(raw, fmt, k)
    if not fmt.super_block:
        return _decode_simple(blocks, fmt)
    return _decode_q6k(blocks, fmt) if fmt.name == "Q6_K" else _decode_k45(blocks, fmt)


def group_scale_offset(dec: DecodedBlocks) -> tuple[np.ndarray, np.ndarray]:
    """fp32 ``scale`` and ``offset`` per group (``offset`` is 0 for symmetric types, see the module doc).

    Exactness: fp16 ``d`` has 11 significant bits and the integer sub-scales at most 7, so
    ``d * sc`` is exact in fp32; times a code of at most 6 bits it still fits 24 bits, so
    ``scale * q`` is exact and the only rounding is the final addition, the same one ggml makes
    (``d*sc*q - dmin*m``, ``d*q + m``).
    """
    fmt = dec.fmt
    if dec.super_scales is None:
        scale = dec.scales.astype(np.float32)
    else:
        per_super = dec.scales.shape[1] // dec.super_scales.shape[1]
        d = np.repeat(dec.super_scales[..., 0].astype(np.float32), per_super, axis=1)
        scale = d * dec.scales.astype(np.float32)
    if not fmt.affine:
        return scale, np.zeros_like(scale)
    assert dec.zeros is not None
    if dec.super_scales is None:
        return scale, dec.zeros.astype(np.float32)
    per_super = dec.zeros.shape[1] // dec.super_scales.shape[1]
    dmin = np.repeat(dec.super_scales[..., 1].astype(np.float32), per_super, axis=1)
    return scale, -(dmin * dec.zeros.astype(np.float32))


def dequantize_blocks(raw: np.ndarray, ggml_type: object, k: int) -> np.ndarray:
    """Reference de-quantization to fp32 ``[N, K]`` through :func:`decode_blocks` (used by tests)."""
    dec = decode_blocks(raw, ggml_type, k)
    scale, offset = group_scale_offset(dec)
    n, g = scale.shape
    q = dec.codes.reshape(n, g, -1).astype(np.float32) - np.float32(dec.fmt.code_offset)
    w = q * scale[..., None]
    if dec.fmt.affine:  # adding a zero offset would turn ggml's -0.0 into +0.0
        w = w + offset[..., None]
    return w.reshape(n, k)


def decode_float(raw: np.ndarray, ggml_type: object, k: int) -> np.ndarray:
    """F32/F16/BF16 pass-through: the tensor as float ``[N, K]`` (BF16 widened exactly to fp32)."""
    name = type_name(ggml_type)
    if name not in FLOAT_FORMATS:
        raise ConvertError(f"GGML type {name} is not a float type")
    arr = np.ascontiguousarray(raw).view(FLOAT_FORMATS[name])
    if arr.size % k:
        raise ConvertError(f"{name} data of {arr.size} elements is not a whole number of rows of K={k}")
    arr = arr.reshape(-1, k)
    if name == "BF16":  # bf16 is the top half of an fp32: shift into place
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr
