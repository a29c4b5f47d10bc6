"""``QuantLinear``: a drop-in ``nn.Linear`` whose state dict is exactly a weight's stored tensors."""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import nn

from hermesd.errors import ConvertError
from hermesd.quant.cpu import KernelPolicy, default_policy
from hermesd.quant.kernels import DENSE, INT4X2, Prepared, kernel_path, prepare, run_dense, run_kernel
from hermesd.quant.qweight import QuantizedWeight, QuantMeta, register_stored_buffers


def _version(t: torch.Tensor) -> int:
    """A tensor's in-place modification counter; -1 for inference tensors, which keep none."""
    try:
        return t._version
    except RuntimeError:
        return -1


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` kept quantized (see :mod:`hermesd.quant.qweight`).

    Buffers ``qweight``, ``scales`` and, where the format has them, ``zeros`` and ``super_scales``
    (plus the float parameter ``bias``) are the tensors of the stage file, so the engine binds them
    with ``load_state_dict(..., assign=True)`` or by assigning views. ``forward`` takes any leading
    dims and fp32/bf16/fp16 inputs and returns the input dtype. For ``M`` rows up to
    ``policy.kernel_max_m`` it uses torch's integer kernels when the format has one; above that it
    de-quantizes into a reused scratch buffer and calls ``F.linear``.

    Kernel-ready tensors are made by :meth:`prepare` (a loader thread may call it right after
    binding) or lazily by the first small-M forward; they are dropped by :meth:`release` and
    rebuilt whenever ``qweight`` is re-bound or modified through torch. After ``prepare(inplace=True)``
    the bound ``qweight`` bytes are in the CPU kernel layout: refill them only by re-binding.
    """

    def __init__(self, qmeta: QuantMeta, bias: bool = False, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, policy: KernelPolicy | None = None) -> None:
        super().__init__()
        self.qmeta = qmeta
        self.out_features, self.in_features = qmeta.shape
        self.policy = policy or default_policy()
        register_stored_buffers(self, qmeta, device)
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None
        self._prepared: Prepared | None = None
        self._bound: tuple[weakref.ref[torch.Tensor], int] | None = None
        self._kernel_path: str | None = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       policy: KernelPolicy | None = None) -> QuantLinear:
        """A module holding ``qw``'s tensors (shared, not copied) and an optional float bias."""
        mod = cls(qw.meta, bias=bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float32,
                  device="meta", policy=policy)
        tensors = qw.tensors("")
        state = {k[1:]: v for k, v in tensors.items()}
        if bias is not None:
            state["bias"] = bias.detach()
        mod.load_state_dict(state, assign=True)
        return mod

    def quantized(self) -> QuantizedWeight:
        """The bound tensors as a :class:`QuantizedWeight`, its packing that of the bytes right now."""
        packing = self.qmeta.packing
        if self._prepared is not None and self._is_current():
            packing = self._prepared.bound_packing  # changed by prepare(inplace=True)
        meta = dataclasses.replace(self.qmeta, packing=packing)
        return QuantizedWeight(meta, self.qweight, self.scales, self.zeros, self.super_scales, self.qhigh)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[N, K]`` (the reference the kernels are tested against)."""
        return self.quantized().dequantize(dtype)

    def _is_current(self) -> bool:
        """Whether the prepared tensors still belong to the bound ``qweight``."""
        if self._bound is None:
            return False
        ref, version = self._bound
        return ref() is self.qweight and _version(self.qweight) == version

    def prepare(self, inplace: bool = False) -> str:
        """Build the kernel-ready tensors now (e.g. on a loader thread); returns the small-M path.

        4-bit codes stored in this CPU's kernel layout are used as bound (zero-copy). Others are
        re-packed: into a new tensor, or with ``inplace=True`` inside the bound ``qweight`` (no
        extra memory; the buffer must be writable and private to this module until re-bound).
        """
        if self._is_current() and self._prepared is not None:
            return self._prepared.path
        qw = QuantizedWeight(self.qmeta, self.qweight, self.scales, self.zeros, self.super_scales,
                             self.qhigh)
        path = self.small_m_path()
        if path == DENSE:
            self._prepared = None
            self._bound = None
            return path
        self._prepared = prepare(qw, path, self.policy.kernel_dtype, inplace)
        self._bound = (weakref.ref(self.qweight), _version(self.qweight))
        return path

    def small_m_path(self) -> str:
        """The path for a few rows (``int8``, ``int4``, ``int4x2`` or ``dense``); nothing is prepared."""
        if self._kernel_path is None:
            self._kernel_path = kernel_path(self.qmeta, self.policy)
        return self._kernel_path

    def max_kernel_rows(self) -> int:
        """Largest M that still takes the integer kernel (measured crossover, see the policy)."""
        return self.policy.int4x2_max_m if self.small_m_path() == INT4X2 else self.policy.kernel_max_m

    def release(self) -> None:
        """Forget the kernel-ready tensors (an in-place converted ``qweight`` must be re-bound after)."""
        self._prepared = None
        self._bound = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., K]`` to ``[..., N]`` in ``x.dtype``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)
        if self.small_m_path() == DENSE or x2.shape[0] > self.max_kernel_rows():
            path = DENSE
        else:
            path = self.prepare()
        if path == DENSE:
            y = run_dense(x2, self.quantized(), self.policy, self.bias)
        else:
            assert self._prepared is not None
            y = run_kernel(x2, self._prepared, self.qmeta.group_size)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.qmeta.format}, group_size={self.qmeta.group_size}, bias={self.bias is not None}")


def quantize_linear(linear: nn.Linear, scheme: str, group_size: int | None = None,
                    policy: KernelPolicy | None = None) -> QuantLinear:
    """A :class:`QuantLinear` from a float ``nn.Linear`` with our ``int8``/``int4`` quantizer."""
    from hermesd.quant.quantizer import quantize

    if not isinstance(linear, nn.Linear):
        raise ConvertError(f"expected nn.Linear, got {type(linear).__name__}")
    qw = quantize(linear.weight.detach(), scheme, group_size)
    return QuantLinear.from_quantized(qw, linear.bias, policy)
