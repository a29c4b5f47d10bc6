"""Prompt passes of half-precision models with their linear layers multiplied in fp32 (opt-in).

On a CPU without native bf16 (AVX2 only: no AVX512-BF16, no AMX), torch multiplies a bf16 weight one
input row at a time: a 17-token prompt costs 17 one-row passes, and a batch's joint prompt pass of 8
jobs (136 rows) 8 lone prompt passes. Converting the weight to fp32 in slices and running one fp32
matrix product is 1.6x faster at 17 rows and 4-5x at 136-290 rows, measured on this project's 2-core
EPYC (bench notes in BENCHMARKS.md, "Batching").

What it costs: the fp32 product accumulates in another order than the bf16 kernel, so about 1 output
in 6,000 rounds to the neighbouring bf16 value, and answers may differ from transformers' bf16 forward
(which is why it is off unless a model's ``fp32_prompts`` asks for it). What it keeps: the fp32 product
gives a row the same bits whatever other rows share the product, once the product has at least
:data:`MIN_ROWS` rows (shorter ones are padded up to it), so a job's prompt pass computes the same alone
and in a batch; decode steps keep the bf16 kernel, which treats every row on its own. Batched answers
then equal solo ones (``tests/test_fp32linear.py`` checks that this machine's BLAS has that property).

Memory: the weight is converted ``SLICE_BYTES`` at a time, so a pass holds one fp32 slice, the fp32
input and one slice's fp32 output beside its usual activations; the batch's memory allowance counts
them (:func:`hermesd.plan.batchmem.fp32_pass_bytes`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hermesd.plan.batchmem import FP32_MIN_ROWS
from hermesd.plan.batchmem import FP32_SLICE_BYTES as SLICE_BYTES

HALF = (torch.bfloat16, torch.float16)
# Below ~8 rows the BLAS takes other (matrix-vector) kernels whose sums round differently; products are
# padded to this many rows so that every prompt pass, alone or batched, takes the same kernels.
MIN_ROWS = FP32_MIN_ROWS


class Fp32Linears(TorchFunctionMode):
    """Within this mode, ``F.linear`` on a bf16/fp16 input with a plain weight of the same dtype is
    computed in fp32 from that weight (:func:`linear_in_fp32`) and rounded back once; so is
    ``torch.addmm(bias, x, weight)``, the form of GPT-2's ``Conv1D`` layers (weight stored [in, out])."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0  # linears computed in fp32 (tests read it)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and _eligible(args[:2]):
            self.calls += 1
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return linear_in_fp32(args[0], args[1], bias)
        if func is torch.addmm and not kwargs and len(args) == 3 and args[0].dim() == 1 and _eligible(args[1:]):
            self.calls += 1
            return linear_in_fp32(args[1], args[2].T, args[0])
        return func(*args, **kwargs)


def _eligible(pair: tuple) -> bool:
    """Whether (input, weight) are plain half-precision tensors of one dtype, the weight a matrix."""
    if len(pair) < 2:
        return False
    x, weight = pair
    if type(x) not in (torch.Tensor, torch.nn.Parameter) or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return False  # a tensor subclass (quantized weights) computes its own way
    return x.dtype in HALF and weight.dtype == x.dtype and weight.dim() == 2


def linear_in_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` accumulated in fp32 with at least :data:`MIN_ROWS` rows per product,
    the weight converted slice by slice; the result in x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).float()
    count = rows.shape[0]
    if count < MIN_ROWS:
        rows = torch.cat([rows, rows.new_zeros(MIN_ROWS - count, rows.shape[1])])
    out_features = weight.shape[0]
    out = torch.empty(count, out_features, dtype=x.dtype)
    step = max(1, SLICE_BYTES // (4 * weight.shape[1]))
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        part_bias = bias[start:stop].float() if bias is not None else None
        out[:, start:stop] = F.linear(rows, weight[start:stop].float(), part_bias)[:count]
    return out.reshape(*x.shape[:-1], out_features)
