"""The real models that ship inside PyPI packages, streamed, against transformers loading them whole."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

import hermesd
from hermesd.tasks import embed

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_from_gguf_answers_paris_with_the_full_models_tokens(smollm2):
    gguf, store = smollm2
    full = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with hermesd.load(store, prefetch=2) as engine:
        ids = engine.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)["input_ids"]
        streamed = engine.model.generate(ids, max_new_tokens=16, do_sample=False)
        answer = engine.tokenizer.decode(streamed[0, ids.shape[1]:], skip_special_tokens=True)
        with torch.inference_mode():
            torch.testing.assert_close(engine.model(ids).logits, full(ids).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(streamed, full.generate(ids, max_new_tokens=16, do_sample=False))
    assert "Paris" in answer


def test_smollm2_generate_under_a_memory_budget_in_a_fresh_process(smollm2):
    # The budget covers the whole process, so measure it in one that holds nothing else.
    _, store = smollm2
    command = [sys.executable, "-m", "hermesd.cli", "run", str(store), "--task", "generate", "--json",
               "--memory-budget", "800MiB", "--max-new-tokens", "12", "What is the capital of France?"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert "Paris" in report["result"]["text"]
    assert report["plan"]["streamed"], "800 MiB cannot hold fp32 weights plus runtime: stages must stream"
    assert report["stats"]["peak_rss_bytes"] <= report["plan"]["budget"] == 800 << 20


def test_minilm_embeddings_equal_the_full_model_and_rank_sentences(minilm):
    source, store = minilm
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    full = transformers.BertModel.from_pretrained(source).eval()
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = full(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    with hermesd.load(store, prefetch=1) as engine:
        vectors = torch.tensor(embed(engine, sentences, normalize=True)["embeddings"])
    torch.testing.assert_close(vectors, expected, atol=1e-5, rtol=1e-5)
    related, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert related > unrelated + 0.3
