"""bench.workloads / bench.scenarios: same inputs for every contender, prefill and decode timed apart."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from bench import scenarios
from bench.workloads import make_inputs, output_record, run_workload

TINY = scenarios.Scenario("tiny", "tiny GPT-2", "tiny", scenarios.Source("random", "x.json", "fp32"),
                          "GPT2LMHeadModel", "forward", tokens=8, cap_bytes=1 << 30)


@pytest.fixture(scope="module")
def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def test_inputs_are_seeded_and_shaped() -> None:
    a = make_inputs(replace(TINY, batch=3), 100, torch.float32)
    b = make_inputs(replace(TINY, batch=3), 100, torch.float32)
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].shape == (3, 8)
    assert int(a["input_ids"].min()) >= 1 and a["attention_mask"].all()
    pixels = make_inputs(replace(TINY, inputs="pixels", batch=2, image_size=32), None, torch.bfloat16)
    assert pixels["pixel_values"].shape == (2, 3, 32, 32) and pixels["pixel_values"].dtype == torch.bfloat16


def test_forward_workload_times_the_prompt(tiny_gpt2: torch.nn.Module, tmp_path: Path) -> None:
    inputs = make_inputs(TINY, 100, torch.float32)
    timings, output = run_workload(tiny_gpt2, TINY, inputs)
    assert timings["latency_s"] > 0 and timings["prefill_tokens_per_s"] == pytest.approx(8 / timings["latency_s"])
    assert output.shape == (1, 100)  # last position's logits
    record = output_record(output, tmp_path / "out.npy")
    assert np.array_equal(np.load(tmp_path / "out.npy", allow_pickle=False), output.numpy())
    assert record == output_record(output.clone(), None)


def test_generate_workload_splits_prefill_and_decode(tiny_gpt2: torch.nn.Module) -> None:
    scenario = replace(TINY, task="generate", new_tokens=5)
    timings, output = run_workload(tiny_gpt2, scenario, make_inputs(scenario, 100, torch.float32))
    assert output.shape == (1, 5) and timings["new_tokens"] == 5 and timings["decode_tokens"] == 4
    assert timings["prefill_s"] + timings["decode_s"] == pytest.approx(timings["latency_s"])
    assert timings["decode_tokens_per_s"] == pytest.approx(4 / timings["decode_s"])


def test_scenarios_round_trip_and_selection() -> None:
    for scenario in scenarios.FULL + scenarios.quick():
        assert scenarios.Scenario.from_dict(scenario.to_dict()) == scenario
    assert [s.name for s in scenarios.select(scenarios.FULL, "llama-1b,gpt2-xl")] == ["llama-1b", "gpt2-xl"]
    with pytest.raises(ValueError, match="unknown scenario"):
        scenarios.select(scenarios.FULL, "nope")
    llama = scenarios.select(scenarios.FULL, "llama-1b")[0]
    assert llama.workload_text() == "128:32:1" and "airllm" in llama.contenders
    assert {s.name for s in scenarios.quick()} == {"smollm2", "minilm"}
