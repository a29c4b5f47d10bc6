"""``convert --quantize int8|int4``: any float source, its large Linear weights quantized stage by stage.

:class:`QuantizingSource` wraps another source (a Hugging Face directory, ``--random-config``, or a
GGUF read with ``--dequantize``). The inner source still fills a *float* skeleton, stage by stage, as
it always does; each weight chosen by :meth:`QuantizingSource.quant_modules` is then quantized with
:func:`hermesd.quant.quantizer.quantize` and stored as its quantized tensors. Peak memory stays one
stage of floats plus its codes.

What stays float, and why:

* embeddings (``nn.Embedding``): the engine gathers only the rows a batch uses, so quantizing them
  saves disk, not bytes streamed per token;
* weights shared by several modules (a tied LM head is its embedding);
* Linears smaller than :data:`MIN_WEIGHTS` (classifier heads, tiny projections), norms, biases.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hermesd.errors import ConvertError
from hermesd.quant.int4pack import ROWMAJOR
from hermesd.quant.quantizer import DEFAULT_GROUP, INT4_GROUPS, quantize
from hermesd.quant.qweight import SUFFIXES, QuantizedWeight, QuantMeta, resolve_packing
from hermesd.store.quantized import LINEAR, replaceable, stored_meta, to_stored, weight_groups
from hermesd.store.rowblocks import assemble_rows, part_meta, row_spans
from hermesd.store.sources import Source
from hermesd.store.stages import StageSpec, build_skeleton, find_stages

SCHEMES = ("int8", "int4")
MIN_WEIGHTS = 1 << 16  # smaller Linears stay float: their bytes do not matter, their error might
ROW_BLOCK_BYTES = 32 << 20  # fp32 rows quantized at a time (bounds convert's temporaries)


def quant_meta(scheme: str, shape: tuple[int, int], group_size: int | None) -> QuantMeta:
    """The :class:`QuantMeta` that :func:`quantize` gives a float weight of ``shape`` (no data needed)."""
    n, k = shape
    group = group_size or DEFAULT_GROUP[scheme] or k
    if scheme == "int8":
        return QuantMeta("int8", (n, k), 8, group, affine=False)
    packing = resolve_packing("native", 4) if n % 16 == 0 else ROWMAJOR
    return QuantMeta("int4", (n, k), 4, group, affine=True, packing=packing)


def check_group(scheme: str, group_size: int | None) -> None:
    """Refuse a group size the scheme cannot use, before any weight is read."""
    if scheme not in SCHEMES:
        raise ConvertError(f"--quantize takes int8 or int4, not {scheme!r}")
    if scheme == "int4" and group_size is not None and group_size not in INT4_GROUPS:
        raise ConvertError(f"int4 group size must be one of {INT4_GROUPS}, got {group_size}")
    if group_size is not None and group_size <= 0:
        raise ConvertError(f"group size must be positive, got {group_size}")


class QuantizingSource:
    """A float source whose large Linear weights are quantized to ``scheme`` while converting."""

    def __init__(self, inner: Source, scheme: str, group_size: int | None = None) -> None:
        check_group(scheme, group_size)
        self.inner, self.scheme, self.group_size = inner, scheme, group_size
        self.config = inner.config
        self.architecture = inner.architecture
        self.default_dtype = inner.default_dtype
        self.description = {**inner.description, "quantize": scheme, "group_size": group_size, "kept_float": []}
        self.metas: dict[str, QuantMeta] = {}
        self.errors: dict[str, float] = {}  # stage name -> relative RMS error of its quantized weights
        self._float_model: nn.Module | None = None
        self._float_specs: list[StageSpec] = []

    def quant_modules(self, model: nn.Module) -> dict[str, QuantMeta]:
        """Full module path -> meta of each Linear to quantize (see the module docstring for what stays float)."""
        self._float_model = build_skeleton(self.architecture, self.config, self.default_dtype)
        self._float_specs = find_stages(self._float_model)
        metas = {}
        for paths in weight_groups(model):
            module = model.get_submodule(paths[0])
            if len(paths) != 1 or replaceable(module) != LINEAR:
                continue
            n, k = module.weight.shape
            group = self.group_size or DEFAULT_GROUP[self.scheme] or k
            if n * k < MIN_WEIGHTS:
                continue
            if k % group:
                self.description["kept_float"].append(f"{paths[0]} (in_features {k} not a multiple of {group})")
                continue
            metas[paths[0]] = stored_meta(quant_meta(self.scheme, (n, k), self.group_size))
        if not metas:
            raise ConvertError(f"no Linear weight of {self.architecture} can be quantized to {self.scheme} "
                               f"with group size {self.group_size or DEFAULT_GROUP[self.scheme] or 'per row'}")
        self.metas = metas
        return metas

    def stage_tensors(self, model: nn.Module, stage: StageSpec, index: int) -> dict[str, torch.Tensor]:
        """The stage's float tensors from the inner source, its chosen weights replaced by their codes."""
        assert self._float_model is not None, "quant_modules() first"
        spec = self._float_specs[index]
        if spec.name != stage.name:
            raise ConvertError(f"stage {index} is {stage.name} quantized but {spec.name} in float")
        tensors = self.inner.stage_tensors(self._float_model, spec, index)
        squared_error = squared_norm = 0.0
        for local in list(tensors):
            full = f"{stage.module}.{local}" if stage.module else local
            module, _, attr = full.rpartition(".")
            if attr != "weight" or module not in self.metas:
                continue
            qw, error, norm = quantize_by_rows(tensors.pop(local), self.scheme, self.metas[module])
            squared_error, squared_norm = squared_error + error, squared_norm + norm
            prefix = local.rpartition(".")[0]
            for suffix in SUFFIXES:
                if getattr(qw, suffix) is not None:
                    tensors[f"{prefix}.{suffix}" if prefix else suffix] = getattr(qw, suffix)
        if squared_norm:
            self.errors[stage.name] = (squared_error / squared_norm) ** 0.5
        return {local: tensors[local] for local in stage.owned}

    def copy_side_files(self, dest: Path) -> list[str]:
        return self.inner.copy_side_files(dest)


