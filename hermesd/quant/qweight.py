"""The stored representation of a quantized Linear weight: a few plain tensors plus small metadata.

A weight ``W[N, K]`` (N = out_features, K = in_features) of module ``<name>`` is kept in a stage's
safetensors file as:

=========================  ==================================================================
``<name>.qweight``         codes. 4-bit: ``uint8[N, K/2]``, two codes a byte, in the packing the
                           metadata names: ``rowmajor`` (low nibble = even k, portable) or the
                           int4 kernel layout of the CPU that made the store (``halves32`` on
                           AVX2 ...), which saves the conversion at every load on that CPU and is
                           re-packed by the loader elsewhere. 5/6 bits (packing ``planes``,
                           :mod:`hermesd.quant.bitplanes`): the row-major low nibbles of the
                           unsigned codes. 8 bits: one code a byte, ``int8[N, K]`` for symmetric
                           types (already centred), ``uint8[N, K]`` for affine ones.
``<name>.qhigh``           5/6-bit ``planes`` only: the codes' high bits, ``uint8[N, K/8]`` (one
                           bit a code) or ``uint8[N, K/4]`` (two).
``<name>.scales``          ``[N, K/group]``: fp16 scales, fp32 for ``int8`` (one per row), or the
                           small integer sub-scales of the K-quants (uint8 Q4_K/Q5_K, int8 Q6_K).
``<name>.zeros``           affine types only, ``[N, K/group]``: fp16 offsets (Q4_1, Q5_1, int4) or
                           uint8 K-quant sub-mins.
``<name>.super_scales``    K-quants only: fp16 ``[N, K/256, 2]`` (d, dmin) or ``[N, K/256, 1]`` (Q6_K d).
=========================  ==================================================================

Value of code ``q`` in group ``g`` (fp32): symmetric ``scale * (q - code_offset)``, affine
``scale * q + zero``, where for K-quants ``scale = d * scales`` and ``zero = -(dmin * zeros)``.
:class:`QuantMeta` (a JSON-able dict, stored in the safetensors header under ``hermesd.quant.<name>``)
records which. Every GGML type keeps ggml's fp32 values bit for bit, in as many bits a code as the
GGUF blocks: stores come within 1.03x of the GGUF bytes (see :func:`storage_ratio`). Version-1
metadata of 5/6-bit weights (one byte a code, before the planes) is still read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from hermesd.errors import ConvertError
from hermesd.quant.bitplanes import PLANE_BITS, PLANES, high_plane_shape, pack_planes, unpack_planes
from hermesd.quant.ggml_blocks import BLOCK_FORMATS, DecodedBlocks, decode_blocks, row_bytes, type_name
from hermesd.quant.int4pack import ROWMAJOR, layout_from_tag, native_tag, pack_nibbles, repack

META_PREFIX = "hermesd.quant."
SUFFIXES = ("qweight", "scales", "zeros", "super_scales", "qhigh")
OWN_FORMATS = ("int8", "int4")
FORMAT_VERSION = 1
TABLE_VERSION = 2  # metadata with a kernel table: readers of version 1 must refuse it
PLANES_VERSION = 3  # 5/6-bit codes in bit planes: readers of versions 1-2 must refuse it
READABLE_VERSIONS = (FORMAT_VERSION, TABLE_VERSION, PLANES_VERSION)


@dataclass(frozen=True)
class QuantMeta:
    """What a weight's stored tensors mean; ``to_dict``/``from_dict`` give a JSON-able form."""

    format: str  # a GGML type name (Q4_0 ... Q6_K) or one of ours: int8, int4
    shape: tuple[int, int]  # (N out_features, K in_features)
    bits: int
    group_size: int  # elements along K sharing a scale (K for one scale per row)
    affine: bool  # zeros tensor present: w = scale*q + zero
    code_offset: int = 0  # symmetric 4-bit: w = scale*(q - code_offset)
    super_block: int = 0  # 256 for K-quants: scales are integers times super_scales
    # 4-bit: rowmajor or an int4 kernel layout tag; 5/6-bit: planes (rowmajor in version 1: a byte a code)
    packing: str = ROWMAJOR
    version: int = FORMAT_VERSION
    # "bfloat16"/"float32": ``scales`` is the int4 kernel's [groups, N, 2] (scale, zero) table in that
    # dtype, w = scale * (q - 8) + zero; no zeros/super_scales tensors. "": the format's own tensors.
    table: str = ""

    @property
    def groups(self) -> int:
        """Number of groups along K."""
        return self.shape[1] // self.group_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (lists for tuples)."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantMeta:
        """Inverse of :meth:`to_dict`; :class:`ConvertError` for a version or format we cannot read."""
        if int(data.get("version", 0)) not in READABLE_VERSIONS:
            raise ConvertError(f"quantized weight metadata version {data.get('version')} is not one of "
                               f"{READABLE_VERSIONS}")
        if data.get("table", "") not in ("", "bfloat16", "float32"):
            raise ConvertError(f"unsupported kernel table dtype {data.get('table')!r}")
        if data.get("format") not in {*BLOCK_FORMATS, *OWN_FORMATS}:
            raise ConvertError(f"unsupported quantized weight format {data.get('format')!r}")
        if data.get("packing") != PLANES or int(data.get("bits", 0)) not in PLANE_BITS:
            layout_from_tag(data.get("packing", ROWMAJOR))  # raises for a packing we do not know
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["shape"] = tuple(int(v) for v in data["shape"])
        return cls(**fields)

    def to_json(self) -> str:
        """Compact JSON for a safetensors header value (header values must be strings)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantMeta:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def meta_key(name: str) -> str:
    """Safetensors header key of the metadata of weight ``name`` (the module path)."""
    return META_PREFIX + name


def metas_from_header(metadata: dict[str, str] | None) -> dict[str, QuantMeta]:
    """All quantized weights described in a safetensors header's ``__metadata__``, by module name."""
    return {k[len(META_PREFIX):]: QuantMeta.from_json(v)
            for k, v in (metadata or {}).items() if k.startswith(META_PREFIX)}


