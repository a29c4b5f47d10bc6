"""What turns a GGUF tensor's stored blocks into the tensor transformers expects, one tensor at a time.

A quantization block runs along a row (ggml's fastest dimension), so anything that only moves,
joins or re-dimensions whole rows works on the blocks themselves: the llama.cpp rope row
permutation of Q/K, Bloom's q/k/v interleave, stacking MoE gate and up experts, added size-1
dimensions. Anything else -- a transpose, a column reorder, arithmetic such as ``w - 1`` -- needs
values; on a float tensor that is exact, on a quantized one it means de-quantizing that tensor
(``Dequantized``), which callers must opt into.

Each transform maps the sources' raw ``[rows, row_bytes]`` uint8 views to ``(ggml_type, raw)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from hermesd.quant.gguf_header import FLOAT_TYPES, TensorInfo, block_layout

_TORCH_TYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_TYPE_OF_TORCH = {dtype: name for name, dtype in _TORCH_TYPE.items()}
Result = tuple[str, np.ndarray]


class Transform:
    """Base: turn the sources' raw views into the record's ``(ggml_type, raw)``."""

    needs_values = False  # True: cannot run on quantized blocks
    description = "as stored"

    def apply(self, sources: Sequence[TensorInfo], raws: Sequence[np.ndarray]) -> Result:
        raise NotImplementedError


class PermuteRows(Transform):
    """Reorder whole rows (blocks never cross rows): output row ``i`` is input row ``order[i]``.

    On a vector (a bias) the "rows" are its elements: fine for floats, but elements inside a block
    cannot move, so a quantized vector needs values (``needs_values``).
    """

    def __init__(self, order: np.ndarray, description: str, vector: bool = False) -> None:
        self.order = np.asarray(order, dtype=np.int64)
        self.description = description
        self.needs_values = vector

    def apply(self, sources: Sequence[TensorInfo], raws: Sequence[np.ndarray]) -> Result:
        info, raw = sources[0], raws[0]
        if len(info.shape) == 1:  # a float vector: one "row" of bytes per element
            elements = raw.reshape(info.shape[0], -1)
            return info.ggml_type, elements[self._checked(len(elements))].reshape(1, -1)
        return info.ggml_type, raw[self._checked(raw.shape[0])]  # fancy indexing: this tensor's one copy

    def _checked(self, rows: int) -> np.ndarray:
        if len(self.order) != rows:
            raise ValueError(f"row permutation of {len(self.order)} rows for a tensor of {rows}")
        return self.order


class StackRows(Transform):
    """Join several ``[..., n, K]`` tensors along their second-to-last axis (MoE gate then up, per expert)."""

    description = "rows joined"

    def apply(self, sources: Sequence[TensorInfo], raws: Sequence[np.ndarray]) -> Result:
        types = {info.ggml_type for info in sources}
        if len(types) != 1:
            raise ValueError(f"cannot join blocks of different types {sorted(types)}")
        parts = [raw.reshape(*info.shape[:-1], raw.shape[-1]) for info, raw in zip(sources, raws, strict=True)]
        joined = np.concatenate(parts, axis=-2)
        return types.pop(), joined.reshape(-1, joined.shape[-1])


class JoinedValues(Transform):
    """``StackRows`` on values, for parts stored in different types (blocks of two types cannot share a tensor)."""

    needs_values = True
    description = "rows joined as values (the parts' types differ)"

    def apply(self, sources: Sequence[TensorInfo], raws: Sequence[np.ndarray]) -> Result:
        joined = np.concatenate([values_of(info, raw) for info, raw in zip(sources, raws, strict=True)], axis=-2)
        return "F32", joined.view(np.uint8).reshape(-1, joined.shape[-1] * 4)


class Transpose(Transform):
    """Swap the two axes of a float matrix; values are untouched, so the float type is kept."""

    needs_values = True
    description = "transposed"

    def apply(self, sources: Sequence[TensorInfo], raws: Sequence[np.ndarray]) -> Result:
        info, raw = sources[0], raws[0]
        width = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}[info.ggml_type]
        moved = np.ascontiguousarray(raw.view(width).reshape(info.shape).T)  # bit patterns, not values
        return info.ggml_type, moved.view(np.uint8).reshape(moved.shape[0], -1)


class NumpyValues(Transform):
    """A value-level function on the tensor as float32, as transformers' legacy loader computes it."""

    needs_values = True

    def __init__(self, function: Callable[[np.ndarray], np.ndarray], description: str) -> None:
        self.function = function
        self.description = description

    def apply(self, sources: Sequence[TensorInfo], raws: Sequence[np.ndarray]) -> Result:
        info, raw = sources[0], raws[0]
        values = values_of(info, raw)
        result = np.ascontiguousarray(self.function(values), dtype=np.float32)
        return "F32", result.view(np.uint8).reshape(-1, result.shape[-1] * 4)


