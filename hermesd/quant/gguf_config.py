"""A transformers config from a GGUF header, the way ``AutoConfig.from_pretrained(dir, gguf_file=...)`` builds it.

transformers has two readers. Architectures in ``GGUF_CONFIG_ARCHS`` (qwen35, lfm2, ...) go through its
light metadata reader, which we feed the same way. All others go through ``load_gguf_checkpoint(...,
return_tensors=False)``, which parses every metadata value with gguf-py's ``GGUFReader`` -- including
the vocabulary and merge table, one numpy array per string: measured at +166 MB of anonymous memory
for SmolLM2-135M's 98 MB file, growing with the vocabulary, not the weights. So that path is
re-implemented here over our own header (string arrays left unread), driven by transformers' own
key tables (``GGUF_TO_TRANSFORMERS_MAPPING``, ``GGUF_CONFIG_DEFAULTS_MAPPING``); the tests check
that the result equals ``AutoConfig.from_pretrained``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import transformers
from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING
from transformers.integrations.gguf import GGUF_CONFIG_ARCHS, get_gguf_config
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, GGUF_TO_TRANSFORMERS_MAPPING

from hermesd.errors import ConvertError, UnsupportedModelError
from hermesd.quant.gguf_header import GGUFHeader, StringArray

_TIED_ANYWAY = ("falcon", "bloom")  # transformers ties these even when the file has output.weight


def build_config(header: GGUFHeader, values: dict[str, Any]) -> transformers.PretrainedConfig:
    """The config object for ``values = config_dict(header)``; ``UnsupportedModelError`` for an unknown type."""
    model_type = values.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise UnsupportedModelError(f"{header.path}: model type {model_type!r} is unknown to transformers "
                                    f"{transformers.__version__}")
    try:
        return transformers.CONFIG_MAPPING[model_type].from_dict(values)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConvertError(f"{header.path}: transformers rejects the config this file describes: {exc}") from exc


def config_dict(header: GGUFHeader) -> dict[str, Any]:
    """The config as a dict, before it becomes a config object."""
    names = tuple(info.name for info in header.tensors)
    try:
        if header.architecture in GGUF_CONFIG_ARCHS:
            plain = {key: _plain(value) for key, value in header.metadata.items()}
            return get_gguf_config(plain, names)
        return _legacy_config(header, names)
    except KeyError as exc:
        raise ConvertError(f"{header.path}: GGUF metadata lacks {exc} needed for the "
                           f"{header.architecture} config") from None


def _plain(value: Any) -> Any:
    """Metadata as transformers' light reader gives it: a string array becomes its length."""
    if isinstance(value, StringArray):
        return value.count
    return value.tolist() if isinstance(value, np.ndarray) else value


def legacy_architecture(architecture: str, model_name: list[str]) -> str:
    """The architecture name transformers' legacy loader substitutes for a file's ``general.architecture``."""
    if "llama" in architecture and "mistral" in model_name:  # a list: exact match, as transformers does
        return "mistral"
    if "t5" in architecture or "t5encoder" in architecture:
        return "umt5" if model_name and "umt5" in model_name[0].lower() else "t5"
    for marker, name in (("qwen2moe", "qwen2_moe"), ("gpt_oss", "gpt_oss"), ("gpt-oss", "gpt_oss"),
                         ("qwen3moe", "qwen3_moe"), ("minimax-m2", "minimax_m2")):
        if marker in architecture:
            return name
    return architecture


