"""Continuous batching for ``generate``: every decode step is one forward pass (one weight sweep) over
all active sequences; sequences join and leave at step boundaries.

The batch keeps one transformers ``DynamicCache`` whose rows are the sequences, left-padded to a common
length; a 2-D attention mask hides the padding and explicit position ids count each row's own tokens,
so every row computes what it would compute alone (attention runs row by row on each row's real keys,
:mod:`hermesd.rowattention`, so even bf16 rounds as it does alone; with ``fp32_prompts`` the prompt
passes' linears multiply in fp32, alone and batched alike, :mod:`hermesd.fp32linear`). Joining
sequences run their prompt pass together (one sweep), then their cache rows are padded and
concatenated onto the batch's. A leaving sequence's rows are dropped, and columns that became padding
in every row are trimmed.

transformers' own continuous batching (``generate_batch``) does not fit a streamed model: it places its
paged cache and its tensors on ``model.device``, which is ``meta`` for a skeleton whose weights are bound
only while their stage runs, sizes that cache from the machine's free memory rather than the plan's
budget, and runs its own generation thread beyond the daemon's per-stage checkpoints.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from hermesd.decoding import StepControl
from hermesd.engine.engine import Engine
from hermesd.fp32linear import Fp32Linears
from hermesd.rowattention import NAME, use_rowwise_attention
from hermesd.tasks import GenerateParams, _check_length, _cut_at_stop, _eos_ids, _prompt_ids, task_problem


@dataclass(eq=False)
class Sequence:
    """One generate job inside a batch: its prompt, its tokens so far, and how it samples and stops.

    ``on_token`` is called with each new token id as it is chosen (progress counts, streamed text).
    """

    prompt: list[int]
    params: GenerateParams
    owner: Any = None
    on_token: Callable[[int], None] | None = None
    generated: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" or "length" once done
    generator: torch.Generator | None = None
    stops: StepControl | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def reserved_tokens(self) -> int:
        """Cache length this sequence may reach on its own: its prompt and every token it may add."""
        return len(self.prompt) + self.params.max_new_tokens


def prepare(engine: Engine, prompt: Any, params: GenerateParams, owner: Any = None,
            on_token: Callable[[int], None] | None = None) -> Sequence:
    """Tokenize a generate job (TaskError if it cannot run) into a sequence ready to join a batch."""
    problem = task_problem("generate", engine.manifest.architecture)
    if problem is not None:
        from hermesd.errors import TaskError

        raise TaskError(problem)
    ids = _prompt_ids(engine.tokenizer, prompt, params.chat)
    _check_length(engine, ids)
    generator = None
    if params.temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else int(torch.seed()))
    return Sequence(prompt=ids[0].tolist(), params=params, owner=owner, on_token=on_token, generator=generator,
                    stops=StepControl(engine.tokenizer, 0, params.stop) if params.stop else None)


class DecodeBatch:
    """The sequences decoding together on one engine, and their shared KV cache."""

    def __init__(self, engine: Engine, rowwise_attention: bool = True, fp32_prompts: bool = False) -> None:
        """``fp32_prompts``: prompt passes multiply half-precision linears in fp32 (:mod:`hermesd.fp32linear`:
        faster where bf16 is emulated, the same bits alone and batched, not transformers' bf16 bits)."""
        self.engine = engine
        self.fp32_prompts = fp32_prompts
        self.fp32_linears = 0  # linear layers the prompt passes multiplied in fp32
        self.model = engine.model
        if rowwise_attention:
            use_rowwise_attention(self.model)  # padded rows attend exactly as they would alone
        elif self.model.config._attn_implementation == NAME:
            self.model.set_attn_implementation("sdpa")
        self.eos = _eos_ids(engine, engine.tokenizer)
        tokenizer = engine.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.seqs: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [rows, cache length]: 1 where a real token is

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def length(self) -> int:
        """Columns of the padded cache."""
        return int(self.mask.shape[1])

    def projected_length(self, joining: list[Sequence] = ()) -> int:
        """The padded cache length this batch may reach if ``joining`` join now and nobody leaves early."""
        column = self.length
        shift = max([0, *[len(s.prompt) - column for s in joining]])
        ends = [column + shift + s.params.max_new_tokens - len(s.generated) for s in self.seqs]
        start = max(column, *[len(s.prompt) for s in joining]) if joining else column
        ends += [start + s.params.max_new_tokens for s in joining]
        return max(ends, default=0)

    # -- membership ---------------------------------------------------------------------------
    def admit(self, joining: list[Sequence]) -> list[Sequence]:
        """Run the prompt pass of ``joining`` (one forward), choose each one's first token and add them
        to the batch. Returns those already finished (a one-token job, an immediate stop)."""
        width = max(len(s.prompt) for s in joining)
        ids = torch.tensor([[self.pad] * (width - len(s.prompt)) + s.prompt for s in joining])
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in joining])
        cache = DynamicCache()
        logits = self._forward(ids, mask, cache, fp32=self.fp32_prompts)
        self._merge(joining, cache, mask)
        return self._choose(joining, logits)

    def step(self) -> list[Sequence]:
        """One decode step (one forward) for every sequence; returns the sequences that finished."""
        ids = torch.tensor([[s.generated[-1]] for s in self.seqs])
        self.mask = torch.cat([self.mask, torch.ones(len(self.seqs), 1, dtype=torch.long)], dim=1)
        logits = self._forward(ids, self.mask, self.cache)
        return self._choose(list(self.seqs), logits)

    def remove(self, leaving: list[Sequence]) -> None:
        """Drop sequences (finished, cancelled, past their deadline); the others keep their state."""
        keep = [i for i, s in enumerate(self.seqs) if s not in leaving]
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
            return
        index = torch.tensor(keep)
        used = self.mask[index].any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.length  # columns before it are padding in every row
        self.mask = self.mask[index, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]

    # -- internals ----------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, fp32: bool = False) -> torch.Tensor:
        """Logits of each row's last position ([rows, vocab], fp32) after feeding ``ids``; ``fp32``: the
        linears multiply in fp32 (hermesd.fp32linear)."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        linears = Fp32Linears() if fp32 else None
        with torch.inference_mode(), linears or contextlib.nullcontext():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        self.fp32_linears += linears.calls if linears else 0
        return out.logits[:, -1, :].float()

    def _merge(self, joining: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self.cache is None:
            self.seqs, self.cache, self.mask = list(joining), cache, mask
            return
        width = max(self.length, mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
            old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
        self.seqs += joining

    def _choose(self, rows: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        finished = []
        for seq, row in zip(rows, logits):
            token = _next_token(seq, row)
            seq.generated.append(token)
            if seq.on_token is not None:
                seq.on_token(token)
            if token in self.eos or (seq.stops is not None and _stopped(seq)):
                seq.finish = "stop"
            elif len(seq.generated) >= seq.params.max_new_tokens:
                seq.finish = "length"
            if seq.done:
                finished.append(seq)
        return finished

    def result(self, seq: Sequence) -> dict[str, Any]:
        """The job's answer, as ``hermesd.tasks.generate`` gives it."""
        text = self.engine.tokenizer.decode(seq.generated, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, seq.params.stop)
        finish = "stop" if stopped else (seq.finish or "stop")
        return {"text": text, "prompt_tokens": len(seq.prompt), "new_tokens": len(seq.generated),
                "finish_reason": finish}


def supports_batching(engine: Engine) -> bool:
    """Whether this model's cache is made of plain dynamic layers (what ``DecodeBatch`` pads and joins)."""
    probe = DynamicCache(config=engine.model.config)
    return all(type(layer) is DynamicLayer for layer in probe.layers)


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _stopped(seq: Sequence) -> bool:
    return bool(seq.stops(torch.tensor([seq.generated]), None)[0])


def _next_token(seq: Sequence, logits: torch.Tensor) -> int:
    """Greedy at temperature 0; else temperature, top-k, top-p and a draw from the job's own generator."""
    params = seq.params
    if params.temperature <= 0:
        return int(logits.argmax())
    scores = (logits / float(params.temperature)).unsqueeze(0)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(float(params.top_p))(None, scores)
    probabilities = scores.softmax(-1)
    return int(torch.multinomial(probabilities, 1, generator=seq.generator))
