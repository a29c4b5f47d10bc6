"""Which GGUF tensor becomes which transformers parameter, and what has to happen to it on the way.

Two planners mirror transformers' two GGUF loaders. Architectures in ``GGUF_ARCHS`` (qwen35,
qwen35moe, lfm2) use its conversion mapping: renamings plus per-tensor ops, which we run ourselves
(``TorchOps``). All others use its legacy loader: names from ``get_gguf_hf_weights_map`` on a
meta-device model, and the per-architecture ``TensorProcessor`` fix-ups, re-expressed here as row
operations where they are row operations (see ``gguf_transforms``). The planners only read the
header, so the whole plan exists before any tensor byte is touched.
"""

from __future__ import annotations

import re
from copy import deepcopy
from dataclasses import dataclass
from math import prod

import numpy as np
import torch
from torch import nn
from transformers.core_model_loading import WeightConverter, rename_source_key
from transformers.integrations.gguf.utils import get_gguf_conversion_mapping
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

from hermesd.errors import UnsupportedModelError
from hermesd.quant.gguf_header import FLOAT_TYPES, GGUFHeader, TensorInfo, row_bytes
from hermesd.quant.gguf_transforms import (
    Dequantized,
    JoinedValues,
    NumpyValues,
    PermuteRows,
    StackRows,
    TorchOps,
    Transform,
    Transpose,
    elements_per_row,
)

_MOE = re.compile(r"(?P<name>.*\.ffn_(?P<w>gate|down|up)_exps)\.weight$")  # transformers' legacy MoE pattern
# transformers model_type -> gguf-py's architecture name, where they differ (as in get_gguf_hf_weights_map)
_GGUF_MODEL_TYPE = {"cohere": "command-r", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3",
                    "gemma4_text": "gemma4", "umt5": "t5", "minimax_m2": "minimax-m2", "gpt_oss": "gpt-oss"}
_GPT2_TRANSPOSED = ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")


@dataclass(frozen=True)
class TensorPlan:
    """One transformers parameter: the GGUF tensor(s) it comes from and how.

    ``shape`` is the parameter's shape in the transformers model; ``ggml_type`` the type of the
    record's blocks (the stored type, or F32 where a value-level transform was needed).
    """

    hf_name: str
    sources: tuple[TensorInfo, ...]
    shape: tuple[int, ...]
    ggml_type: str
    transform: Transform | None = None

    @property
    def description(self) -> str:
        """What is done to the stored tensor(s) to make this parameter ("as stored" if nothing)."""
        return self.transform.description if self.transform else "as stored"

    @property
    def nbytes(self) -> int:
        """Size of the record's ``raw`` (known before reading it: e.g. for sizing stages)."""
        rows = prod(self.shape[:-1]) if len(self.shape) > 1 else 1
        return rows * row_bytes(self.ggml_type, self.shape[-1])

    @property
    def dequantized(self) -> bool:
        """Whether blocks were de-quantized to build this parameter (a lossless-but-larger F32 tensor)."""
        return any(info.ggml_type not in FLOAT_TYPES for info in self.sources) and self.ggml_type in FLOAT_TYPES


@dataclass
class Plan:
    """The planner's result: parameters in file order, plus what was left aside and why."""

    tensors: list[TensorPlan]
    skipped: dict[str, str]  # GGUF tensor name -> why it yields no parameter
    needs_dequantize: list[str]  # "hf_name (type): transform" for quantized tensors that need values


def plan_tensors(header: GGUFHeader, raw_config: dict, model: nn.Module, tied: dict[str, str]) -> Plan:
    """Plan every parameter of ``model`` that the file provides (tied copies excluded)."""
    if header.architecture in _native_archs():
        plan = _plan_native(header, model, tied)
    else:
        plan = _plan_legacy(header, raw_config, model, tied)
    plan.tensors.sort(key=lambda p: p.sources[0].start)  # file order: sequential reads of the mapping
    return plan


def _native_archs() -> tuple[str, ...]:
    from transformers.integrations.gguf import GGUF_ARCHS

    return tuple(GGUF_ARCHS)


class _Planner:
    """Shared bookkeeping: expected shapes, tied names, skipped tensors, quantized-needs-values list."""

    def __init__(self, header: GGUFHeader, model: nn.Module, tied: dict[str, str]) -> None:
        self.header = header
        self.shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        self.tied = tied
        self.plan = Plan([], {}, [])

    def accept(self, gguf_name: str, hf_name: str) -> bool:
        """Whether ``hf_name`` is a parameter we should produce; records why not otherwise."""
        if hf_name in self.tied:
            self.plan.skipped[gguf_name] = f"{hf_name} is tied to {self.tied[hf_name]}"
        elif hf_name not in self.shapes:
            self.plan.skipped[gguf_name] = f"{hf_name} is not a parameter of the model"
        else:
            return True
        return False

    def add(self, hf_name: str, sources: tuple[TensorInfo, ...], transform: Transform | None,
            ggml_type: str, shape: tuple[int, ...]) -> None:
        """Plan ``hf_name``; a value-level transform on blocks is wrapped to de-quantize first, and listed."""
        expected = self.shapes[hf_name]
        if tuple(shape) != expected:
            raise UnsupportedModelError(
                f"{self.header.path}: {'+'.join(s.name for s in sources)} gives {hf_name} the shape {tuple(shape)}, "
                f"but the model expects {expected}")
        quantized = [s for s in sources if s.ggml_type not in FLOAT_TYPES]
        if transform is not None and transform.needs_values and quantized:
            what = getattr(transform, "operation_names", transform.description)
            self.plan.needs_dequantize.append(f"{hf_name} ({quantized[0].ggml_type}): {what}")
            if not isinstance(transform, TorchOps):  # TorchOps de-quantizes itself and knows its result type
                transform, ggml_type = Dequantized(transform), "F32"
        self.plan.tensors.append(TensorPlan(hf_name, sources, expected, ggml_type, transform))