def _legacy_config(header: GGUFHeader, names: tuple[str, ...]) -> dict[str, Any]:
    """``load_gguf_checkpoint(path, return_tensors=False)["config"]``, without decoding the vocabulary."""
    architecture = header.architecture
    model_name = [header.metadata["general.name"]] if "general.name" in header.metadata else []
    updated = legacy_architecture(architecture, model_name)
    config = _architecture_flags(architecture, model_name, names)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES and updated not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{header.path}: GGUF architecture {architecture!r} is not supported by transformers "
            f"{transformers.__version__}'s GGUF loader (it knows: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    config["tie_word_embeddings"] = "output.weight" not in names or architecture in _TIED_ANYWAY
    defaults = GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture) or {})
    for key, value in defaults.items():
        config.setdefault(key, value)
    table = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    for gguf_key, value in header.metadata.items():
        prefix, _, rest = gguf_key.replace(architecture, updated).partition(".")
        target = table.get(prefix, {}).get(rest, -1)
        if target is None or target == -1:  # None: read but unused; -1: not a config key
            continue
        value = _legacy_value(header, gguf_key, value)
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        config[target] = value
    _legacy_fixups(header, config, updated)
    return config


def _architecture_flags(architecture: str, model_name: list[str], names: tuple[str, ...]) -> dict[str, Any]:
    """Config entries the legacy loader derives from the architecture and tensor names, not from keys."""
    config: dict[str, Any] = {}
    if "t5" in architecture or "t5encoder" in architecture:
        config["is_gated_act"] = True
        if "t5encoder" in architecture:
            umt5 = model_name and "umt5" in model_name[0].lower()
            config["architectures"] = ["UMT5EncoderModel" if umt5 else "T5EncoderModel"]
    if "stablelm" in architecture:  # both read off which tensors exist
        config["use_qkv_bias"] = any(bias in name for name in names
                                     for bias in ("attn_q.bias", "attn_k.bias", "attn_v.bias"))
        config["use_parallel_residual"] = not any("ffn_norm" in name for name in names)
    return config


def _legacy_value(header: GGUFHeader, key: str, value: Any) -> Any:
    """A metadata value as the legacy loader sees it: a one-element array is its element."""
    if isinstance(value, StringArray):
        value = header.strings(key)
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _legacy_fixups(header: GGUFHeader, config: dict[str, Any], updated: str) -> None:
    """The per-model adjustments ``load_gguf_checkpoint`` makes after reading the keys."""
    model_type = config.get("model_type")
    if model_type == "gemma3":  # the file holds only the text backbone
        config["model_type"] = "gemma3_text"
    if model_type == "gemma4":
        config["model_type"] = "gemma4_text"
        config["eos_token_id"] = [1, 106, 50]  # as transformers sets it: the file names one of the three
    if model_type == "minimax_m2" and isinstance(config.get("scoring_func"), int):
        config["scoring_func"] = {0: "none", 1: "softmax", 2: "sigmoid"}.get(config["scoring_func"], "softmax")
    if model_type == "lfm2":
        heads = config["num_key_value_heads"]
        config["num_key_value_heads"] = max(heads)
        config["block_auto_adjust_ff_dim"] = False
        config["full_attn_idxs"] = [i for i, count in enumerate(heads) if count > 0]
    if updated == "gpt_oss":
        _gpt_oss_rope(header, config)
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config and isinstance(tokens, StringArray):
        config["vocab_size"] = tokens.count


def _gpt_oss_rope(header: GGUFHeader, config: dict[str, Any]) -> None:
    """gpt-oss's rope scaling, rebuilt from its ``gpt-oss.rope.scaling.*`` keys."""
    prefix = "gpt-oss.rope.scaling."
    rope_type = header.metadata.get(prefix + "type")
    if rope_type is None:
        return
    scaling: dict[str, Any] = {"rope_type": rope_type}
    for key, value in header.metadata.items():
        suffix = key[len(prefix):]
        if not key.startswith(prefix) or suffix == "type":
            continue
        if suffix in ("factor", "attention_factor", "beta_fast", "beta_slow"):
            value = float(value)
        elif suffix in ("original_context_length", "original_max_position_embeddings"):
            suffix, value = "original_max_position_embeddings", int(value)
        scaling[suffix] = value
    config["rope_scaling"] = scaling
