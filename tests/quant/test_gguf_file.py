"""GGUF files read one tensor at a time with their blocks kept, checked against transformers' own loader.

The reference for every value is ``from_pretrained(dir, gguf_file=..., dtype=float32)``, which
de-quantizes with gguf-py and applies transformers' name map and tensor processors; a record is
right when gguf-py's de-quantization of its blocks equals that tensor bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf_support import SMOLLM2, TINY, assert_matches_transformers, need, rewrite, write_gguf

from hermesd.errors import ConvertError, UnsupportedModelError
from hermesd.quant.gguf_file import open_gguf
from hermesd.quant.gguf_plan import gguf_to_hf_names
from hermesd.quant.gguf_transforms import PermuteRows

# ---- real files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(TINY))
def test_tiny_llama_matches_transformers(kind: str) -> None:
    model_file = assert_matches_transformers(need(TINY[kind]))
    assert model_file.architecture == "LlamaForCausalLM"
    assert model_file.tied == {}  # the file has output.weight: an untied head
    assert model_file.dequantized == []


def test_smollm2_q4_1_matches_transformers() -> None:
    model_file = assert_matches_transformers(need(SMOLLM2))
    assert model_file.architecture == "LlamaForCausalLM"
    assert model_file.tied == {"lm_head.weight": "model.embed_tokens.weight"}  # no output.weight in the file
    types = [p.ggml_type for p in model_file.plans()]
    assert (types.count("Q4_1"), types.count("Q8_0"), types.count("F32")) == (210, 1, 61)  # Q8_0: the embedding


def test_rope_rows_are_permuted_and_everything_else_is_a_view() -> None:
    """Q/K get llama.cpp's rope order undone on whole rows (a copy); other tensors are views of the mapping."""
    path = need(TINY["Q4_K_M"])
    with open_gguf(path) as model_file:
        plans = {p.hf_name: p for p in model_file.plans()}
        q = plans["model.layers.0.self_attn.q_proj.weight"]
        k = plans["model.layers.0.self_attn.k_proj.weight"]
        assert isinstance(q.transform, PermuteRows) and isinstance(k.transform, PermuteRows)
        # 4 heads of 64 rows (q) and 2 KV heads (k): within a head, rows 0,2,4.. then 1,3,5..
        assert list(q.transform.order[:4]) == [0, 2, 4, 6] and list(q.transform.order[32:34]) == [1, 3]
        assert len(k.transform.order) == 128
        stored = model_file._header.raw(q.sources[0])
        record = model_file.tensor(q.hf_name)
        assert record.raw.flags.owndata and not np.array_equal(record.raw, stored)
        assert np.array_equal(record.raw, stored[q.transform.order])
        assert sum(isinstance(p.transform, PermuteRows) for p in plans.values()) == 8  # q and k of 4 layers
        v = model_file.tensor("model.layers.0.self_attn.v_proj.weight")
        assert v.ggml_type == "Q4_K" and v.raw.shape == (128, 144)
        assert not v.raw.flags.owndata and np.shares_memory(v.raw, np.frombuffer(model_file._header.mapping, np.uint8))


def test_views_stay_valid_after_their_pages_are_released() -> None:
    """Released pages leave this process only: a view kept past its turn re-reads the same bytes."""
    with open_gguf(need(TINY["Q5_K_M"])) as model_file:
        kept = [(record.hf_name, record.raw, record.raw.copy()) for record in model_file.tensors(release=True)]
        assert all(np.array_equal(raw, copy) for _, raw, copy in kept)
        assert all(np.array_equal(model_file.tensor(name).raw, copy) for name, _, copy in kept)


def test_lookup_and_tied_names() -> None:
    with open_gguf(need(SMOLLM2)) as model_file:
        record = model_file.tensor("model.embed_tokens.weight")
        assert (record.ggml_type, record.shape, record.raw.shape) == ("Q8_0", (49152, 576), (49152, 18 * 34))
        with pytest.raises(KeyError, match="tied to model.embed_tokens.weight"):
            model_file.tensor("lm_head.weight")
        with pytest.raises(KeyError, match="not provided"):
            model_file.tensor("model.nothing.weight")


