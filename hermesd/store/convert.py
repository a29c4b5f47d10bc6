"""``hermesd convert``: turn a model into a layer store, one stage at a time, atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from hermesd import memory
from hermesd.errors import ConvertError
from hermesd.store.gguf_source import GGUFQuantSource
from hermesd.store.manifest import Manifest, StageEntry, TiedRef
from hermesd.store.quantized import is_quant_part, quantize_skeleton, stage_quant
from hermesd.store.quantizing import check_group, with_quantization
from hermesd.store.safetensors_io import write_stage_file
from hermesd.store.sources import GGUFSource, HFDirSource, RandomSource, Source
from hermesd.store.stages import StageSpec, build_skeleton, find_stages
from hermesd.store.verify import record_verified

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

# progress(stages_done, stages_total, stage_name, stage_bytes)
ProgressFn = Callable[[int, int, str, int], None]


@dataclass(frozen=True)
class ConvertReport:
    """Summary of a finished conversion."""

    store: str
    stages: int
    weight_bytes: int
    seconds: float
    peak_rss_bytes: int
    quant_errors: dict[str, float] = field(default_factory=dict)  # stage -> relative RMS error (--quantize)


def open_source(src: Path | None, gguf_file: str | None = None, random_config: Path | None = None,
                seed: int = 0, dequantize: bool = False, quantize: str | None = None,
                group_size: int | None = None) -> Source:
    """Pick the source kind from the arguments of ``hermesd convert``.

    A GGUF file keeps its quantization (``GGUFQuantSource``) unless ``dequantize`` asks for the
    float path through transformers (``GGUFSource``: holds the whole de-quantized model while converting).
    ``quantize`` (``int8``/``int4``) wraps a float source in a ``QuantizingSource``.
    """
    if quantize is not None or group_size is not None:
        check_group(quantize or "int8", group_size)  # before a slow source is opened
        inner = open_source(src, gguf_file, random_config, seed, dequantize)
        return with_quantization(inner, quantize, group_size)
    if random_config is not None:
        return RandomSource(Path(random_config), seed=seed)
    if src is None:
        raise ConvertError("a source directory (or --random-config) is required")
    src = Path(src)
    if src.is_file() and src.suffix == ".gguf":
        src, gguf_file = src.parent, src.name
    if gguf_file:
        return GGUFSource(src, gguf_file) if dequantize else GGUFQuantSource(src / gguf_file)
    if not src.is_dir():
        raise ConvertError(f"{src}: no such model directory")
    return HFDirSource(src)


def convert(source: Source, dest: str | os.PathLike[str], dtype: str | None = None, force: bool = False,
            progress: ProgressFn | None = None) -> ConvertReport:
    """Write ``source`` as a store at ``dest``; nothing appears at ``dest`` unless it completes."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise ConvertError(f"{dest} already exists; pass --force to replace it")
    target_dtype = _target_dtype(dtype, source.default_dtype)
    if isinstance(source, GGUFQuantSource) and target_dtype != torch.float32:
        # A quantized SmolLM2 store computing in bf16 answered "L'Étoile, la Marseillaise," where the
        # fp32 one answers "Paris": refuse until the bf16 path is right, rather than give wrong text.
        raise ConvertError(f"a GGUF kept quantized computes in fp32 (asked: {dtype}); "
                           "use --dequantize for a float store in that dtype")
    started = time.perf_counter()
    partial = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "stages").mkdir(parents=True)
    try:
        manifest = _write_store(source, partial, target_dtype, progress)
        _replace(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ConvertReport(str(dest), len(manifest.stages), manifest.weight_bytes(),
                         time.perf_counter() - started, memory.peak_rss_bytes(),
                         dict(getattr(source, "errors", {})))


def _target_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    if name is None:
        return default
    if name.lower() not in DTYPES:
        raise ConvertError(f"unknown dtype {name!r}; choose one of fp32, bf16, fp16")
    return DTYPES[name.lower()]


def _write_store(source: Source, root: Path, dtype: torch.dtype, progress: ProgressFn | None) -> Manifest:
    model = build_skeleton(source.architecture, source.config, dtype)
    quant_modules = getattr(source, "quant_modules", None)
    metas = quant_modules(model) if quant_modules is not None else {}
    quantize_skeleton(model, metas, dtype)
    specs = find_stages(model)
    owners = _owners(specs)
    entries = []
    for index, spec in enumerate(specs):
        tensors = {name: t if is_quant_part(_full(spec, name), metas) else _cast(t, dtype)
                   for name, t in source.stage_tensors(model, spec, index).items()}
        quant = stage_quant(spec.module, metas, [*spec.owned, *spec.tied])
        entries.append(_write_stage(root, index, spec, tensors, owners, quant))
        del tensors
        if progress:
            progress(index + 1, len(specs), spec.name, entries[-1].stored_bytes)
    config = source.config.to_dict()
    config["architectures"] = [source.architecture]
    manifest = Manifest(architecture=source.architecture, model_type=config["model_type"],
                        dtype=str(dtype).removeprefix("torch."), config=config, stages=entries,
                        files=source.copy_side_files(root), source=source.description)
    manifest.save(root)
    record_verified(root, manifest)
    _fsync_dir(root / "stages")
    _fsync_dir(root)
    return manifest


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _full(spec: StageSpec, local: str) -> str:
    return f"{spec.module}.{local}" if spec.module else local


def _owners(specs: list[StageSpec]) -> dict[str, TiedRef]:
    """Full state-dict name -> (stage, local name) of every stored tensor, to resolve tied references."""
    return {
        (f"{spec.module}.{local}" if spec.module else local): TiedRef(stage=spec.name, tensor=local)
        for spec in specs for local in spec.owned
    }


def _write_stage(root: Path, index: int, spec: StageSpec, tensors: dict[str, torch.Tensor],
                 owners: dict[str, TiedRef], quant: dict[str, dict]) -> StageEntry:
    relative = f"stages/{index:04d}-{re.sub(r'[^A-Za-z0-9._-]', '_', spec.name)}.safetensors"
    header = {f"hermesd.quant.{local}": json.dumps(meta, sort_keys=True) for local, meta in quant.items()}
    written = write_stage_file(root / relative, tensors, last=spec.gather, metadata=header)
    tied = {local: owners[owner] for local, owner in spec.tied.items()}
    return StageEntry(name=spec.name, module=spec.module, kind=spec.kind, file=relative, bytes=written.bytes,
                      data_start=written.data_start, sha256=written.sha256, tensors=written.tensors,
                      tied=tied, gather=list(spec.gather), quant=quant)


def _replace(partial: Path, dest: Path) -> None:
    """Move the finished store into place; an existing destination is swapped out, then removed."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        dest.rename(old)
    try:
        partial.rename(dest)
    except OSError:
        if old is not None:
            old.rename(dest)  # put the user's store back
        raise
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