@dataclass
class QuantizedWeight:
    """The stored tensors of one weight and their :class:`QuantMeta`."""

    meta: QuantMeta
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    super_scales: torch.Tensor | None = None
    qhigh: torch.Tensor | None = None  # the high-bit plane of 5/6-bit codes stored in planes

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors to write for module ``name``: ``{"<name>.qweight": ..., ...}``."""
        out = {f"{name}.{s}": getattr(self, s) for s in SUFFIXES}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_tensors(cls, meta: QuantMeta, tensors: dict[str, torch.Tensor], name: str) -> QuantizedWeight:
        """Gather the tensors of ``name`` from a stage's tensors (views are kept, nothing is copied)."""
        parts = {s: tensors.get(f"{name}.{s}") for s in SUFFIXES}
        if parts["qweight"] is None or parts["scales"] is None:
            raise ConvertError(f"quantized weight {name!r}: .qweight or .scales missing")
        qw = cls(meta, parts["qweight"], parts["scales"], parts["zeros"], parts["super_scales"],  # type: ignore[arg-type]
                 parts["qhigh"])
        check_tensors(qw)
        return qw

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors."""
        parts = (getattr(self, suffix) for suffix in SUFFIXES)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def repacked(self, packing: str) -> QuantizedWeight:
        """The same weight with 4-bit codes in ``packing`` (a tag or ``native``); shares other tensors.
        Wider codes have one packing each: ``self``."""
        if self.meta.bits != 4:
            return self
        packing = resolve_packing(packing, self.meta.bits)
        if packing == self.meta.packing:
            return self
        codes = repack(self.qweight, self.meta.packing, packing)
        return dataclasses.replace(self, meta=dataclasses.replace(self.meta, packing=packing), qweight=codes)

    def byte_codes(self) -> torch.Tensor:
        """Codes of a 5..8-bit weight one a byte, as version-1 stores held them: centred ``int8`` for
        symmetric formats, ``uint8`` for affine ones (bit planes are unpacked; a new tensor)."""
        if self.meta.packing != PLANES:
            return self.qweight
        assert self.qhigh is not None
        codes = unpack_planes(self.qweight, self.qhigh, self.meta.bits)
        offset = BLOCK_FORMATS[self.meta.format].code_offset
        if self.meta.affine or not offset:
            return codes
        return codes.view(torch.int8).sub_(offset)  # codes < 64: the int8 view holds the same values

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[N, K]`` (fp32 values are ggml's, bit for bit, for GGUF sources)."""
        from hermesd.quant.dequant import dequantize

        return dequantize(self, dtype=dtype)


