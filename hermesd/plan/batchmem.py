"""Memory of a batch: what several jobs sharing one weight sweep hold beside the plan's weights.

A plan (hermesd.plan.budget) reserves ``activation_bytes`` for the largest single job its model's
config allows, and leaves ``budget - peak_bound`` unused. A batch may use exactly that room, its
*allowance*: the KV caches of its sequences (padded to one length, as a batched cache is), one decode
step's activations for every row, and the prompt pass of the sequences joining at this step. A job
that would push the batch past its allowance waits until members leave.
"""

from __future__ import annotations

from hermesd.plan.budget import Plan, activation_bytes
from hermesd.plan.workload import Workload
from hermesd.store.manifest import Manifest

FP32_SLICE_BYTES = 4 << 20  # fp32 weight converted at a time when a prompt multiplies in fp32 (hermesd.fp32linear)
FP32_MIN_ROWS = 16  # rows such a product is padded to (why: hermesd.fp32linear)


def _shape(manifest: Manifest) -> tuple[int, int, int, int, int, int, int]:
    cfg = manifest.config

    def first(*keys: str, default: int) -> int:
        return next((cfg[k] for k in keys if isinstance(cfg.get(k), int)), default)

    hidden = first("hidden_size", "n_embd", "d_model", default=1024)
    layers = first("num_hidden_layers", "n_layer", "num_layers", default=24)
    heads = first("num_attention_heads", "n_head", default=16)
    kv_heads = first("num_key_value_heads", default=heads)
    inner = first("intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden
    vocab = first("vocab_size", "num_labels", default=2)
    elem = 4 if manifest.dtype == "float32" else 2
    return hidden, layers, heads, kv_heads, inner, vocab, elem


def kv_bytes_per_token(manifest: Manifest) -> int:
    """Keys and values of one token in every layer (one row of the cache)."""
    hidden, layers, heads, kv_heads, _, _, elem = _shape(manifest)
    return 2 * layers * kv_heads * (hidden // max(heads, 1)) * elem


def step_bytes(manifest: Manifest, rows: int, context: int) -> int:
    """Activations of one decode step: ``rows`` new tokens attending to ``context`` positions each
    (hidden states, fp32 attention scores, and fp32 logits of the last position only)."""
    hidden, _, heads, _, inner, vocab, elem = _shape(manifest)
    return rows * ((8 * hidden + 2 * inner) * elem + heads * context * 4 + vocab * 4)


def fp32_pass_bytes(manifest: Manifest, rows: int) -> int:
    """What a prompt pass of ``rows`` tokens adds while a half-precision linear runs in fp32
    (hermesd.fp32linear): one converted weight slice, the fp32 input and one slice's fp32 output,
    rows padded to at least :data:`FP32_MIN_ROWS`."""
    hidden, _, _, _, inner, _, elem = _shape(manifest)
    if elem == 4:
        return 0
    widest, rows = max(hidden, inner), max(rows, FP32_MIN_ROWS)
    return FP32_SLICE_BYTES + rows * widest * 4 + rows * (FP32_SLICE_BYTES // (4 * widest) + 1) * 4


def prefill_bytes(manifest: Manifest, rows: int, tokens: int) -> int:
    """The prompt pass of ``rows`` prompts padded to ``tokens`` (the plan's own estimate, KV included)."""
    return activation_bytes(manifest, Workload(prompt_tokens=max(tokens, 1), batch=max(rows, 1)))


def allowance(plan: Plan) -> int | None:
    """Bytes a batch may hold: the plan's activation share plus what the budget leaves unused.
    None without a budget (the batch is then bounded by its size limit alone)."""
    if plan.budget is None:
        return None
    return plan.activation_bytes + max(0, plan.budget - plan.peak_bound)


def batch_bytes(manifest: Manifest, rows: int, length: int, joining: int = 0, joining_tokens: int = 0,
                fp32: bool = False) -> int:
    """A generate batch of ``rows`` sequences whose padded cache reaches ``length`` tokens, while
    ``joining`` of them run their prompt pass of ``joining_tokens`` (padded); ``fp32``: prompt passes
    multiply their linears in fp32 (the model's ``fp32_prompts``)."""
    kv = rows * length * kv_bytes_per_token(manifest)
    passes = step_bytes(manifest, rows, length)
    if joining:
        prompt = prefill_bytes(manifest, joining, joining_tokens)
        prompt += fp32_pass_bytes(manifest, joining * joining_tokens) if fp32 else 0
        passes = max(passes, prompt)
    return kv + passes


def max_batch(manifest: Manifest, plan: Plan, prompt_tokens: int, new_tokens: int, limit: int,
              fp32: bool = False) -> int:
    """The most sequences of ``prompt_tokens`` + ``new_tokens`` that fit the allowance together
    (at least 1: the plan was made for one such job), capped at ``limit``."""
    room = allowance(plan)
    if room is None:
        return limit
    length = prompt_tokens + new_tokens
    rows = 1
    while rows < limit and batch_bytes(manifest, rows + 1, length, 1, prompt_tokens, fp32) <= room:
        rows += 1
    return rows


def rows_fit(manifest: Manifest, plan: Plan, rows: int, tokens: int) -> bool:
    """Whether a one-pass batch of ``rows`` inputs padded to ``tokens`` fits the allowance."""
    room = allowance(plan)
    return room is None or rows <= 1 or prefill_bytes(manifest, rows, tokens) <= room
