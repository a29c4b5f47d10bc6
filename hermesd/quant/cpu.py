"""CPU features and the kernel policy they imply (measured choices, see bench/quant_kernels.py)."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """Feature flags of CPU 0 from /proc/cpuinfo (``flags`` on x86, ``Features`` on arm); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_fast_bf16_matmul() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16/AMX on x86, BF16 on arm).

    Without it oneDNN emulates bf16 GEMM, and on the AVX2 machine we measured bf16 ``F.linear`` for
    128 tokens 5x slower than fp32, so prompts run de-quantized in fp32 there.
    """
    flags = cpu_flags()
    if platform.machine() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def int_kernel_dtype() -> torch.dtype:
    """Activation dtype for torch's int4/int8 CPU kernels.

    On x86 only their bf16 variants are vectorised (fp32/fp16 fall back to a scalar loop that we
    measured 10-20x slower), so fp32 inputs are rounded to bf16 for them. The aarch64 NEON kernel
    handles fp32 directly.
    """
    return torch.float32 if platform.machine() in ("aarch64", "arm64") else torch.bfloat16


@dataclass(frozen=True)
class KernelPolicy:
    """Which path a quantized Linear takes, by the number of rows ``M`` it multiplies."""

    kernel_max_m: int = 32  # int8/int4 kernels up to this many rows, de-quantize + F.linear above
    int4x2_max_m: int = 8  # the two-plane int4 path costs twice the kernel work: it stops earlier
    kernel_dtype: torch.dtype = torch.bfloat16  # activation dtype inside the integer kernels
    dense_dtype: torch.dtype = torch.float32  # de-quantized weight dtype for F.linear
    # 5..8-bit group types as two int4 kernel planes: ~1.4x faster than dense at M=1 but re-packing
    # costs ~8 ms/MB at every load (7x a disk read), so only worth it for stages kept resident
    use_int4x2: bool = False
    dense_chunk_bytes: int = 8 << 20  # de-quantize at most this much weight at a time (scratch bound)


@functools.lru_cache(maxsize=1)
def default_policy() -> KernelPolicy:
    """The policy for this machine: measured thresholds, dtypes from its CPU features."""
    dense = torch.bfloat16 if has_fast_bf16_matmul() else torch.float32
    return KernelPolicy(kernel_dtype=int_kernel_dtype(), dense_dtype=dense)