class Dequantized(Transform):
    """De-quantize a block tensor to float32 (gguf-py's reference de-quantizer), then run ``inner`` on it."""

    def __init__(self, inner: Transform) -> None:
        self.inner = inner
        self.description = f"de-quantized to F32, then {inner.description}"

    def apply(self, sources: Sequence[TensorInfo], raws: Sequence[np.ndarray]) -> Result:
        floats, float_raws = [], []
        for info, raw in zip(sources, raws, strict=True):
            values = values_of(info, raw)
            floats.append(TensorInfo(info.name, info.shape, "F32", 0, values.nbytes))
            float_raws.append(values.view(np.uint8).reshape(info.rows, -1))
        return self.inner.apply(floats, float_raws)


class TorchOps(Transform):
    """transformers' own conversion ops (its new GGUF path), run on the raw tensor or on its values."""

    def __init__(self, operations: Sequence, patterns: Sequence[str], target: str, dequantize_first: bool) -> None:
        self.operations = list(operations)
        self.patterns, self.target = list(patterns), target
        self.dequantize_first = dequantize_first
        self.needs_values = dequantize_first
        self.operation_names = ", ".join(type(op).__name__ for op in self.operations) or "renamed"
        prefix = "de-quantized to F32, then " if dequantize_first else ""
        self.description = prefix + self.operation_names

    def apply(self, sources: Sequence[TensorInfo], raws: Sequence[np.ndarray]) -> Result:
        members = zip(self.patterns, sources, raws, strict=True)
        tensors = {pattern: [self._tensor(info, raw)] for pattern, info, raw in members}
        result = self.run(tensors)
        return torch_result(result, sources[0].ggml_type)

    def run(self, tensors: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """Chain the operations as transformers' loader does, one dict of tensors into the next."""
        current: dict = tensors
        for operation in self.operations:
            current = operation.convert(current, source_patterns=self.patterns, target_patterns=[self.target],
                                        full_layer_name=self.target)
        (value,) = current.values()
        return value[0] if isinstance(value, list) else value

    def _tensor(self, info: TensorInfo, raw: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():  # the mapping is read-only; no op here writes in place
            warnings.simplefilter("ignore", UserWarning)
            blocks = torch.from_numpy(raw)
        if info.ggml_type in FLOAT_TYPES:
            return blocks.view(_TORCH_TYPE[info.ggml_type]).reshape(info.shape)
        if self.dequantize_first:
            return torch.from_numpy(values_of(info, raw)).reshape(info.shape)
        return blocks.reshape(*info.shape[:-1], info.row_bytes)


def values_of(info: TensorInfo, raw: np.ndarray) -> np.ndarray:
    """The tensor as float32 in its GGUF shape (a copy), via gguf-py as transformers' legacy loader does."""
    return dequantize(raw, GGMLQuantizationType[info.ggml_type]).reshape(info.shape)


def torch_result(tensor: torch.Tensor, packed_type: str) -> Result:
    """``(ggml_type, raw)`` of a transformed tensor: uint8 holds ``packed_type`` blocks, floats their own type."""
    if tensor.dtype == torch.uint8:
        ggml_type, raw = packed_type, tensor
    else:
        ggml_type, raw = _TYPE_OF_TORCH[tensor.dtype], tensor.contiguous().view(torch.uint8)
    raw = raw.reshape(-1, raw.shape[-1]) if raw.dim() else raw.reshape(1, -1)
    return ggml_type, raw.contiguous().numpy()


def elements_per_row(ggml_type: str, row_bytes: int) -> int:
    """Columns that ``row_bytes`` bytes of ``ggml_type`` hold."""
    elements, nbytes = block_layout(ggml_type)
    return row_bytes // nbytes * elements
