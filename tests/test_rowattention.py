"""Row-wise attention in a padded batch: the masks it recognises, and bf16 batches that match lone runs."""

from __future__ import annotations

import torch

from hermesd.decodebatch import DecodeBatch, Sequence
from hermesd.rowattention import NAME, left_padding
from hermesd.tasks import GenerateParams


def causal_left_padded(starts: list[int], q_len: int, kv_len: int) -> torch.Tensor:
    """transformers' SDPA mask for left-padded rows: [B, 1, Q, K] bool, True where a query may look."""
    keys = torch.arange(kv_len)
    queries = torch.arange(kv_len - q_len, kv_len)[:, None]
    return torch.stack([(keys <= queries) & (keys >= start) for start in starts])[:, None]


def test_left_padding_reads_each_rows_first_real_column():
    assert left_padding(causal_left_padded([0, 3, 5], 8, 8), 8, 8) == [0, 3, 5]
    assert left_padding(causal_left_padded([2, 0], 1, 12), 1, 12) == [2, 0]  # a decode step


def test_left_padding_reads_additive_float_masks():
    allowed = causal_left_padded([1, 0], 4, 4)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert left_padding(additive, 4, 4) == [1, 0]


def test_other_masks_are_left_to_plain_sdpa():
    right_padded = causal_left_padded([0, 0], 6, 6)
    right_padded[1, ..., 4:] = False  # the second row's last two columns are padding
    assert left_padding(right_padded, 6, 6) is None
    window = causal_left_padded([0, 0], 6, 6)
    window[..., 5, 0] = False  # a sliding window hides the oldest key from the last query
    assert left_padding(window, 6, 6) is None
    assert left_padding(causal_left_padded([0], 6, 6)[:, :, :, :5], 6, 6) is None  # wrong shape


PROMPTS = [[5, 17, 99, 230, 7], [11, 12], [400, 401, 402, 403, 404, 405, 406, 407, 408], [3, 1000, 2000]]


class RecordingBatch(DecodeBatch):
    """A DecodeBatch that keeps every row's logits at every step, by sequence."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: dict[int, list[torch.Tensor]] = {}

    def _choose(self, rows, logits):
        for seq, row in zip(rows, logits):
            self.logits.setdefault(id(seq), []).append(row.clone())
        return super()._choose(rows, logits)


def decode(engine, prompts: list[list[int]], tokens: int, rowwise: bool, join_after: int | None = None,
           fp32_prompts: bool = False) -> list:
    """Each prompt's greedy tokens and stacked logits, decoded in one batch; with ``join_after`` the
    second half of the prompts joins after that many steps."""
    params = GenerateParams(max_new_tokens=tokens)
    seqs = [Sequence(prompt=p, params=params) for p in prompts]
    batch = RecordingBatch(engine, rowwise_attention=rowwise, fp32_prompts=fp32_prompts)
    waiting = seqs[len(seqs) // 2:] if join_after is not None else []
    batch.remove(batch.admit([s for s in seqs if s not in waiting]))
    steps = 0
    while len(batch) or waiting:
        if waiting and steps == join_after:
            batch.remove(batch.admit(waiting))
            waiting = []
        if len(batch):
            batch.remove(batch.step())
        steps += 1
    return [(s.generated, torch.stack(batch.logits[id(s)])) for s in seqs]


def same(runs_a: list, runs_b: list) -> bool:
    """Identical tokens and bit-identical logits, sequence by sequence."""
    return all(ta == tb and torch.equal(la, lb) for (ta, la), (tb, lb) in zip(runs_a, runs_b, strict=True))


def test_bf16_batch_equals_each_sequence_alone(bf16_decoder):
    assert bf16_decoder.manifest.dtype == "bfloat16"
    alone = [decode(bf16_decoder, [p], 12, rowwise=True)[0] for p in PROMPTS]
    assert same(decode(bf16_decoder, PROMPTS, 12, rowwise=True), alone)
    assert same(decode(bf16_decoder, PROMPTS, 12, rowwise=True, join_after=4), alone)
    assert bf16_decoder.model.config._attn_implementation == NAME


def test_padded_sdpa_is_what_rounds_differently(bf16_decoder):
    """The reason for the row-wise path: plain SDPA over the padded batch does not give the lone logits,
    while one row computes the same with either implementation."""
    alone = [decode(bf16_decoder, [p], 12, rowwise=False)[0] for p in PROMPTS]
    assert same(alone, [decode(bf16_decoder, [p], 12, rowwise=True)[0] for p in PROMPTS])
    assert not same(decode(bf16_decoder, PROMPTS, 12, rowwise=False), alone)
