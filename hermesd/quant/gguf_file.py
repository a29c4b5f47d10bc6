"""A GGUF model file read one tensor at a time, its quantized blocks kept, under transformers' names.

transformers' own GGUF loading de-quantizes the whole model into one state dict (a 7 B Q4_K_M file
becomes ~28 GB of float32). ``open_gguf`` instead maps the file, plans from its header alone which
tensor becomes which transformers parameter and how (see ``gguf_plan``), and hands tensors out one
at a time as zero-copy ``[rows, bytes_per_row]`` uint8 views of the mapping -- a copy only where a
row permutation or join has to move rows. Pages of a tensor already handed out are given back to
the kernel as iteration moves on, so resident memory stays about one tensor.

Typical use::

    with open_gguf(path) as gguf:
        config, architecture = gguf.config, gguf.architecture
        for record in gguf.tensors():
            store(record.hf_name, record.ggml_type, record.shape, record.raw)
        gguf.save_tokenizer(dest)
"""

from __future__ import annotations

import contextlib
import copy
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Self

import numpy as np
import torch
import transformers
from torch import nn

from hermesd.errors import ConvertError, UnsupportedModelError
from hermesd.quant.gguf_config import build_config, config_dict
from hermesd.quant.gguf_header import SUPPORTED_TYPES, GGUFHeader, read_header, row_bytes
from hermesd.quant.gguf_plan import Plan, TensorPlan, plan_tensors

__all__ = ["SUPPORTED_TYPES", "GGUFModelFile", "GGUFTensor", "TensorPlan", "open_gguf"]

_PAGE = mmap.PAGESIZE


class GGUFTensor(NamedTuple):
    """One transformers parameter as GGUF blocks.

    ``raw`` is uint8 ``[prod(shape[:-1]) (1 for a vector), bytes per row]``: row ``i`` holds the
    blocks of row ``i`` of the parameter, in transformers' row order. ``gguf.quants.dequantize(raw,
    GGMLQuantizationType[ggml_type]).reshape(shape)`` is the value transformers loads.
    """

    hf_name: str
    ggml_type: str  # "Q4_K", "F32", ...: one of SUPPORTED_TYPES
    shape: tuple[int, ...]  # the parameter's shape in the transformers model
    raw: np.ndarray


