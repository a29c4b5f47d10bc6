"""Prompt passes with bf16 linears multiplied in fp32 (hermesd.fp32linear, a model's ``fp32_prompts``):
the product it computes, where it applies, and bf16 batches that use it against the same jobs alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_rowattention import PROMPTS, decode, same

from hermesd.decodebatch import DecodeBatch, Sequence
from hermesd.fp32linear import MIN_ROWS, Fp32Linears, linear_in_fp32
from hermesd.plan.batchmem import FP32_SLICE_BYTES
from hermesd.tasks import GenerateParams


def test_linear_in_fp32_is_the_fp32_product_rounded_once():
    torch.manual_seed(0)
    # more output features than one slice holds, so the weight is converted in several slices
    weight = (torch.randn(FP32_SLICE_BYTES // (4 * 256) * 2 + 3, 256) * 0.05).bfloat16()
    bias = torch.randn(weight.shape[0]).bfloat16()
    x = torch.randn(2, 9, 256).bfloat16()
    got = linear_in_fp32(x, weight, bias)
    expected = F.linear(x.float(), weight.float(), bias.float()).bfloat16()
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    emulated = F.linear(x, weight, bias)  # the bf16 kernel: the same values but for a few rounding steps
    assert (emulated != got).float().mean() < 0.01
    assert torch.allclose(emulated.float(), got.float(), rtol=2 ** -7, atol=1e-3)


def _row_invariant(weight: torch.Tensor) -> bool:
    """Whether this machine's fp32 product gives each row the same bits in products of any size."""
    x = torch.randn(40, weight.shape[1]).bfloat16()
    whole = linear_in_fp32(x, weight, None)
    return all(torch.equal(linear_in_fp32(x[a:b], weight, None), whole[a:b]) for a, b in ((0, 1), (3, 5), (7, 29)))


def test_short_products_are_padded_so_rows_keep_their_bits():
    torch.manual_seed(1)
    weight = (torch.randn(300, 128) * 0.05).bfloat16()
    assert MIN_ROWS >= 8  # fewer rows take the BLAS's matrix-vector kernels, which round differently
    assert _row_invariant(weight)


def test_the_mode_takes_half_precision_linears_and_conv1d_products_only():
    linear = torch.nn.Linear(64, 32).bfloat16()
    x = torch.randn(1, 3, 64).bfloat16()
    mode = Fp32Linears()
    with torch.inference_mode(), mode:
        got = linear(x)
        assert mode.calls == 1
        # GPT-2's Conv1D: addmm(bias, x, weight [in, out])
        conv = torch.addmm(linear.bias, x[0], linear.weight.T)
        assert mode.calls == 2
        linear.float()(torch.randn(4, 8, 64))  # fp32 needs nothing
        assert mode.calls == 2
    assert torch.equal(got, linear_in_fp32(x, linear.weight, linear.bias))
    assert torch.equal(conv, got[0])


def test_only_prompt_passes_multiply_in_fp32(bf16_decoder):
    batch = DecodeBatch(bf16_decoder, fp32_prompts=True)
    batch.admit([Sequence(prompt=p, params=GenerateParams(max_new_tokens=4)) for p in PROMPTS])
    after_prompt = batch.fp32_linears
    assert after_prompt >= bf16_decoder.model.config.num_hidden_layers  # every layer's projections, at least
    batch.step()
    assert batch.fp32_linears == after_prompt  # decode steps keep the bf16 kernel


def test_fp32_prompts_give_the_same_answers_alone_and_batched(bf16_decoder):
    default = [decode(bf16_decoder, [p], 8, rowwise=True)[0] for p in PROMPTS]
    alone = [decode(bf16_decoder, [p], 8, rowwise=True, fp32_prompts=True)[0] for p in PROMPTS]
    for (_, got), (_, bf16) in zip(alone, default):
        assert torch.allclose(got, bf16, rtol=0.05, atol=0.05)
    # alone or batched, joining at the start or mid-generation: bit-identical logits and tokens
    assert same(decode(bf16_decoder, PROMPTS, 8, rowwise=True, fp32_prompts=True), alone)
    assert same(decode(bf16_decoder, PROMPTS, 8, rowwise=True, join_after=3, fp32_prompts=True), alone)
