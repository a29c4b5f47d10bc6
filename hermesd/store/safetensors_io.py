"""Stage files: safetensors written with a page-aligned data section, and their header parser.

The files are ordinary safetensors (any safetensors reader opens them). Two choices serve streaming:
the JSON header is padded with spaces (allowed by the format) so tensor data starts on a 4 KiB
boundary, which makes O_DIRECT reads land tensor bytes at aligned addresses; and tensors that are
gathered row by row (large embedding tables) are written last, so the rest of a stage is one
contiguous prefix of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from hermesd.store.manifest import DTYPE_SIZES, TensorEntry

ALIGNMENT = 4096
MAX_HEADER_BYTES = 64 << 20

TORCH_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
ST_TO_TORCH = {name: dtype for dtype, name in TORCH_TO_ST.items()}


@dataclass(frozen=True)
class WrittenFile:
    """What writing a stage file produced: its size, digest, data offset and tensor table."""

    bytes: int
    sha256: str
    data_start: int
    tensors: dict[str, TensorEntry]


def write_stage_file(path: Path, tensors: dict[str, torch.Tensor], last: list[str] = (),
                     metadata: dict[str, str] | None = None) -> WrittenFile:
    """Write ``tensors`` to ``path`` as safetensors; names in ``last`` go at the end of the data.

    ``metadata``: extra string entries of the header's ``__metadata__`` (e.g. quantization metas).
    """
    order = [n for n in tensors if n not in last] + [n for n in tensors if n in last]
    entries: dict[str, TensorEntry] = {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in TORCH_TO_ST:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} cannot be stored")
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = TensorEntry(TORCH_TO_ST[tensor.dtype], list(tensor.shape), (offset, offset + nbytes))
        offset += nbytes
    header = _encode_header(entries, metadata or {})
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for chunk in _file_chunks(header, tensors, order):
            handle.write(chunk)
            digest.update(chunk)
        handle.flush()
        os.fsync(handle.fileno())
        # Clean pages of a file we will not read soon: leave the page cache to others (and to cgroup caps).
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return WrittenFile(len(header) + offset, digest.hexdigest(), len(header), entries)


def _file_chunks(header: bytes, tensors: dict[str, torch.Tensor], order: list[str]):
    yield header
    for name in order:
        flat = tensors[name].detach().contiguous().reshape(-1)
        if flat.numel():
            yield memoryview(flat.view(torch.uint8).numpy())


def _encode_header(entries: dict[str, TensorEntry], metadata: dict[str, str]) -> bytes:
    table = {
        name: {"dtype": e.dtype, "shape": e.shape, "data_offsets": list(e.offsets)} for name, e in entries.items()
    }
    table["__metadata__"] = {**metadata, "format": "pt", "writer": "hermesd"}
    body = json.dumps(table, separators=(",", ":")).encode()
    padding = (-(8 + len(body))) % ALIGNMENT
    body += b" " * padding
    return struct.pack("<Q", len(body)) + body


def parse_header(prefix: memoryview | bytes) -> tuple[dict[str, TensorEntry], int]:
    """Parse the tensor table at the start of a safetensors file; return it and the data start.

    Raises ValueError when the bytes are not a well-formed safetensors header.
    """
    if len(prefix) < 8:
        raise ValueError("file shorter than a safetensors header")
    (length,) = struct.unpack("<Q", bytes(prefix[:8]))
    if length > MAX_HEADER_BYTES or 8 + length > len(prefix):
        raise ValueError(f"header length {length} is out of range")
    try:
        table = json.loads(bytes(prefix[8 : 8 + length]))
    except ValueError as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    table.pop("__metadata__", None)
    entries = {}
    for name, raw in table.items():
        dtype, shape, offsets = raw["dtype"], list(raw["shape"]), tuple(raw["data_offsets"])
        expected = DTYPE_SIZES[dtype] * _product(shape)
        if offsets[1] - offsets[0] != expected:
            raise ValueError(f"tensor {name}: byte range does not match dtype and shape")
        entries[name] = TensorEntry(dtype, shape, offsets)
    return entries, 8 + length


def tensor_view(buffer: memoryview, start: int, entry: TensorEntry) -> torch.Tensor:
    """A tensor that aliases ``entry``'s bytes at ``start`` in ``buffer``: no copy, no allocation."""
    count = _product(entry.shape)
    dtype = ST_TO_TORCH[entry.dtype]
    if count == 0:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=start).view(entry.shape)


def _product(shape: list[int]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result
