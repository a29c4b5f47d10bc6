"""hermesd's own int4 kernel for a few rows on x86 (AVX2 + FMA), called through ctypes.

torch's ``_weight_int4pack_mm_for_cpu`` de-quantizes every weight before multiplying and takes the
activations in bf16. Our kernel (``native/q4gemm.c``) reads the same stored bytes (torch's AVX2 code
layout, ``halves32``, and its bf16 ``[groups, N, 2]`` scale/zero table), sums codes against fp32
activations per group and applies scale and zero once per group: measured 2.2x faster on one
thread for a 5632x2048 weight at one row, with fp32 activations (``bench/quant_kernels.py``).

The kernel is an optional compiled extension (``setup.py``); where it was not built, or the CPU
lacks AVX2/FMA, or a shape is not one it takes, :func:`int4_gemm` returns ``None`` and the caller
uses torch's kernel. ``HERMESD_INT4_KERNEL=torch`` turns it off (to compare the two).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import torch

from hermesd.quant.cpu import cpu_flags

LAYOUT = "halves32"  # the only code layout the kernel reads (torch's on AVX2 machines)
# Rows up to which ours beats torch's kernel (bench.quant_kernels --sections int4: 1.8x at one row,
# 1.7x at two, even at four, behind from eight: it decodes the codes once per pair of rows).
MAX_ROWS = 32
_ARGS = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The built kernel, or ``None`` (not built, switched off, or a CPU without AVX2/FMA)."""
    if os.environ.get("HERMESD_INT4_KERNEL", "").lower() == "torch":
        return None
    if not {"avx2", "fma"} <= cpu_flags():
        return None
    spec = importlib.util.find_spec("hermesd.quant._q4gemm")
    if spec is None or spec.origin is None:
        return None
    lib = ctypes.CDLL(spec.origin)  # after torch: its libgomp.so.1 is the one OpenMP binds to
    if not lib.hq4_available():
        return None
    lib.hq4_gemm_halves32.argtypes = _ARGS
    lib.hq4_gemm_halves32.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether :func:`int4_gemm` can run here."""
    return _library() is not None


def int4_gemm(x2: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """``x2 [M, K] @ W.T`` in fp32 for codes in the ``halves32`` layout, or ``None`` where the kernel
    does not apply (then nothing was computed): not built here, more than :data:`MAX_ROWS` rows, a
    table not in bf16, N not a multiple of 32, or K not a multiple of the group size."""
    lib = _library()
    if lib is None or x2.shape[0] > MAX_ROWS or table.dtype != torch.bfloat16:
        return None
    if not (table.is_contiguous() and codes.is_contiguous()):
        return None
    m, k = x2.shape
    n = table.shape[1]
    x = x2.to(torch.float32).contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    xsum = torch.empty(m * (k // group_size), dtype=torch.float32)
    status = lib.hq4_gemm_halves32(x.data_ptr(), m, k, codes.data_ptr(), table.data_ptr(), y.data_ptr(), n, n, k,
                                   group_size, xsum.data_ptr(), torch.get_num_threads())
    return y if status == 0 else None