def quantize_by_rows(weight: torch.Tensor, scheme: str, meta: QuantMeta) -> tuple[QuantizedWeight, float, float]:
    """``weight`` quantized to its stored form ``meta``, a block of rows at a time, with the squared
    error of the stored weight and the squared norm of ``weight`` (both summed in fp64).

    Rows are independent in every scheme (groups run along K), so blocks quantize separately
    (:mod:`hermesd.store.rowblocks`). Done whole, the fp32/fp64 temporaries of a 32000x2048 head took ~3 GiB.
    """
    n, k = meta.shape
    sums = [0.0, 0.0]  # squared error, squared norm

    def rows(start: int, stop: int) -> QuantizedWeight:
        block = weight[start:stop].to(torch.float32)
        part = to_stored(quantize(block, scheme, meta.group_size), part_meta(meta, start, stop))
        sums[0] += float(torch.sum((part.dequantize().double() - block.double()) ** 2))
        sums[1] += float(torch.sum(block.double() ** 2))
        return part

    qw = assemble_rows(meta, row_spans(n, 4 * k, ROW_BLOCK_BYTES), rows)
    return qw, sums[0], sums[1]


def with_quantization(source: Source, scheme: str | None, group_size: int | None) -> Source:
    """``source`` itself, or wrapped to quantize when ``scheme`` is given (``group_size`` alone is refused)."""
    if scheme is None:
        if group_size is not None:
            raise ConvertError("--group-size needs --quantize")
        return source
    if getattr(source, "quant_modules", None) is not None:
        raise ConvertError("this source is already quantized (a GGUF kept quantized); "
                           "add --dequantize to re-quantize its float values")
    return QuantizingSource(source, scheme, group_size)

