"""The binary layout of a GGUF file: metadata, tensor table and where each tensor's blocks lie.

Only the header is parsed; tensor data is never read here. The file is memory-mapped once, so a
tensor's bytes are a zero-copy view that the kernel pages in when (and only when) it is touched.
Every structural problem becomes a ``ConvertError`` naming the file, so a bad download fails at
open time instead of deep inside a conversion.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from hermesd.errors import ConvertError, UnsupportedModelError

# The ggml types hermesd keeps (its kernels know these block layouts); anything else is refused at
# open time rather than half-way through a conversion.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
FLOAT_TYPES = ("F32", "F16", "BF16")

_VERSIONS = (2, 3)  # v1 counted with 32-bit integers and is long extinct
_DEFAULT_ALIGNMENT = 32  # llama.cpp's, used when general.alignment is absent
# metadata value type id -> struct format; 8 (string) and 9 (array) are variable-length
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_SMALL_ARRAY = 4096  # numeric arrays up to this long become lists; longer ones (token scores) stay numpy views


def type_name(type_id: int) -> str:
    """The ggml name of a type id (e.g. 12 -> "Q4_K"), or ``"type <id>"`` for ids gguf-py does not know."""
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def block_layout(name: str) -> tuple[int, int]:
    """``(elements per block, bytes per block)`` of a ggml type name; plain floats are 1-element blocks."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]]


def row_bytes(name: str, columns: int) -> int:
    """Bytes that ``columns`` consecutive elements of one row occupy in ggml type ``name``."""
    elements, nbytes = block_layout(name)
    return columns // elements * nbytes


@dataclass(frozen=True)
class StringArray:
    """A metadata string array (a vocabulary, a merge table), left unread: its length and where it lies."""

    count: int
    offset: int


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: where the tensor lies and how it is stored."""

    name: str
    shape: tuple[int, ...]  # torch order: the row length (ggml's ne[0]) last
    ggml_type: str
    start: int  # absolute offset in the file
    nbytes: int

    @property
    def rows(self) -> int:
        """Rows of blocks: every dimension but the last, multiplied out (1 for a vector)."""
        return prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of blocks."""
        return row_bytes(self.ggml_type, self.shape[-1])


@dataclass
class GGUFHeader:
    """A parsed GGUF header plus the mapping its tensors are viewed through."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    mapping: mmap.mmap = field(repr=False)

    @property
    def architecture(self) -> str:
        """``general.architecture``: llama.cpp's name for the model family."""
        return self.metadata["general.architecture"]

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only ``[rows, row_bytes]`` uint8 view of the mapping (no copy)."""
        view = np.frombuffer(self.mapping, dtype=np.uint8, count=info.nbytes, offset=info.start)
        return view.reshape(info.rows, info.row_bytes)

    def strings(self, key: str) -> list[str]:
        """Decode a string-array metadata value that parsing left unread."""
        value = self.metadata[key]
        if not isinstance(value, StringArray):
            raise KeyError(f"{key} is not a string array")
        reader = _Reader(self.mapping, self.path, value.offset)
        return [reader.string() for _ in range(value.count)]


class _Reader:
    """A cursor over the mapping; running off its end means the file is truncated."""

    def __init__(self, buffer: mmap.mmap, path: Path, pos: int = 0) -> None:
        self.buffer, self.path, self.pos = buffer, path, pos

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise ConvertError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buffer)}, "
                               f"needs {self.pos + size})")
        values = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.pos + length > len(self.buffer):
            raise ConvertError(f"{self.path}: truncated GGUF header (a {length}-byte string runs past the end)")
        raw = self.buffer[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR:
            return self.unpack(_SCALAR[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        raise ConvertError(f"{self.path}: metadata value of unknown type {value_type} at byte {self.pos}")

    def array(self) -> Any:
        element_type, count = self.unpack("<IQ")
        if element_type == _STRING:  # skipped, not decoded: a vocabulary is most of a header's bytes
            array = StringArray(count, self.pos)
            for _ in range(count):
                length = self.unpack("<Q")  # not `pos += unpack()`: that adds to the pos from before the read
                self.pos += length
            if self.pos > len(self.buffer):
                raise ConvertError(f"{self.path}: truncated GGUF header (a string array runs past the end)")
            return array
        if element_type in _SCALAR:
            dtype = np.dtype(_SCALAR[element_type])
            if self.pos + count * dtype.itemsize > len(self.buffer):
                raise ConvertError(f"{self.path}: truncated GGUF header (an array runs past the end)")
            values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return values.tolist() if count <= _SMALL_ARRAY else values
        return [self.value(element_type) for _ in range(count)]  # arrays of arrays


def read_header(path: Path) -> GGUFHeader:
    """Map ``path`` and parse its header; raise ``ConvertError``/``UnsupportedModelError`` on bad input."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ConvertError(f"{path}: not a GGUF file (it is empty)")
    try:
        with open(path, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise ConvertError(f"{path}: cannot map as a GGUF file: {exc}") from None
    reader = _Reader(mapping, path)
    if len(mapping) < 4 or mapping[:4] != b"GGUF":
        raise ConvertError(f"{path}: not a GGUF file (starts with {bytes(mapping[:4])!r}, not b'GGUF')")
    version = reader.unpack("<4xI")
    if version not in _VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise ConvertError(f"{path}: GGUF version {version}{hint}; supported: {', '.join(map(str, _VERSIONS))}")
    tensor_count, kv_count = reader.unpack("<QQ")
    metadata = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.unpack("<I"))
    if not isinstance(metadata.get("general.architecture"), str):
        raise ConvertError(f"{path}: GGUF metadata has no general.architecture")
    entries = [_table_entry(reader) for _ in range(tensor_count)]
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = -(-reader.pos // alignment) * alignment
    tensors = [_tensor_info(path, len(mapping), data_start, *entry) for entry in entries]
    return GGUFHeader(path, version, metadata, tensors, mapping)


def _table_entry(reader: _Reader) -> tuple[str, tuple[int, ...], int, int]:
    name = reader.string()
    dims = reader.unpack(f"<{reader.unpack('<I')}Q")
    dims = dims if isinstance(dims, tuple) else (dims,)
    type_id, offset = reader.unpack("<IQ")
    return name, tuple(reversed(dims)), type_id, offset  # ggml lists the fastest-moving dimension first


def _tensor_info(path: Path, size: int, data_start: int, name: str, shape: tuple[int, ...], type_id: int,
                 offset: int) -> TensorInfo:
    ggml_type = type_name(type_id)
    if ggml_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"{path}: tensor {name} has ggml type {ggml_type}, which hermesd cannot keep; "
                                    f"supported: {', '.join(SUPPORTED_TYPES)}")
    elements, _ = block_layout(ggml_type)
    if not shape or shape[-1] % elements:
        raise ConvertError(f"{path}: tensor {name} ({ggml_type}) has shape {shape}, whose rows are not whole blocks "
                           f"of {elements}")
    info = TensorInfo(name, shape, ggml_type, data_start + offset, 0)
    info = TensorInfo(name, shape, ggml_type, data_start + offset, info.rows * info.row_bytes)
    if info.start + info.nbytes > size:
        raise ConvertError(f"{path}: truncated: tensor {name} ({ggml_type}, {info.nbytes} bytes at {info.start}) "
                           f"runs past the end of the file ({size} bytes)")
    return info