# ---- transformers' legacy loader -------------------------------------------------------------

def _plan_legacy(header: GGUFHeader, raw_config: dict, model: nn.Module, tied: dict[str, str]) -> Plan:
    architecture = header.architecture
    if architecture == "gpt_oss":  # its processor splits and transposes experts into names the model lacks
        raise UnsupportedModelError(f"{header.path}: transformers' gpt_oss GGUF expert layout is not supported")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=raw_config)
    names = gguf_to_hf_names(model, processor, header)
    planner = _Planner(header, model, tied)
    experts: dict[str, dict[str, TensorInfo]] = {}
    for info in header.tensors:
        moe = _MOE.fullmatch(info.name) if architecture in ("qwen2moe", "qwen3moe", "minimax-m2") else None
        if moe is not None and moe["name"] in names:
            experts.setdefault(names[moe["name"]], {})[moe["w"]] = info
            continue
        hf_name = "lm_head.weight" if architecture == "gpt2" and info.name == "output.weight" else names.get(info.name)
        if hf_name is None:
            planner.plan.skipped[info.name] = "transformers maps no parameter to it"
        elif planner.accept(info.name, hf_name):
            transform = _legacy_transform(architecture, processor, raw_config, info)
            ggml_type = "F32" if isinstance(transform, NumpyValues) else info.ggml_type
            if isinstance(transform, Transpose):
                shape = info.shape[::-1]
            else:
                shape = _checked_reshape(info, planner.shapes[hf_name])
            planner.add(hf_name, (info,), transform, ggml_type, shape)
    for hf_name, parts in experts.items():
        _plan_experts(planner, hf_name, parts)
    return planner.plan


def gguf_to_hf_names(model: nn.Module, processor: TensorProcessor, header: GGUFHeader) -> dict[str, str]:
    """GGUF tensor name -> model parameter name: transformers' ``get_gguf_hf_weights_map``, built once.

    transformers rebuilds gguf-py's name table for every submodule it recurses into -- O(layers^2),
    ~9 s for SmolLM2's 30 layers. This is the same walk over one table; a test checks that both agree.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    model_type = _GGUF_MODEL_TYPE.get(model.config.model_type, model.config.model_type)
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == model_type), None)
    if arch is None:
        raise UnsupportedModelError(f"{header.path}: gguf-py has no tensor names for model type {model_type!r}")
    table = get_tensor_name_map(arch, model.config.num_hidden_layers)
    return _names_under(model, processor, table, "")


def _names_under(module: nn.Module, processor: TensorProcessor, table, qual: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for hf_name in module.state_dict():
        hf_name = processor.preprocess_name(hf_name)
        stem, suffix = hf_name, ""
        if hf_name.endswith((".weight", ".bias")):
            stem, suffix = hf_name.rsplit(".", 1)
            suffix = "." + suffix
        gguf_name = table.get_name(stem)
        if gguf_name is None:
            processor.perform_fallback_tensor_mapping(result, suffix, qual, hf_name)
        else:
            result[gguf_name + suffix] = qual + hf_name
    # a submodule's own names count too (Bloom files were converted from BloomModel), never overriding
    for child_name, child in module.named_children():
        for key, value in _names_under(child, processor, table, f"{qual}{child_name}.").items():
            result.setdefault(key, value)
    return result


def _legacy_transform(architecture: str, processor: TensorProcessor, config: dict,
                      info: TensorInfo) -> Transform | None:
    """The row or value operation transformers' legacy ``TensorProcessor`` applies to this tensor."""
    name = info.name
    if architecture == "llama" and (".attn_q." in name or ".attn_k." in name):
        # The processor's own permutation, run on row indices: it only ever moves axis 0.
        order = processor.process(weights=np.arange(info.shape[0]), name=name).weights
        moved = PermuteRows(order, "llama.cpp rope rows un-permuted", vector=len(info.shape) == 1)
        return moved if _moves(order) else None
    if architecture == "bloom" and "attn_qkv" in name:
        # weight rows and bias entries get the same q/k/v-per-head interleave; the bias form is 1-D
        order = processor._reverse_reshape_bias(np.arange(info.shape[0]), config["n_head"], config["hidden_size"])
        return PermuteRows(order, "q/k/v rows interleaved per head", vector=len(info.shape) == 1)
    if architecture == "gpt2" and any(part in name for part in _GPT2_TRANSPOSED):
        return Transpose()
    if architecture == "mamba" and "ssm_a" in name:
        return NumpyValues(lambda w: np.log(-w), "log(-A)")
    if architecture in ("nemotron", "gemma2", "gemma3") and "norm.weight" in name:
        return NumpyValues(lambda w: w - 1, "norm weight minus 1")
    return None