def test_name_map_equals_transformers() -> None:
    """Our one-pass name map gives what transformers' get_gguf_hf_weights_map gives."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    with open_gguf(need(TINY["Q4_K_M"])) as model_file:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(model_file.config)
        processor = LlamaTensorProcessor(config={})
        assert gguf_to_hf_names(model, processor, model_file._header) == get_gguf_hf_weights_map(model, processor)


def test_save_tokenizer(tmp_path: Path) -> None:
    path = need(SMOLLM2)
    with open_gguf(path) as model_file:
        written = model_file.save_tokenizer(tmp_path / "tok")
    assert "tokenizer.json" in written and "tokenizer_config.json" in written
    ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "Hello, streaming world! 123"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"] and len(ours) == len(theirs) == 49152


# ---- files written here: the legacy block types -------------------------------------------------

@pytest.mark.parametrize("block_type", ["Q4_0", "Q8_0"])
def test_q4_0_and_q8_0_files(tmp_path: Path, block_type: str) -> None:
    path = rewrite(need(TINY["Q4_K_M"]), tmp_path / f"tiny-{block_type}.gguf",
                   lambda name, ndim: block_type if ndim == 2 else "F32")
    model_file = assert_matches_transformers(path)
    assert {p.ggml_type for p in model_file.plans()} == {block_type, "F32"}


def test_every_other_supported_type(tmp_path: Path) -> None:
    """Q4_1, Q5_0, Q5_1, F16 and BF16 blocks in one file, each for some tensors."""
    cycle = ["Q4_1", "Q5_0", "Q5_1", "F16", "BF16"]
    names: dict[str, str] = {}

    def type_for(name: str, ndim: int) -> str:
        if ndim == 1:
            return "F16" if name == "output_norm.weight" else "F32"
        return names.setdefault(name, cycle[len(names) % len(cycle)])

    model_file = assert_matches_transformers(rewrite(need(TINY["Q4_K_M"]), tmp_path / "mixed.gguf", type_for))
    assert {p.ggml_type for p in model_file.plans()} == set(cycle) | {"F32"}


# ---- bad input ------------------------------------------------------------------------------------

def test_truncated_file(tmp_path: Path) -> None:
    source = need(TINY["Q4_K_M"])
    data = source.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    truncated = r"cut\.gguf: truncated: tensor [\w.]+ \(Q\d_K, \d+ bytes at \d+\) runs past the end"
    with pytest.raises(ConvertError, match=truncated):
        open_gguf(cut)
    cut.write_bytes(data[:5000])  # inside the vocabulary
    with pytest.raises(ConvertError, match=r"cut\.gguf: truncated GGUF header"):
        open_gguf(cut)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    blocks = np.zeros((4, 84), dtype=np.uint8)  # four rows of one Q2_K super-block each
    path = write_gguf(tmp_path / "q2k.gguf", "llama", {"blk.0.ffn_up.weight": (blocks, "Q2_K")})
    with pytest.raises(UnsupportedModelError) as error:
        open_gguf(path)
    message = str(error.value)
    assert "q2k.gguf" in message and "blk.0.ffn_up.weight" in message and "Q2_K" in message
    assert "supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K" in message


def test_architecture_transformers_lacks(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "nosuch.gguf", "nosuchmodel",
                      {"token_embd.weight": (np.zeros((8, 32), np.float32), "F32")}, nosuchmodel__block_count=1)
    with pytest.raises(UnsupportedModelError, match=r"nosuch\.gguf: GGUF architecture 'nosuchmodel' is not supported"):
        open_gguf(path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConvertError, match=r"config\.json: not a GGUF file \(starts with b'\{\"mo'"):
        open_gguf(path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ConvertError, match=r"empty\.gguf: not a GGUF file \(it is empty\)"):
        open_gguf(tmp_path / "empty.gguf")
    with pytest.raises(ConvertError, match="missing.gguf: cannot map"):
        open_gguf(tmp_path / "missing.gguf")


# ---- memory ---------------------------------------------------------------------------------------

_MEASURE = r"""
import json, resource, sys
import transformers
from hermesd.quant.gguf_file import open_gguf

transformers.LlamaForCausalLM  # its lazy import is code, not the file's cost: load it before measuring

def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}

imported = rss()
model_file = open_gguf(sys.argv[1])
before, peak, largest, total = rss(), 0, 0, 0
for record in model_file.tensors(release=sys.argv[2] == "release"):
    checksum = int(record.raw.sum(dtype="uint64"))  # touch every byte, as a converter copying it would
    largest, total = max(largest, record.raw.nbytes), total + record.raw.nbytes
    peak = max(peak, rss()["VmRSS"])
print(json.dumps({"imported": imported["VmRSS"], "imported_anon": imported["RssAnon"],
                  "opened_anon": before["RssAnon"], "before": before["VmRSS"], "peak": peak, "largest": largest,
                  "total": total, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _measure(path: Path, mode: str) -> dict:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode], capture_output=True, text=True,
                         cwd=root, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_iterating_holds_about_one_tensor() -> None:
    """Peak RSS while touching every byte of SmolLM2 (98 MB) grows by about its largest tensor, not the file."""
    path = need(SMOLLM2)
    released = _measure(path, "release")
    kept = _measure(path, "keep")
    growth = released["peak"] - released["before"]
    assert released["total"] > 90e6 and released["largest"] < 32e6  # the Q8_0 embedding, 30 MB
    assert growth < 2 * released["largest"] + 8e6, released
    assert kept["peak"] - kept["before"] > 0.8 * kept["total"]  # without release the mapping stays resident
    # opening (header, config, meta model) costs little: no vocabulary is decoded
    assert released["opened_anon"] - released["imported_anon"] < 16e6, released
