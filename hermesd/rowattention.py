"""Attention one row at a time inside a left-padded batch, so that every batched row computes exactly
what it computes alone.

A padded batch hands transformers' SDPA attention a mask, and with a mask SDPA takes other kernels than
a lone sequence does (no ``is_causal`` fast path, key/value heads repeated instead of grouped, another
reduction length). In fp32 the difference stays below what flips a token; in bf16 it rounds to whole
ulps and greedy answers drift (78-81 % of tokens agreed on SmolLM2 bf16 before this). The linear layers
are not affected: they treat every row on its own, and the batch is where they share the weight sweep.

``rowwise_sdpa`` is registered with transformers as the attention implementation :data:`NAME`. For one
row, or a mask it does not recognise, it is plain SDPA. For a batch whose mask is "causal after a
left padding" in every row, it calls SDPA once per row on that row's real keys with no mask, as the
lone run does. Query rows that are padding get zeros: nothing reads them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NAME = "hermesd_rows"
# transformers' attention and mask modules are imported on first use, not with this module: they pull
# in its modeling stack (+75-90 MiB RSS), which a daemon that has not opened a model yet does not hold,
# and budgets are checked against the daemon's RSS at startup.


def rowwise_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run per row on each row's unpadded keys (see the module doc)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = None
    if query.shape[0] > 1 and attention_mask is not None and _plain(kwargs):
        starts = _cached_left_padding(attention_mask, query.shape[-2], key.shape[-2])
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, _, q_len, _ = query.shape
    out = query.new_zeros(batch, q_len, query.shape[1], value.shape[-1])
    first_query_key = key.shape[-2] - q_len  # key column of query row 0
    for row, start in enumerate(starts):
        q_from = max(0, start - first_query_key)
        part, _ = sdpa_attention_forward(module, query[row:row + 1, :, q_from:], key[row:row + 1, :, start:],
                                         value[row:row + 1, :, start:], None, **kwargs)
        out[row, q_from:] = part[0]
    return out, None


def _plain(kwargs: dict[str, Any]) -> bool:
    """No sliding window, position bias or paged cache: the mask is all there is to reproduce."""
    return all(kwargs.get(name) is None for name in ("sliding_window", "position_bias", "cache", "softcap"))


def left_padding(mask: torch.Tensor, q_len: int, kv_len: int) -> list[int] | None:
    """Each row's first real key column when ``mask`` ([B, 1 or H, Q, K], bool or additive float) is
    exactly "causal, after ``start`` padding columns" in every row; ``None`` for any other mask."""
    if mask.dim() != 4 or mask.shape[-2:] != (q_len, kv_len):
        return None
    if mask.shape[1] > 1 and not bool((mask == mask[:, :1]).all()):
        return None
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0  # [B, Q, K]
    last = allowed[:, -1]  # the last query sees every real key of its row
    if not bool(last.any(dim=-1).all()):
        return None
    starts = last.int().argmax(dim=-1)  # first True per row
    keys, queries = torch.arange(kv_len), torch.arange(kv_len - q_len, kv_len)
    expected = (keys <= queries[:, None]) & (keys >= starts[:, None, None])  # [B, Q, K]
    real = queries >= starts[:, None]  # [B, Q]: query rows that are real tokens
    return starts.tolist() if torch.equal(allowed[real], expected[real]) else None


_last_mask: tuple[torch.Tensor, int, int, list[int] | None] | None = None


def _cached_left_padding(mask: torch.Tensor, q_len: int, kv_len: int) -> list[int] | None:
    """:func:`left_padding`, read once per forward: every layer gets the same mask object."""
    global _last_mask
    cached = _last_mask  # one read: another thread may replace it, never change it
    if cached is None or cached[0] is not mask or cached[1:3] != (q_len, kv_len):
        cached = _last_mask = (mask, q_len, kv_len, left_padding(mask, q_len, kv_len))  # holds the mask: no id reuse
    return cached[3]


def use_rowwise_attention(model: nn.Module) -> bool:
    """Switch ``model`` from SDPA to :data:`NAME` (same results for one row); False where it does not use SDPA."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, rowwise_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA gets: None where it may skip one
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, TypeError, AttributeError, NotImplementedError):  # a model class that refuses it
        return False  # keeps plain SDPA: batches stay correct, bf16 rows may round as padded rows do
    return True