def _moves(order: np.ndarray) -> bool:
    return not np.array_equal(order, np.arange(len(order)))


def _checked_reshape(info: TensorInfo, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` if the stored rows can simply be read under it (same row length, same element count)."""
    if shape[-1] == info.shape[-1] and prod(shape) == prod(info.shape):
        return tuple(shape)
    return tuple(info.shape)  # the planner's shape check reports the mismatch


def _plan_experts(planner: _Planner, hf_name: str, parts: dict[str, TensorInfo]) -> None:
    """Legacy MoE: down experts as stored; gate and up experts joined per expert into ``gate_up_proj``."""
    if not planner.accept(parts[next(iter(parts))].name, hf_name):
        return
    if set(parts) == {"down"}:
        info = parts["down"]
        planner.add(hf_name, (info,), None, info.ggml_type, _checked_reshape(info, planner.shapes[hf_name]))
        return
    if set(parts) != {"gate", "up"}:
        raise UnsupportedModelError(f"{planner.header.path}: {hf_name} needs both gate and up experts, "
                                    f"the file has {sorted(parts)}")
    gate, up = parts["gate"], parts["up"]
    shape = (*gate.shape[:-2], gate.shape[-2] + up.shape[-2], gate.shape[-1])
    if gate.ggml_type == up.ggml_type:
        planner.add(hf_name, (gate, up), StackRows(), gate.ggml_type, shape)
    else:  # blocks of two types cannot share one tensor: join the values instead
        planner.add(hf_name, (gate, up), JoinedValues(), "F32", shape)


# ---- transformers' GGUF conversion mapping (qwen35, qwen35moe, lfm2) --------------------------

def _plan_native(header: GGUFHeader, model: nn.Module, tied: dict[str, str]) -> Plan:
    mapping = deepcopy(get_gguf_conversion_mapping(header.architecture, model.config))
    renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None) or None
    planner = _Planner(header, model, tied)
    groups: dict[str, list[tuple[str | None, TensorInfo]]] = {}
    for info in header.tensors:
        hf_name, pattern = rename_source_key(info.name, renamings, converters, prefix, planner.shapes)
        if planner.accept(info.name, hf_name) or hf_name in groups:
            groups.setdefault(hf_name, []).append((pattern, info))
    for hf_name, members in groups.items():
        converter = by_pattern.get(members[0][0]) if members[0][0] is not None else None
        _plan_native_one(planner, hf_name, members, converter)
    return planner.plan


def _plan_native_one(planner: _Planner, hf_name: str, members: list[tuple[str | None, TensorInfo]],
                     converter: WeightConverter | None) -> None:
    if converter is None:
        info = members[0][1]
        planner.add(hf_name, (info,), None, info.ggml_type, _checked_reshape(info, planner.shapes[hf_name]))
        return
    order = {pattern: i for i, pattern in enumerate(converter.source_patterns)}
    members = sorted(members, key=lambda member: order[member[0]])
    sources = tuple(info for _, info in members)
    operations = converter.operations
    packed = [info for info in sources if info.ggml_type not in FLOAT_TYPES]
    unsafe = any(not getattr(op, "supports_packed", False) or getattr(op, "input_permutation", None) is not None
                 for op in operations)
    values = bool(packed) and (unsafe or len({info.ggml_type for info in sources}) > 1)
    transform = TorchOps(operations, [p for p, _ in members], hf_name, dequantize_first=values)
    ggml_type, shape = _dry_run(transform, sources)
    planner.add(hf_name, sources, transform, ggml_type, shape)


def _dry_run(transform: TorchOps, sources: tuple[TensorInfo, ...]) -> tuple[str, tuple[int, ...]]:
    """Run the ops on meta tensors to learn the result's type and shape without reading any data."""
    tensors = {}
    for pattern, info in zip(transform.patterns, sources, strict=True):
        if info.ggml_type in FLOAT_TYPES or transform.dequantize_first:
            dtype = torch.float32 if transform.dequantize_first and info.ggml_type not in FLOAT_TYPES else {
                "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[info.ggml_type]
            tensors[pattern] = [torch.empty(info.shape, dtype=dtype, device="meta")]
        else:
            tensors[pattern] = [torch.empty((*info.shape[:-1], row_bytes(info.ggml_type, info.shape[-1])),
                                            dtype=torch.uint8, device="meta")]
    result = transform.run(tensors)
    if result.dtype == torch.uint8:
        packed_type = sources[0].ggml_type
        return packed_type, (*result.shape[:-1], elements_per_row(packed_type, result.shape[-1]))
    name = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[result.dtype]
    return name, tuple(result.shape)

