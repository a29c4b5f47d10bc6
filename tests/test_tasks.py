"""Tasks: parameters are validated, outputs equal the full model's, wrong-model requests are refused."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from conftest import make_hf_model

import hermesd
from hermesd.errors import TaskError
from hermesd.store.convert import convert, open_source
from hermesd.tasks import GenerateParams, run_task


@pytest.fixture(scope="module")
def smol(smollm2):
    with hermesd.load(smollm2[1], prefetch=2) as engine:
        yield engine


@pytest.mark.parametrize("params, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"max_new_tokens": "5"}, "max_new_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"stop": [""]}, "stop"),
    ({"beams": 4}, "bad parameters"),
])
def test_bad_generate_parameters_are_refused(params, message):
    with pytest.raises(TaskError, match=message):
        GenerateParams(**params) if "beams" not in params else run_task(None, "generate", "hi", params)


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed(smol):
    params = {"max_new_tokens": 10, "temperature": 0.9, "top_p": 0.95, "top_k": 40}
    first = run_task(smol, "generate", "Tell me a story.", params | {"seed": 11})
    again = run_task(smol, "generate", "Tell me a story.", params | {"seed": 11})
    other = run_task(smol, "generate", "Tell me a story.", params | {"seed": 12})
    assert first == again
    assert first["text"] != other["text"]


@pytest.mark.slow
def test_stop_strings_cut_the_text_and_tokens_are_reported(smol):
    counted = []
    result = run_task(smol, "generate", "What is the capital of France?",
                      {"max_new_tokens": 20, "stop": ["Paris"]}, on_token=counted.append)
    assert result["finish_reason"] == "stop" and "Paris" not in result["text"]
    assert result["text"].startswith("The capital of France is")
    assert len(counted) == result["new_tokens"] > 0
    plain = run_task(smol, "generate", "Once upon a time, there was a", {"max_new_tokens": 3, "chat": False})
    assert plain == {"text": " small town nestled", "prompt_tokens": 8, "new_tokens": 3, "finish_reason": "length"}


@pytest.mark.slow
def test_chat_messages_and_bad_prompts(smol):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in run_task(smol, "generate", messages, {"max_new_tokens": 12})["text"]
    for bad in ["", 42, [{"role": "user"}]]:
        with pytest.raises(TaskError):
            run_task(smol, "generate", bad, {})


@pytest.mark.slow
def test_tasks_refuse_models_that_cannot_serve_them(smol, minilm):
    with pytest.raises(TaskError, match="no classification head"):
        run_task(smol, "classify", ["hello"], {})
    with hermesd.load(minilm[1]) as encoder:
        with pytest.raises(TaskError, match="not a causal language model"):
            run_task(encoder, "generate", "hello", {})
        with pytest.raises(TaskError, match="unknown task"):
            run_task(encoder, "translate", "hello", {})
        with pytest.raises(TaskError, match="unknown parameter"):
            run_task(encoder, "embed", ["hello"], {"pooling": "mean", "colour": "red"})
        result = run_task(encoder, "embed", "hello world", {"pooling": "cls"})
        assert result["dimensions"] == 384 and len(result["embeddings"]) == 1


@pytest.fixture(scope="module")
def text_classifier(tmp_path_factory, minilm):
    """A random BertForSequenceClassification with the real MiniLM tokenizer (vocabulary 30522)."""
    root = tmp_path_factory.mktemp("classifier")
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=3,
                                     id2label={0: "negative", 1: "neutral", 2: "positive"})
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm[0] / name, root / "hf" / name)
    convert(open_source(root / "hf"), root / "store")
    return model, root / "store"


@pytest.mark.slow
def test_text_classification_scores_equal_the_full_model(text_classifier, minilm):
    model, store = text_classifier
    texts = ["I love this.", "This is terrible and slow."]
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm[0])
    with torch.inference_mode():
        want = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    with hermesd.load(store) as engine:
        labels = run_task(engine, "classify", texts, {"top_k": 3})["labels"]
    for row, expected in zip(labels, want):
        assert sum(item["score"] for item in row) == pytest.approx(1.0, abs=1e-5)
        by_label = {item["label"]: item["score"] for item in row}
        for index, name in model.config.id2label.items():
            assert by_label[name] == pytest.approx(expected[index].item(), abs=1e-5)


def test_image_classification_from_files(tmp_path):
    from PIL import Image

    architecture, hf_dir = make_hf_model("vit", tmp_path)
    convert(open_source(hf_dir), tmp_path / "store")
    paths = []
    for index, colour in enumerate(["red", "navy"]):
        paths.append(str(tmp_path / f"{colour}.png"))
        Image.new("RGB", (48, 40 + index), colour).save(paths[-1])
    reference = transformers.ViTForImageClassification.from_pretrained(hf_dir).eval()
    pixels = transformers.AutoImageProcessor.from_pretrained(hf_dir)(
        images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
    with torch.inference_mode():
        want = reference(pixel_values=pixels).logits.softmax(-1)
    with hermesd.load(tmp_path / "store", prefetch=1) as engine:
        labels = run_task(engine, "classify", paths, {"top_k": 1})["labels"]
        with pytest.raises(TaskError, match="image 0: not allowed or not readable"):
            run_task(engine, "classify", [str(tmp_path / "missing.png")], {})
    for row, expected in zip(labels, want):
        best = int(expected.argmax())
        assert row == [{"label": reference.config.id2label[best], "score": pytest.approx(expected[best].item(), abs=1e-5)}]


def test_forward_returns_raw_outputs_for_token_ids(converted):
    model = converted("gpt2")
    with hermesd.load(model.store) as engine:
        result = run_task(engine, "forward", [[1, 2, 3], [4, 5, 6]], {})
        with pytest.raises(TaskError, match="equal-length"):
            run_task(engine, "forward", [[1, 2], [3]], {})
    logits = result["outputs"]["logits"]
    assert logits["shape"] == [2, 3, 5000] and logits["dtype"] == "float32"
    with torch.inference_mode():
        want = model.reference()(torch.tensor([[1, 2, 3], [4, 5, 6]])).logits
    torch.testing.assert_close(torch.tensor(logits["values"]), want, atol=1e-5, rtol=1e-5)
