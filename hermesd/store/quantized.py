"""Quantized modules in a skeleton: which ``nn.Linear``/``nn.Embedding`` become quantized, and the swap.

A store whose weights stay quantized records, per stage, the modules it keeps quantized (local
module path -> :class:`~hermesd.quant.qweight.QuantMeta` as a dict, see ``StageEntry.quant``). Both
convert and the engine build the model on meta as for any store, then call
:func:`quantize_skeleton`: each listed module is replaced, under the same path, by a
:class:`QuantLinear` or :class:`QuantEmbedding` whose buffers are the stored tensors
(``qweight``, ``scales``, ``zeros``, ``super_scales``), so stage binding puts them in place by name.
Modules that shared one weight (a tied LM head and its embedding) share the replacement's buffers,
which is how ``find_stages`` records the head's tensors as tied references to the embedding's.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from hermesd.errors import StoreError
from hermesd.quant import fastint4
from hermesd.quant.cpu import KernelPolicy, default_policy
from hermesd.quant.embedding import QuantEmbedding
from hermesd.quant.int4pack import native_tag
from hermesd.quant.kernels import INT4, kernel_path, prepared_bytes, with_kernel_table
from hermesd.quant.linear import QuantLinear
from hermesd.quant.qweight import SUFFIXES, TABLE_VERSION, QuantizedWeight, QuantMeta
from hermesd.store.manifest import Manifest

LINEAR, EMBEDDING = "linear", "embedding"


def replaceable(module: nn.Module) -> str | None:
    """``linear``/``embedding`` for a plain ``nn.Linear``/``nn.Embedding`` (own forward unchanged), else None.

    Subclasses that change ``forward`` (scaled embeddings, ...) keep their float weight.
    """
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return LINEAR
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward and module.max_norm is None:
        return EMBEDDING
    return None


# Weights per Linear from which one-token steps (decode) take torch's integer kernels. On
# TinyLlama-shape layers (2048x5632) the int4 kernel multiplied one row in ~1 ms where exact
# de-quantization took 14-25 ms (bench/quant_kernels.py). Below this size (SmolLM2's 576x1536, the
# test models) the exact path measured as fast (SmolLM2 Q4_1: 3.6 tok/s exact, 3.1 tok/s kernels),
# and it reproduces transformers' GGUF logits exactly. Narrow layers (in_features below 1024: the
# test models' 32000 x 256 heads) keep the exact path too: the kernel's bf16 activations flipped
# greedy tokens of those random-weight models, whose logits nearly tie.
KERNEL_MIN_WEIGHTS = 1 << 22
KERNEL_MIN_IN_FEATURES = 1024
# hermesd's own int4 kernel multiplies fp32 activations and agrees with the exact product to ~1e-6, so
# the accuracy reason above does not hold for it: ``--quantize int4`` Linears from this size on take it
# too (TinyLlama's 256x2048 key/value projections, which de-quantized at every decode step). GGUF formats
# keep the rule above: a kernel-ready table rounds their scales to bf16, and their small layers stay
# exactly ggml's values.
NATIVE_KERNEL_MIN_WEIGHTS = 1 << 18


def takes_kernel(meta: QuantMeta) -> bool:
    """Whether decode steps of a quantized Linear with ``meta`` take an integer kernel (else exact
    de-quantize + ``F.linear``), by the sizes above."""
    n, k = meta.shape
    if k < KERNEL_MIN_IN_FEATURES:
        return False
    if n * k >= KERNEL_MIN_WEIGHTS:
        return True
    own_int4 = meta.format == "int4" and n % 32 == 0 and fastint4.available()
    return own_int4 and n * k >= NATIVE_KERNEL_MIN_WEIGHTS


@functools.lru_cache(maxsize=64)
def store_policy(dtype: torch.dtype, kernel: bool) -> KernelPolicy:
    """How a store's quantized Linear computes; ``kernel`` from :func:`takes_kernel`.

    Kernel layers: the machine's kernel policy, i.e. integer kernels for a few rows (decode steps;
    torch's round activations to the kernel's dtype, bf16 on x86; hermesd's own keeps fp32) and exact
    de-quantize + ``F.linear`` in ``dtype`` for prompts. Others: always exact de-quantize +
    ``F.linear``, which gives ggml's fp32 values, so an fp32 store computes the logits of transformers'
    own fp32 load of the GGUF. Streamed and resident stages take the same path, so their logits stay
    identical.

    The compute dtype is fp32: a bf16 SmolLM2 store decoded at about the same rate but its
    128-token prompt took 2.3 s against 0.5-0.7 s in fp32 (no AVX512-BF16/AMX: oneDNN emulates bf16
    matmuls), and it is not exact.
    """
    if kernel:
        return dataclasses.replace(default_policy(), dense_dtype=dtype)
    return dataclasses.replace(default_policy(), kernel_max_m=0, int4x2_max_m=0, dense_dtype=dtype)


def linear_policy(meta: QuantMeta, dtype: torch.dtype) -> KernelPolicy:
    """The :func:`store_policy` of a quantized Linear with ``meta`` in a store of compute dtype ``dtype``."""
    return store_policy(dtype, takes_kernel(meta))


def stored_meta(meta: QuantMeta, dtype: torch.dtype = torch.float32) -> QuantMeta:
    """The meta to store for a Linear's quantized weight: kernel-ready where decode takes the int4 kernel.

    Such weights are written with their codes in this CPU's kernel layout and the kernel's scale/zero
    table in place of the format's scales (:func:`hermesd.quant.kernels.with_kernel_table`), so a
    streamed stage is bound as read, with no per-load preparation: building the table took as long as
    the kernel's multiply itself (bench/quantized.py, 2026-12-01). Other weights keep their format.
    """
    policy = linear_policy(meta, dtype)
    if meta.bits != 4 or meta.table or kernel_path(meta, policy) != INT4:
        return meta
    return dataclasses.replace(meta, affine=True, code_offset=8, super_block=0, version=TABLE_VERSION,
                               table=str(policy.kernel_dtype).removeprefix("torch."), packing=native_tag())


def to_stored(qw: QuantizedWeight, meta: QuantMeta) -> QuantizedWeight:
    """``qw`` in the form ``meta`` (from :func:`stored_meta`) records."""
    if meta.table and not qw.meta.table:
        qw = with_kernel_table(qw, getattr(torch, meta.table))
    if qw.meta != meta:
        raise StoreError(f"quantized weight {qw.meta.shape}: stored form {qw.meta} differs from the planned {meta}")
    return qw


def weight_groups(model: nn.Module) -> list[list[str]]:
    """Module paths grouped by the ``weight`` parameter they share (one path per untied weight), in order."""
    groups: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            paths = groups.setdefault(id(weight), [])
            if path not in paths:
                paths.append(path)
    return list(groups.values())


def quantize_skeleton(model: nn.Module, metas: dict[str, QuantMeta], dtype: torch.dtype) -> None:
    """Replace each module named in ``metas`` (full path -> meta) by its quantized form, on meta."""
    if not metas:
        return
    for paths in weight_groups(model):
        first: nn.Module | None = None
        for path in paths:
            if path not in metas:
                continue
            new = _quantized_module(model, path, metas[path], dtype)
            if first is None:
                first = new
            else:  # tied: the same stored tensors
                for suffix in SUFFIXES:
                    if suffix in first._buffers:
                        new._buffers[suffix] = first._buffers[suffix]
            _set_submodule(model, path, new)
    missing = [path for path in metas if not isinstance(model.get_submodule(path), (QuantLinear, QuantEmbedding))]
    if missing:
        raise StoreError(f"{type(model).__name__}: no weight-bearing module at {missing[:3]} to quantize")


def _quantized_module(model: nn.Module, path: str, meta: QuantMeta, dtype: torch.dtype) -> nn.Module:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise StoreError(f"{type(model).__name__} has no module {path!r} to quantize") from None
    kind = replaceable(module)
    shape = tuple(module.weight.shape)
    if kind is None or shape != tuple(meta.shape):
        raise StoreError(f"{path}: {type(module).__name__} {shape} cannot hold quantized weight {meta.format} "
                         f"{tuple(meta.shape)}")
    if kind == LINEAR:
        return QuantLinear(meta, bias=module.bias is not None, bias_dtype=dtype, device="meta",
                           policy=linear_policy(meta, dtype))
    return QuantEmbedding(meta, out_dtype=dtype, padding_idx=module.padding_idx, device="meta")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def manifest_metas(manifest: Manifest) -> dict[str, QuantMeta]:
    """Full module path -> meta of every quantized module a store records (empty for float stores)."""
    metas = {}
    for stage in manifest.stages:
        for local, raw in stage.quant.items():
            full = ".".join(p for p in (stage.module, local) if p)
            try:
                metas[full] = QuantMeta.from_dict(raw)
            except Exception as exc:  # ConvertError from the meta's own checks, TypeError on a bad field
                raise StoreError(f"stage {stage.name}: quantized module {local!r}: {exc}") from None
    return metas


def stage_compute_bytes(manifest: Manifest) -> dict[str, int]:
    """Stage name -> memory its quantized Linears' kernel tables take while it is bound (0 for float stages).

    Counted by the planners: held for good by a resident stage, for one stage at a time while streaming.
    Gathered tables (embeddings) compute from the rows they gather and take none.
    """
    dtype = getattr(torch, manifest.dtype, torch.float32)
    out = {}
    for stage in manifest.stages:
        total = 0
        for local, raw in stage.quant.items():
            meta = QuantMeta.from_dict(raw)
            prefix = f"{local}." if local else ""
            if any(name.startswith(prefix) for name in stage.gather):
                continue
            total += prepared_bytes(meta, linear_policy(meta, dtype))
        out[stage.name] = total
    return out


def is_quant_part(full_name: str, metas: dict[str, QuantMeta]) -> bool:
    """Whether state-dict name ``full_name`` is a stored tensor of a quantized module (never cast)."""
    module, _, attr = full_name.rpartition(".")
    return attr in SUFFIXES and module in metas


def stage_quant(module: str, metas: dict[str, QuantMeta], names: list[str]) -> dict[str, dict]:
    """The ``StageEntry.quant`` of a stage at ``module`` that stores or borrows ``names`` (local names)."""
    out = {}
    for local in names:
        full = f"{module}.{local}" if module else local
        path, _, attr = full.rpartition(".")
        if attr in SUFFIXES and path in metas:
            local_path = path[len(module) + 1:] if module and path != module else ("" if path == module else path)
            out[local_path] = metas[path].to_dict()
    return out
