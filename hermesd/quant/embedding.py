"""``QuantEmbedding``: a drop-in ``nn.Embedding`` whose table stays quantized (rows de-quantized on lookup).

Every stored tensor of a :class:`~hermesd.quant.qweight.QuantizedWeight` is row-major along N, so
row ``i`` of the table is row ``i`` of each of ``qweight``, ``scales``, ``zeros`` and
``super_scales``. A lookup selects those rows and de-quantizes only them: the same fp32 values as
de-quantizing the whole table, at the cost of the batch's distinct tokens. The engine's row
gathering relies on the same property: it reads the rows of each part from disk and binds the
compact tables, then remaps the token ids onto them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from hermesd.errors import ConvertError
from hermesd.quant.bitplanes import PLANES
from hermesd.quant.dequant import dequantize
from hermesd.quant.int4pack import ROWMAJOR
from hermesd.quant.qweight import SUFFIXES, QuantizedWeight, QuantMeta, register_stored_buffers


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` over a quantized table ``[num_embeddings, embedding_dim]``; outputs ``out_dtype``.

    Buffers are the stored tensors (``qweight``, ``scales``, and ``zeros``/``super_scales`` where the
    format has them). ``padding_idx`` is kept for parity with ``nn.Embedding``; it only affects
    gradients there, so lookups ignore it.
    """

    def __init__(self, qmeta: QuantMeta, out_dtype: torch.dtype = torch.float32, padding_idx: int | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if qmeta.packing not in (ROWMAJOR, PLANES):  # kernel layouts mix rows within a byte: no rows to pick
            raise ConvertError(f"a quantized embedding table needs row-major codes, not {qmeta.packing!r}")
        self.qmeta = qmeta
        self.num_embeddings, self.embedding_dim = qmeta.shape
        self.out_dtype = out_dtype
        self.padding_idx = padding_idx
        register_stored_buffers(self, qmeta, device)

    def parts(self) -> dict[str, torch.Tensor]:
        """The bound stored tensors by suffix."""
        return {s: t for s in SUFFIXES if (t := self._buffers.get(s)) is not None}

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """De-quantized rows ``index`` (1-D) of the bound table, ``[len(index), embedding_dim]``."""
        picked = {s: t.index_select(0, index) for s, t in self.parts().items()}
        meta = dataclasses.replace(self.qmeta, shape=(int(index.numel()), self.embedding_dim))
        qw = QuantizedWeight(meta, picked["qweight"], picked["scales"], picked.get("zeros"),
                             picked.get("super_scales"), picked.get("qhigh"))
        return dequantize(qw, self.out_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        return F.embedding(inverse, self.rows(unique))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole float table (a reference for tests)."""
        return self.rows(torch.arange(self.num_embeddings)).to(dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, format={self.qmeta.format}, "
                f"out_dtype={self.out_dtype}")