class GGUFModelFile:
    """An open GGUF model: config, architecture, and its parameters as quantized blocks.

    ``dequantize``: allow tensors whose transformers form needs values, not rows (a GPT-2 transpose,
    a Qwen3.5 column reorder, arithmetic on a quantized tensor), to be de-quantized -- that tensor
    alone -- to F32. Without it such a file raises ``UnsupportedModelError`` naming them.
    """

    def __init__(self, path: str | Path, *, dequantize: bool = False) -> None:
        self.path = Path(path)
        self._header: GGUFHeader = read_header(self.path)
        self.metadata = self._header.metadata
        values = config_dict(self._header)
        self._config_values = values
        self.config: transformers.PretrainedConfig = build_config(self._header, values)
        model = _meta_model(self.config, self.path)
        self.architecture: str = type(model).__name__
        #: tied parameter -> the parameter it shares storage with (e.g. lm_head -> embed_tokens);
        #: tied parameters get no record: the store should alias them, as transformers ties them.
        self.tied: dict[str, str] = dict(getattr(model, "all_tied_weights_keys", None) or {})
        self._plan: Plan = plan_tensors(self._header, values, model, self.tied)
        wanted = [name for name in model.state_dict() if name not in self.tied]
        planned = {p.hf_name for p in self._plan.tensors}
        #: model parameters the file does not provide (transformers would leave them initialised)
        self.missing: list[str] = [name for name in wanted if name not in planned]
        #: GGUF tensors that give no parameter, with the reason (e.g. llama3's rope_freqs)
        self.skipped: dict[str, str] = dict(self._plan.skipped)
        #: "hf_name (type): transform" for each tensor de-quantized because its transform needs values
        self.dequantized: list[str] = list(self._plan.needs_dequantize)
        if self.dequantized and not dequantize:
            listed = "; ".join(self.dequantized[:4]) + (" ..." if len(self.dequantized) > 4 else "")
            raise UnsupportedModelError(
                f"{self.path}: {len(self.dequantized)} quantized tensor(s) need a value-level transform that "
                f"cannot run on blocks: {listed}. Pass dequantize=True to store those tensors as F32.")
        self._by_name = {p.hf_name: p for p in self._plan.tensors}

    def plans(self) -> list[TensorPlan]:
        """Every parameter the file provides, in file order, without reading tensor data."""
        return list(self._plan.tensors)

    def tensors(self, release: bool = True) -> Iterator[GGUFTensor]:
        """Yield every parameter's record in file order (the order llama.cpp wrote the tensors).

        ``release``: once the caller asks for the next record, drop the previous one's pages from
        this process (``MADV_DONTNEED``; they stay in the page cache, and a view still held is
        re-read from it), so resident memory stays at about one tensor however large the file.
        """
        for plan in self._plan.tensors:
            yield self._record(plan)
            if release:
                self._release(plan)

    def tensor(self, hf_name: str) -> GGUFTensor:
        """The record of one parameter by its transformers name (``KeyError`` for a tied or unknown name)."""
        plan = self._by_name.get(hf_name)
        if plan is None:
            why = f"tied to {self.tied[hf_name]}" if hf_name in self.tied else "not provided by this file"
            raise KeyError(f"{hf_name}: {why}")
        return self._record(plan)

    def release_rows(self, hf_name: str, start: int, stop: int) -> None:
        """Drop the pages of rows ``start:stop`` of a parameter whose record views the map directly
        (no transform), once they are decoded: a large tensor then never sits in memory whole."""
        plan = self._by_name.get(hf_name)
        if plan is None or plan.transform is not None or len(plan.sources) != 1:
            return
        width = row_bytes(plan.ggml_type, plan.shape[-1])
        begin = plan.sources[0].start
        self._drop_pages(begin + start * width, begin + stop * width)

    def release(self, hf_name: str) -> None:
        """Drop the pages of parameter ``hf_name`` from this process (see ``tensors``); a memory hint only."""
        plan = self._by_name.get(hf_name)
        if plan is not None:
            self._release(plan)

    def save_tokenizer(self, dest: str | Path) -> list[str]:
        """Write the tokenizer transformers builds from this file into ``dest``; return the new file names.

        Goes through ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``, which picks the tokenizer
        class from the model config (see :func:`_known_gguf_config`) and reads the vocabulary itself.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        before = {p.name for p in dest.iterdir()}
        try:
            with _known_gguf_config(self.path, self._config_values):
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    str(self.path.parent), gguf_file=self.path.name, local_files_only=True)
            tokenizer.save_pretrained(str(dest))
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise ConvertError(f"{self.path}: transformers cannot build a tokenizer from this file: {exc}") from exc
        return sorted({p.name for p in dest.iterdir()} - before)

    def close(self) -> None:
        """Unmap the file; fails quietly while records still reference it (the mapping then lives on)."""
        try:
            self._header.mapping.close()
        except BufferError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, plan: TensorPlan) -> GGUFTensor:
        raws = [self._header.raw(info) for info in plan.sources]
        try:
            if plan.transform is None:
                ggml_type, raw = plan.sources[0].ggml_type, raws[0]
            else:
                ggml_type, raw = plan.transform.apply(plan.sources, raws)
        except (ValueError, RuntimeError) as exc:
            names = "+".join(info.name for info in plan.sources)
            raise ConvertError(f"{self.path}: tensor {names} ({plan.sources[0].ggml_type}) -> {plan.hf_name}: "
                               f"{plan.description} failed: {exc}") from exc
        width = row_bytes(plan.ggml_type, plan.shape[-1])
        expected = (plan.nbytes // width, width)
        if ggml_type != plan.ggml_type or raw.shape != expected:
            raise ConvertError(f"{self.path}: {plan.hf_name}: transform gave {ggml_type} {raw.shape}, "
                               f"planned {plan.ggml_type} {expected}")
        return GGUFTensor(plan.hf_name, ggml_type, plan.shape, raw)

    def _release(self, plan: TensorPlan) -> None:
        for info in plan.sources:
            self._drop_pages(info.start, info.start + info.nbytes)

    def _drop_pages(self, begin: int, end: int) -> None:
        """``MADV_DONTNEED`` over file bytes ``begin:end`` (pages shared with neighbours are re-read if used)."""
        start = begin - begin % _PAGE  # madvise wants a page-aligned start
        try:
            self._header.mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError, AttributeError):  # not Linux, or mapping closed: only a memory hint
            pass


@contextlib.contextmanager
def _known_gguf_config(path: Path, values: dict) -> Iterator[None]:
    """While inside, transformers' legacy GGUF config reader answers for ``path`` with ``values``.

    ``AutoTokenizer`` builds the model config only to choose the tokenizer class; for architectures
    outside ``GGUF_CONFIG_ARCHS`` it calls ``load_gguf_checkpoint(path, return_tensors=False)``, whose
    gguf-py reader decodes every metadata string: +95 MiB and 3.7 s for TinyLlama's file, the peak
    of the whole convert. ``values`` is that same config (:func:`config_dict`, tested equal), so the
    call is answered from it; any other call goes through.
    """
    from transformers import modeling_gguf_pytorch_utils as utils

    original = utils.load_gguf_checkpoint
    target = path.resolve()

    def answer(gguf_path: str | Path, return_tensors: bool = False, *args: object, **kwargs: object) -> dict:
        if not return_tensors and Path(gguf_path).resolve() == target:
            return {"config": copy.deepcopy(values)}
        return original(gguf_path, return_tensors, *args, **kwargs)

    utils.load_gguf_checkpoint = answer
    try:
        yield
    finally:
        utils.load_gguf_checkpoint = original


def open_gguf(path: str | Path, *, dequantize: bool = False) -> GGUFModelFile:
    """Open a GGUF model file; see ``GGUFModelFile``. Raises ``ConvertError`` / ``UnsupportedModelError``."""
    return GGUFModelFile(path, dequantize=dequantize)


def _model_class(config: transformers.PretrainedConfig, path: Path) -> type[nn.Module]:
    """The class transformers would build: the config's named architecture, else its causal-LM class."""
    from transformers.models.auto import modeling_auto

    names = list(getattr(config, "architectures", None) or [])
    tables = (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
              modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, modeling_auto.MODEL_MAPPING_NAMES)
    for table in tables:
        if config.model_type in table:
            names.append(table[config.model_type])
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise UnsupportedModelError(f"{path}: transformers {transformers.__version__} has no model class for "
                                f"model type {config.model_type!r}")


def _meta_model(config: transformers.PretrainedConfig, path: Path) -> nn.Module:
    """The transformers model on the meta device: its parameter names, shapes and tied pairs, no memory."""
    from transformers import initialization

    cls = _model_class(config, path)
    try:
        with torch.device("meta"), initialization.no_init_weights():
            return cls._from_config(config)
    except Exception as exc:  # transformers raises many types for configs it cannot build
        raise UnsupportedModelError(f"{path}: cannot build {cls.__name__} from this file's config: {exc}") from exc
