"""Where convert takes weights from: a Hugging Face directory, a GGUF file, or random init.

Each source gives the model's config and architecture and, stage by stage, the tensors a stage owns,
so convert never needs the whole model in memory (GGUF is the exception, see GGUFSource).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol

import torch
import transformers
from torch import nn

from hermesd.errors import ConvertError, UnsupportedModelError
from hermesd.store.stages import StageSpec, config_from_dict

# Tokenizer and processor files copied beside the stages so a store is self-contained.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)


class Source(Protocol):
    """What convert needs from a weight source."""

    config: transformers.PretrainedConfig
    architecture: str
    default_dtype: torch.dtype
    description: dict

    def stage_tensors(self, model: nn.Module, stage: StageSpec, index: int) -> dict[str, torch.Tensor]:
        """The tensors ``stage`` owns, by local name, as CPU tensors."""

    def copy_side_files(self, dest: Path) -> list[str]:
        """Write tokenizer/processor files into ``dest``; return their names."""


def _architecture(config: transformers.PretrainedConfig, origin: str) -> str:
    names = getattr(config, "architectures", None) or []
    if not names:
        raise UnsupportedModelError(f"{origin}: config names no architectures; cannot tell which model class to build")
    return names[0]


def _config_dtype(config: transformers.PretrainedConfig) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


class HFDirSource:
    """A Hugging Face model directory: config.json plus one or more safetensors shards (memory-mapped)."""

    def __init__(self, src: Path) -> None:
        from safetensors import safe_open

        if not (src / "config.json").is_file():
            raise ConvertError(f"{src}: no config.json; not a Hugging Face model directory")
        shards = sorted(src.glob("*.safetensors"))
        if not shards:
            raise ConvertError(f"{src}: no *.safetensors files (pickled .bin checkpoints are refused: unsafe)")
        self.src = src
        self.config = transformers.AutoConfig.from_pretrained(src, local_files_only=True)
        self.architecture = _architecture(self.config, str(src))
        self._handles = [safe_open(str(path), framework="pt") for path in shards]
        self._where = {key: handle for handle in self._handles for key in handle.keys()}
        self.default_dtype = _config_dtype(self.config) or self._first_float_dtype()
        self.description = {"kind": "hf", "path": str(src)}
        self._keys: dict[str, str] | None = None

    def _first_float_dtype(self) -> torch.dtype:
        for key, handle in self._where.items():
            dtype = handle.get_slice(key).get_dtype()
            if dtype in ("F32", "F16", "BF16"):
                return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
        return torch.float32

    def stage_tensors(self, model: nn.Module, stage: StageSpec, index: int) -> dict[str, torch.Tensor]:
        if self._keys is None:
            self._keys = _checkpoint_keys_by_model_name(model, list(self._where), str(self.src))
        result = {}
        for local in stage.owned:
            full = f"{stage.module}.{local}" if stage.module else local
            key = self._keys.get(full)
            if key is None:
                raise ConvertError(f"{self.src}: checkpoint has no tensor for {full} (stage {stage.name})")
            result[local] = self._where[key].get_tensor(key)
        return result

    def copy_side_files(self, dest: Path) -> list[str]:
        copied = []
        for name in SIDE_FILES:
            if (self.src / name).is_file():
                shutil.copy2(self.src / name, dest / name)
                copied.append(name)
        return copied


def _checkpoint_keys_by_model_name(model: nn.Module, keys: list[str], origin: str) -> dict[str, str]:
    """Model state-dict name -> checkpoint key, renamed the way transformers' own loader renames.

    transformers 5 keeps legacy checkpoint names on disk (``save_pretrained`` writes them) and
    renames on load through a per-architecture conversion mapping; we apply the same mapping. Keys
    that need a merging/splitting converter (e.g. fused experts) would need the whole group at once.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    result = {}
    for key in keys:
        name, converter = rename_source_key(key, renamings, converters, prefix, meta_state)
        if converter is not None:
            raise UnsupportedModelError(
                f"{origin}: {key} needs transformers' weight conversion ({converter}); not supported by convert yet")
        result.setdefault(name, key)
    return result


class GGUFSource:
    """A GGUF file, read through transformers' GGUF support (dequantized by the ``gguf`` package).

    transformers dequantizes a GGUF checkpoint into one in-memory state dict, so unlike the other
    sources this one holds the whole (dequantized) model while converting.
    """

    def __init__(self, src_dir: Path, gguf_file: str) -> None:
        if not (src_dir / gguf_file).is_file():
            raise ConvertError(f"{src_dir / gguf_file}: no such GGUF file")
        self.src_dir, self.gguf_file = src_dir, gguf_file
        try:
            self.config = transformers.AutoConfig.from_pretrained(src_dir, gguf_file=gguf_file, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                src_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True)
        except (ValueError, OSError, KeyError) as exc:
            raise ConvertError(f"{src_dir / gguf_file}: transformers cannot read this GGUF file: {exc}") from exc
        self.architecture = type(model).__name__
        self.config.architectures = [self.architecture]
        self._state = model.state_dict()
        self.default_dtype = torch.float32
        self.description = {"kind": "gguf", "path": str(src_dir / gguf_file)}

    def stage_tensors(self, model: nn.Module, stage: StageSpec, index: int) -> dict[str, torch.Tensor]:
        result = {}
        for local in stage.owned:
            full = f"{stage.module}.{local}" if stage.module else local
            if full not in self._state:
                raise ConvertError(f"{self.gguf_file}: no tensor for {full} (stage {stage.name})")
            result[local] = self._state.pop(full)  # pop: memory shrinks as stages are written
        return result

    def copy_side_files(self, dest: Path) -> list[str]:
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.src_dir, gguf_file=self.gguf_file)
        before = {p.name for p in dest.iterdir()}
        tokenizer.save_pretrained(dest)
        return sorted({p.name for p in dest.iterdir()} - before)


class RandomSource:
    """Random weights of an architecture from a config file, initialised stage by stage.

    Uses the model's own ``_init_weights`` so activations have realistic scale; each stage is seeded
    from ``seed`` and its index, so the same config and seed always give the same store.
    """

    def __init__(self, config_path: Path, seed: int = 0) -> None:
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConvertError(f"{config_path}: cannot read config: {exc}") from None
        self.config = config_from_dict(raw)
        self.architecture = _architecture(self.config, str(config_path))
        self.default_dtype = _config_dtype(self.config) or torch.float32
        self.seed = seed
        self.description = {"kind": "random", "config": str(config_path), "seed": seed}

    def stage_tensors(self, model: nn.Module, stage: StageSpec, index: int) -> dict[str, torch.Tensor]:
        module = model.get_submodule(stage.module)
        recurse = stage.kind != "pinned"
        buffers = {name: b.clone() for name, b in module.named_buffers(recurse=recurse)}
        module.to_empty(device="cpu", recurse=recurse)
        torch.manual_seed(self.seed * 100_003 + index)
        for sub in module.modules() if recurse else [module]:
            model._init_weights(sub)
        state = dict(module.named_parameters(recurse=recurse, remove_duplicate=False))
        state.update(buffers)
        tensors = {local: state[local].detach() for local in stage.owned}  # to("meta") below drops the module's references
        module.to("meta")  # give the memory back before the next stage
        return tensors

    def copy_side_files(self, dest: Path) -> list[str]:
        return []
