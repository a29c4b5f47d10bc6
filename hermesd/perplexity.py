"""Perplexity of a causal LM store on a text: the quality measure of ``convert --quantize``."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def perplexity(engine, text: str, window: int = 512) -> tuple[float, int]:
    """``(perplexity, tokens scored)`` of ``text`` under ``engine``'s model, in windows of ``window`` tokens.

    Non-overlapping windows keep the cost linear; every token after a window's first is scored once.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(engine.store_dir), local_files_only=True)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    total_nll, scored = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start:start + window][None, :]
            if chunk.shape[1] < 2:
                break
            logits = engine.model(chunk).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum")
            total_nll += float(nll)
            scored += chunk.shape[1] - 1
    return math.exp(total_nll / scored), scored


def perplexity_of_store(store: str | Path, text: str, window: int = 512) -> tuple[float, int]:
    """Open ``store`` with everything resident and measure :func:`perplexity`."""
    import hermesd

    with hermesd.load(store, resident="all") as engine:
        return perplexity(engine, text, window)