def expected_shapes(meta: QuantMeta) -> dict[str, tuple[int, ...]]:
    """Shape of each stored tensor for ``meta``."""
    n, k = meta.shape
    planes = meta.packing == PLANES
    qweight = (n, k // 2) if meta.bits == 4 or planes else (n, k)
    if meta.table:
        return {"qweight": qweight, "scales": (meta.groups, n, 2)}
    shapes: dict[str, tuple[int, ...]] = {"qweight": qweight, "scales": (n, meta.groups)}
    if planes:
        shapes["qhigh"] = high_plane_shape(n, k, meta.bits)
    if meta.affine:
        shapes["zeros"] = (n, meta.groups)
    if meta.super_block:
        shapes["super_scales"] = (n, k // meta.super_block, 2 if meta.affine else 1)
    return shapes


def expected_dtypes(meta: QuantMeta) -> dict[str, torch.dtype]:
    """Dtype of each stored tensor for ``meta``."""
    n, k = meta.shape
    qweight = torch.uint8 if meta.bits == 4 or meta.affine or meta.packing == PLANES else torch.int8
    if meta.table:
        return {"qweight": qweight, "scales": getattr(torch, meta.table)}
    if meta.super_block:
        scales = torch.uint8 if meta.affine else torch.int8
    else:
        scales = torch.float32 if meta.format == "int8" and meta.group_size == k else torch.float16
    zeros = torch.uint8 if meta.super_block else torch.float16
    return {"qweight": qweight, "scales": scales, "zeros": zeros, "super_scales": torch.float16, "qhigh": torch.uint8}


def check_tensors(qw: QuantizedWeight) -> None:
    """Raise :class:`ConvertError` when the tensors lack the shapes/dtypes ``qw.meta`` implies."""
    dtypes = expected_dtypes(qw.meta)
    for suffix, shape in expected_shapes(qw.meta).items():
        t = getattr(qw, suffix)
        if t is None or tuple(t.shape) != shape or t.dtype != dtypes[suffix]:
            got = None if t is None else (tuple(t.shape), t.dtype)
            raise ConvertError(f"{qw.meta.format} weight {qw.meta.shape}: .{suffix} is {got}, "
                               f"expected {(shape, dtypes[suffix])}")


def _codes_tensors(dec: DecodedBlocks) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored codes and high plane: nibble-packed for 4 bits, bit planes for 5/6 bits, one byte a
    code for 8 bits (centred int8 for Q8_0)."""
    codes = torch.from_numpy(np.ascontiguousarray(dec.codes))
    if dec.fmt.bits == 4:
        return pack_nibbles(codes), None
    if dec.fmt.bits in PLANE_BITS:
        return pack_planes(codes, dec.fmt.bits)
    if not dec.fmt.affine:  # q - offset fits int8 for Q8_0 (128)
        return (codes.to(torch.int16) - dec.fmt.code_offset).to(torch.int8), None
    return codes, None


def resolve_packing(packing: str, bits: int) -> str:
    """The packing tag to store: ``native`` means this CPU's int4 kernel layout; wider codes are row-major."""
    if bits != 4:
        return ROWMAJOR
    tag = native_tag() if packing == "native" else packing
    layout_from_tag(tag)
    return tag


def gguf_meta(ggml_type: object, shape: tuple[int, int], packing: str = ROWMAJOR) -> QuantMeta:
    """The :class:`QuantMeta` of ``from_gguf(raw, ggml_type, shape, packing)``, without reading data."""
    name = type_name(ggml_type)
    fmt = BLOCK_FORMATS.get(name)
    if fmt is None:
        raise ConvertError(f"{name} is not a quantized GGML type hermesd keeps")
    n, k = int(shape[0]), int(shape[1])
    if k % fmt.block_size:
        raise ConvertError(f"{name} tensor of shape {shape}: rows of {k} are not whole {fmt.block_size}-element blocks")
    if fmt.bits in PLANE_BITS:  # the high plane packs 4 or 8 codes a byte: every block size is a multiple
        return QuantMeta(fmt.name, (n, k), fmt.bits, fmt.group_size, fmt.affine, 0,
                         256 if fmt.super_block else 0, PLANES, PLANES_VERSION)
    packing = resolve_packing(packing, fmt.bits) if fmt.bits == 4 and n % 16 == 0 else ROWMAJOR
    return QuantMeta(fmt.name, (n, k), fmt.bits, fmt.group_size, fmt.affine,
                     fmt.code_offset if fmt.bits == 4 else 0, 256 if fmt.super_block else 0, packing)


def from_gguf(raw: np.ndarray, ggml_type: object, shape: tuple[int, int], packing: str = "native") -> QuantizedWeight:
    """Stored form of a GGUF tensor from its raw blocks ``uint8[N, row_bytes]``, exact (no re-quantizing).

    ``shape`` is ``(N, K)``; GGUF lists it the other way round (``ne0 = K`` first). ``packing`` of
    4-bit codes: ``native`` (this CPU's int4 kernel layout, the measured default: no conversion at
    load here), ``rowmajor`` (portable) or an explicit kernel layout tag.
    """
    n, k = int(shape[0]), int(shape[1])
    name = type_name(ggml_type)
    if np.asarray(raw).size != n * row_bytes(name, k):
        raise ConvertError(f"{name} tensor of shape {shape}: {np.asarray(raw).size} bytes, "
                           f"expected {n * row_bytes(name, k)}")
    dec = decode_blocks(np.asarray(raw).reshape(n, -1), name, k)
    meta = gguf_meta(name, (n, k))

    def tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    codes, high = _codes_tensors(dec)
    qw = QuantizedWeight(meta, codes, tensor(dec.scales), tensor(dec.zeros),  # type: ignore[arg-type]
                         tensor(dec.super_scales), high)
    check_tensors(qw)
    return qw.repacked(packing) if qw.meta.bits == 4 and qw.meta.shape[0] % 16 == 0 else qw


def storage_ratio(qw: QuantizedWeight) -> float:
    """Stored bytes over the GGUF bytes of the same tensor (GGML formats only)."""
    n, k = qw.meta.shape
    return qw.nbytes / (n * row_bytes(qw.meta.format, k))


def register_stored_buffers(module: torch.nn.Module, qmeta: QuantMeta, device: torch.device | str | None) -> None:
    """Give ``module`` one empty buffer per stored tensor of ``qmeta`` (binding fills them), None for the rest."""
    dtypes = expected_dtypes(qmeta)
    for suffix, shape in expected_shapes(qmeta).items():
        module.register_buffer(suffix, torch.empty(shape, dtype=dtypes[suffix], device=device))
    for suffix in SUFFIXES:
        if suffix not in module._buffers:
            setattr(module, suffix, None)
