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
from hermesd.quant.cpu import KernelPolicy, default_policy
from hermesd.quant.embedding import QuantEmbedding
from hermesd.quant.linear import QuantLinear
from hermesd.quant.qweight import SUFFIXES, QuantMeta
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


@functools.lru_cache(maxsize=4)
def store_policy(dtype: torch.dtype) -> KernelPolicy:
    """How a store's quantized Linears compute: always de-quantize + ``F.linear`` in the compute dtype.

    De-quantizing gives ggml's fp32 values exactly, so an fp32 store computes the logits of
    transformers' own fp32 load of the GGUF (same greedy tokens), and it is one code path for
    streamed and resident stages (identical logits). Measured on this 2-core AVX2 machine
    (SmolLM2-135M Q4_1, streamed, 16 new tokens, best of 3 on a shared host): 3.6 tok/s, against
    3.1 tok/s and +180 MiB peak for torch's int4/int8 kernels on codes stored in the CPU's kernel
    layout (which also round activations to bf16 on x86), and 2.8 tok/s for the fp32 store.
    The compute dtype is fp32: a bf16 store decoded at about the same rate (within this host's noise)
    but its 128-token prompt took 2.3 s against 0.5-0.7 s in fp32 (no AVX512-BF16/AMX: oneDNN
    emulates bf16 matmuls), and it is not exact.
    """
    return dataclasses.replace(default_policy(), kernel_max_m=0, int4x2_max_m=0, dense_dtype=dtype)


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
                           policy=store_policy(dtype))
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
