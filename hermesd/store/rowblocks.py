"""Build a large quantized weight a block of rows at a time, into tensors allocated once.

Converting a weight whole costs several times its size in temporaries (decoded codes a byte each,
fp32 scales, kernel tables): a 32000x2048 Q4_0 head added ~120 MiB to a GGUF convert's peak, and an
fp32 head being quantized ~3 GiB. Rows are independent in every format (groups run along K), so a
weight is made block by block and each block is copied into its rows of the final tensors and
dropped: the temporaries are one block's. Blocks are whole multiples of 64 rows, which keeps every
int4 kernel layout's 16/32/64-row blocks intact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from hermesd.errors import ConvertError
from hermesd.quant.qweight import QuantizedWeight, QuantMeta, expected_dtypes, expected_shapes

BLOCK_ALIGN = 64  # rows; a multiple of every int4 kernel layout's block


def row_spans(n: int, row_bytes: int, block_bytes: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of about ``block_bytes`` (``row_bytes`` a row), 64-row aligned."""
    rows = max(BLOCK_ALIGN, block_bytes // max(1, row_bytes) // BLOCK_ALIGN * BLOCK_ALIGN)
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def part_meta(meta: QuantMeta, start: int, stop: int) -> QuantMeta:
    """``meta`` of rows ``start:stop`` of the weight."""
    return dataclasses.replace(meta, shape=(stop - start, meta.shape[1]))


def assemble_rows(meta: QuantMeta, spans: Iterator[tuple[int, int]] | list[tuple[int, int]],
                  make_part: Callable[[int, int], QuantizedWeight]) -> QuantizedWeight:
    """The weight ``meta`` whose rows ``start:stop`` are ``make_part(start, stop)`` for each span.

    The stored tensors are allocated once at their final size; each part is copied in and released
    before the next is made. A kernel table (``[groups, N, 2]``) is filled along its N axis.
    """
    dtypes = expected_dtypes(meta)
    out = {suffix: torch.empty(shape, dtype=dtypes[suffix]) for suffix, shape in expected_shapes(meta).items()}
    filled = 0
    for start, stop in spans:
        part = make_part(start, stop)
        if part.meta != part_meta(meta, start, stop):
            raise ConvertError(f"rows {start}:{stop} of a {meta.format} weight {meta.shape} came out as {part.meta}")
        for suffix, tensor in out.items():
            rows = tensor[:, start:stop] if suffix == "scales" and meta.table else tensor[start:stop]
            rows.copy_(getattr(part, suffix))
        filled += stop - start
        del part
    if filled != meta.shape[0]:
        raise ConvertError(f"{meta.format} weight {meta.shape}: {filled} rows made")
    return QuantizedWeight(meta, **out)
