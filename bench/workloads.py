"""The same inputs and the same timed workload for every contender of a scenario.

Inputs are drawn from seeded generators (token ids, or images as pixel values). ``run_workload``
times one forward, or a greedy ``generate`` whose prefill (prompt pass, first token) and decode
(every later token) are timed separately with a streamer that notes when each token arrives.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.scenarios import Scenario


def make_inputs(scenario: Scenario, vocab_size: int | None, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """The scenario's batch: ``input_ids`` + ``attention_mask``, or ``pixel_values`` in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    if scenario.inputs == "pixels":
        size = (scenario.batch, 3, scenario.image_size, scenario.image_size)
        return {"pixel_values": torch.randn(size, generator=generator).to(dtype)}
    # Token 0 is often a special token (padding); draw from 1.. so every contender sees plain text ids.
    ids = torch.randint(1, int(vocab_size), (scenario.batch, scenario.tokens), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@dataclass
class TokenClock:
    """A ``generate`` streamer that records when the prompt and each new token arrive (perf_counter)."""

    times: list[float] = field(default_factory=list)
    ended: float | None = None

    def put(self, value: torch.Tensor) -> None:  # first call: the prompt; then one call per new token
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.ended = time.perf_counter()


def run_workload(model: Any, scenario: Scenario, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
    """Run the scenario's workload on ``model``; return timings and the output to compare.

    Timings: ``latency_s``; ``prefill_s`` and ``prefill_tokens_per_s`` (the prompt pass); for
    generate also ``decode_s`` and ``decode_tokens_per_s`` over the tokens after the first.
    The output is the last position's logits (forward) or the generated token ids (generate).
    """
    prompt_tokens = scenario.batch * (scenario.tokens if scenario.inputs == "ids" else 1)
    with torch.inference_mode():
        if scenario.task == "generate":
            return _generate(model, scenario, inputs, prompt_tokens)
        kwargs = {"use_cache": False} if scenario.causal else {}
        started = time.perf_counter()
        output = model(**inputs, **kwargs)
        latency = time.perf_counter() - started
    first = output[0]  # logits, or last_hidden_state of a bare encoder
    timings = {"latency_s": latency, "prefill_s": latency, "prefill_tokens_per_s": prompt_tokens / latency}
    if scenario.inputs == "pixels":
        timings["items_per_s"] = scenario.batch / latency
    return timings, first[:, -1] if first.dim() == 3 else first


def _generate(model: Any, scenario: Scenario, inputs: dict[str, torch.Tensor],
              prompt_tokens: int) -> tuple[dict[str, Any], torch.Tensor]:
    clock = TokenClock()
    new = scenario.new_tokens
    started = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock,
                         pad_token_id=0)
    latency = time.perf_counter() - started
    first_token = clock.times[1] if len(clock.times) > 1 else started + latency
    prefill = first_token - started
    decode = latency - prefill
    decoded = scenario.batch * (new - 1)
    timings = {"latency_s": latency, "prefill_s": prefill, "prefill_tokens_per_s": prompt_tokens / prefill,
               "decode_s": decode, "decode_tokens": decoded,
               "decode_tokens_per_s": decoded / decode if decoded and decode > 0 else None,
               "new_tokens": int(out.shape[1] - scenario.tokens)}
    return timings, out[:, scenario.tokens:]


def output_record(output: torch.Tensor, out_path: Path | None) -> dict[str, Any]:
    """A digest of the output (exact comparisons) and, if asked, the output saved as .npy (no pickle)."""
    array = output.detach().to(torch.float32 if output.is_floating_point() else torch.int64).numpy()
    if out_path is not None:
        np.save(out_path, array, allow_pickle=False)
    return {"output_shape": list(array.shape), "output_sha256": hashlib.sha256(array.tobytes()).hexdigest()[:16]}
