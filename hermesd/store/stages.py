"""Build a model skeleton without weights and split it into stages, generically.

Every transformers model class names its indivisible blocks in ``_no_split_modules``; each instance
of such a class is a stage. What lies outside all blocks (embeddings, final norm, heads) becomes the
remaining stages, one per maximal block-free submodule. No per-architecture table is kept.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import transformers
from torch import nn

from hermesd.errors import UnsupportedModelError
from hermesd.quant.embedding import QuantEmbedding

# Embedding tables at least this large are gathered row by row instead of loaded whole.
GATHER_MIN_BYTES = 1 << 20


@dataclass
class StageSpec:
    """A stage found in a skeleton: its module path and the state-dict names it owns or borrows."""

    name: str
    module: str
    kind: str
    owned: list[str] = field(default_factory=list)  # local names stored in this stage's file
    tied: dict[str, str] = field(default_factory=dict)  # local name -> full name of the owner
    gather: list[str] = field(default_factory=list)  # local names of row-gathered embedding tables


def model_class(architecture: str) -> type[nn.Module]:
    """The transformers class named by a config's ``architectures`` entry."""
    cls = getattr(transformers, architecture, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise UnsupportedModelError(f"architecture {architecture!r} is not a transformers model class")
    return cls


def config_from_dict(config: dict[str, Any]) -> transformers.PretrainedConfig:
    """Rebuild a transformers config object from the dict stored in a manifest."""
    model_type = config.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise UnsupportedModelError(f"model type {model_type!r} is unknown to transformers {transformers.__version__}")
    return transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device while buffers stay real CPU tensors.

    Non-persistent buffers (e.g. rotary ``inv_freq``) are computed in ``__init__`` and are in no
    state dict, so they must be real; parameters are what the store provides.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        current = module._parameters.get(name)
        # An already-meta parameter is being re-registered (weight tying): keep its identity.
        if current is not None and current.device.type != "meta":
            module._parameters[name] = nn.Parameter(current.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(architecture: str, config: transformers.PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """Instantiate the model with meta parameters and CPU buffers, in eval mode, no gradients."""
    cls = model_class(architecture)
    from transformers import initialization

    try:
        with _parameters_on_meta(), initialization.no_init_weights():
            model = cls._from_config(config, dtype=dtype)
    except Exception as exc:  # transformers raises many types for configs it cannot build
        raise UnsupportedModelError(f"cannot build {architecture} from its config: {exc}") from exc
    # transformers ties weights inside init_weights, which no_init_weights skipped: tie explicitly
    # so that shared tensors are one object, which is how find_stages recognises them.
    model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    return model


def find_stages(model: nn.Module) -> list[StageSpec]:
    """Split ``model`` into stages in registration order; detect tied and gatherable tensors."""
    block_types = set(getattr(model, "_no_split_modules", None) or [])
    if not block_types:
        raise UnsupportedModelError(f"{type(model).__name__} declares no _no_split_modules; cannot find its blocks")
    holders = _modules_containing(model, block_types)
    if not any(type(m).__name__ in block_types for m in model.modules()):
        raise UnsupportedModelError(f"{type(model).__name__} has none of its blocks {sorted(block_types)}")
    stages: list[StageSpec] = []
    _collect(model, "", block_types, holders, stages)
    _assign_tensors(model, stages)
    return [s for s in stages if s.owned or s.tied]


def _modules_containing(model: nn.Module, block_types: set[str]) -> set[int]:
    """ids of modules that are, or contain, a block."""
    holders: set[int] = set()

    def visit(module: nn.Module) -> bool:
        found = type(module).__name__ in block_types
        for child in module.children():
            found = visit(child) or found
        if found:
            holders.add(id(module))
        return found

    visit(model)
    return holders


def _collect(module: nn.Module, path: str, blocks: set[str], holders: set[int], out: list[StageSpec]) -> None:
    if type(module).__name__ in blocks:
        out.append(StageSpec(name=path, module=path, kind="block"))
        return
    if id(module) not in holders:
        out.append(StageSpec(name=path or "model", module=path, kind="rest"))
        return
    out.append(StageSpec(name=f"{path or 'model'}:pinned", module=path, kind="pinned"))
    for child_name, child in module.named_children():
        _collect(child, f"{path}.{child_name}" if path else child_name, blocks, holders, out)


def _assign_tensors(model: nn.Module, stages: list[StageSpec]) -> None:
    """Give each stage its tensors; a tensor shared by several names is owned by its first stage."""
    owner_of: dict[int, str] = {}
    for stage in stages:
        module = model.get_submodule(stage.module)
        for local, tensor in _stage_tensors(module, recurse=stage.kind != "pinned"):
            full = f"{stage.module}.{local}" if stage.module else local
            if id(tensor) in owner_of:
                stage.tied[local] = owner_of[id(tensor)]
            else:
                owner_of[id(tensor)] = full
                stage.owned.append(local)
        stage.gather = _gatherable(module, stage.owned) if stage.kind != "pinned" else []


def _stage_tensors(module: nn.Module, recurse: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers of ``module`` (tied duplicates included, in order)."""
    yield from module.named_parameters(recurse=recurse, remove_duplicate=False)
    for prefix, sub in module.named_modules(remove_duplicate=False) if recurse else [("", module)]:
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buffer


def _gatherable(module: nn.Module, owned: list[str]) -> list[str]:
    """Local names of large plain ``nn.Embedding`` weights that can be read row by row.

    A ``QuantEmbedding`` gathers all its stored tensors (each is row-major along the vocabulary).
    """
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, QuantEmbedding):
            parts = {(f"{prefix}.{s}" if prefix else s): t for s, t in sub.parts().items()}
            size = sum(t.numel() * t.element_size() for t in parts.values())
            if all(p in owned for p in parts) and size >= GATHER_MIN_BYTES:
                names.extend(parts)
            continue
        if type(sub).forward is not nn.Embedding.forward or sub.max_norm is not None:
            continue
        local = f"{prefix}.weight" if prefix else "weight"
        if local in owned and sub.weight.numel() * sub.weight.element_size() >= GATHER_MIN_BYTES:
            names.append(local)
    return names
