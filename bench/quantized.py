"""Quantized stores against the bf16 store: decode speed and bytes per token under a memory cap.

    python -m bench.quantized [--work DIR] [--cap 734MiB] [--rounds 2] [--stores bf16,int8,...] [--json]

One run compares, alternating and each cold (page cache evicted) in a fresh process under a real
cgroup cap: the TinyLlama-1.1B-shape store in bf16 (the suite's Llama scenario), the same weights
converted with ``--quantize int8`` and ``--quantize int4``, and the same shape as GGUF Q8_0 and Q4_0
files (random weights written with ``gguf.quants``) imported with their blocks kept; a contender
named ``STORE/torch`` is that store on torch's int4 kernel instead of hermesd's. Each child plans with
``hermesd.load(store, memory_budget=BUDGET, workload=128+32)`` and runs a 128-token prompt plus
32 new tokens. Reported per store: store bytes, bytes streamed per decode step, prompt seconds, decode
tokens/s, that rate against the disk bound (GB/s of a cold pass with hermesd's reader, measured every
round, ÷ bytes per step), peak RSS, OOM kills; and uncapped, with the automatic budget: decode
tokens/s with nothing streamed after the first pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.cgroup import MemoryGroup, unavailable_reason
from bench.harness import emit_json_line, evict, machine_facts, median, run_json_child, weight_files
from hermesd.units import format_size, parse_size

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "bench" / "configs" / "tinyllama-1.1b.json"
PROMPT, NEW = 128, 32

CHILD = r"""
import json, sys, time, torch
import hermesd
from bench.harness import proc_read_bytes, vm_hwm_bytes
from bench.scenarios import Scenario, Source
from bench.workloads import make_inputs, run_workload
from hermesd.plan.workload import Workload
store, budget, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fit = Workload(prompt_tokens=prompt, new_tokens=new) if sys.argv[5:] == ["fit"] else None
read0 = proc_read_bytes()
started = time.perf_counter()
engine = hermesd.load(store, memory_budget=None if budget == "auto" else budget, workload=fit)
load_s = time.perf_counter() - started
scenario = Scenario("q", "", "", Source("random", ""), "LlamaForCausalLM", "generate", tokens=prompt, new_tokens=new)
inputs = make_inputs(scenario, engine.model.config.vocab_size, torch.float32)
timings, out = run_workload(engine.model, scenario, inputs)
stats, plan = engine.stats, engine.plan
streamed = stats.bytes_read - stats.gathered_bytes
print(json.dumps({"ok": True, "load_s": load_s, **timings, "streamed_bytes": streamed,
                  "bytes_per_pass": streamed / max(stats.passes, 1), "passes": stats.passes,
                  "resident": len(plan.resident), "stages": len(plan.resident) + len(plan.streamed),
                  "prefetch": plan.prefetch, "budget": plan.budget, "peak_rss_bytes": vm_hwm_bytes(),
                  "bytes_read": proc_read_bytes() - read0, "tokens": out[0].tolist()}))
"""


def _hermesd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hermesd.cli", *args], check=True, cwd=ROOT, stdout=sys.stderr)  # keep stdout for the report


def _write_gguf(path: Path, qtype: str, config: Path | None = None) -> None:
    """A GGUF of ``config``'s Llama shape (default TinyLlama) with random weights, every 2-D weight in
    ``qtype`` (norms F32)."""
    import gguf
    import numpy as np
    from gguf.constants import GGMLQuantizationType

    cfg = json.loads((config or CONFIG).read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    kv_dim = hidden // heads * kv_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([1] * vocab)
    rng = np.random.default_rng(0)
    kind = GGMLQuantizationType[qtype]

    def add(name: str, shape: tuple[int, ...], quantized: bool = True) -> None:
        data = (rng.standard_normal(shape, dtype=np.float32) * 0.02) if quantized else np.ones(shape, np.float32)
        if quantized:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data)

    add("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_dim, hidden)), ("attn_v", (kv_dim, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (inter, hidden)),
                            ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
            add(f"blk.{i}.{name}.weight", shape)
        add(f"blk.{i}.attn_norm.weight", (hidden,), quantized=False)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), quantized=False)
    add("output_norm.weight", (hidden,), quantized=False)
    add("output.weight", (vocab, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


STORES = ("bf16", "int8", "int4", "q4_0", "q8_0")
# A contender named "<store>/torch" runs that store with torch's int4 kernel instead of hermesd's own
# (HERMESD_INT4_KERNEL=torch), so the two kernels are compared on the same bytes in the same run.
TORCH_KERNEL = "/torch"


def contender_env(name: str) -> dict[str, str] | None:
    """The child's environment for a contender (``None``: inherit)."""
    return {**os.environ, "HERMESD_INT4_KERNEL": "torch"} if name.endswith(TORCH_KERNEL) else None


def prepare(work: Path, names: tuple[str, ...] = STORES) -> dict[str, Path]:
    """The stores (made once, kept in ``work``): bf16, ``--quantize int8/int4`` of the same weights
    (fp32 compute), and GGUF Q4_0/Q8_0 files imported with their blocks kept; each profiled (once
    while its profile stays fresh), so plans count measured costs and peak slack."""
    work.mkdir(parents=True, exist_ok=True)
    stores = {name: work / f"tinyllama-{name}" for name in names}
    for name in ("bf16", "int8", "int4"):
        if name not in stores or (stores[name] / "manifest.json").exists():
            continue
        extra = ("--dtype", "bf16") if name == "bf16" else ("--dtype", "fp32", "--quantize", name)
        _hermesd("convert", "--random-config", str(CONFIG), str(stores[name]), *extra, "--quiet", "--force")
    for qtype in ("Q8_0", "Q4_0"):
        store = stores.get(qtype.lower())
        if store is None or (store / "manifest.json").exists():
            continue
        source = work / f"tinyllama-{qtype}.gguf"
        if not source.exists():
            print(f"writing {source} (random weights, {qtype})", file=sys.stderr, flush=True)
            _write_gguf(source, qtype)
        _hermesd("convert", str(source), str(store), "--quiet", "--force")
    for store in stores.values():  # plans with measured costs and slack, as a served model gets them
        _hermesd("profile", str(store), "--quiet")
    return stores


def run_one(store: Path, budget: str, cap: int | None, timeout: float = 1800, prompt: int = PROMPT,
            new: int = NEW, fit_workload: bool = False, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One cold run of ``store`` in a fresh child, under a cgroup cap of ``cap`` bytes (None: uncapped).

    The child plans for the default workload (a 512-token prompt), or with ``fit_workload`` for
    exactly ``prompt`` + ``new`` tokens (a 7 B shape's activations for 512 tokens exceed a 900 MiB cap).
    """
    evict(weight_files(store))
    command = [sys.executable, "-c", CHILD, str(store), budget, str(prompt), str(new), *(["fit"] if fit_workload else [])]
    if cap is None:
        return run_json_child(command, timeout, cwd=ROOT, env=env)
    with MemoryGroup(cap) as group:
        result = run_json_child(command, timeout, cwd=ROOT, env=env, preexec_fn=group.join)
        record = group.record()
    return {**result, "group_peak_bytes": record.peak_bytes, "oom_kills": record.oom_kills}


def summarise(runs: list[dict[str, Any]], read_gbps: float) -> dict[str, Any]:
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return {"ok": False, "error": runs[-1].get("error") if runs else "no run"}
    per_step = median(r["bytes_per_pass"] for r in ok)
    decode = median(r["decode_tokens_per_s"] for r in ok)
    bound = read_gbps * 1e9 / per_step if per_step else None
    return {"ok": True, "prompt_s": median(r["prefill_s"] for r in ok), "decode_tokens_per_s": decode,
            "bytes_per_step": per_step, "disk_bound_tokens_per_s": bound,
            "of_disk_bound": decode / bound if bound else None,
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok),
            "oom_kills": sum(r.get("oom_kills", 0) for r in runs), "resident": ok[0]["resident"],
            "stages": ok[0]["stages"], "prefetch": ok[0]["prefetch"], "runs": len(ok), "tokens": ok[0]["tokens"]}


def cold_read_gbps(store: Path) -> float:
    """GB/s of one cold pass over the store with hermesd's own reader and buffer (O_DIRECT, 64 MiB
    reads into pre-faulted memory): the rate the engine can stream at.

    (A plain ``os.readv`` loop over the same files measured 0.6-1.0 GB/s while the engine streamed
    1.8 GB/s, and buffered cold reads 0.27-0.47 GB/s: either would understate the disk bound.)
    """
    from hermesd.engine.bufferpool import map_memory
    from hermesd.engine.reader import StageReader
    from hermesd.store.manifest import Manifest

    reader = StageReader(store, Manifest.load(store))
    names = [stage.name for stage in reader.manifest.stages]
    view = memoryview(map_memory(max(reader.span(name) for name in names)))
    evict(weight_files(store))
    started = time.perf_counter()
    total = sum(reader.read(name, view)[1] for name in names)
    seconds = time.perf_counter() - started
    evict(weight_files(store))
    return total / seconds / 1e9


def memory_gbps(size: int = 1 << 30) -> float:
    """This machine's memory bandwidth as one large copy sees it (read + write bytes per second)."""
    import torch

    src, dst = torch.ones(size // 4), torch.empty(size // 4)
    dst.copy_(src)  # fault the pages in first
    started = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    return 3 * 2 * size / (time.perf_counter() - started) / 1e9


def _progress(name: str, run: dict[str, Any]) -> None:
    """One line per finished run on stderr, so a run cut short still leaves its numbers."""
    keys = ("ok", "prefill_s", "decode_tokens_per_s", "bytes_per_pass", "resident", "peak_rss_bytes", "error")
    print(f"  {name}: " + json.dumps({k: run.get(k) for k in keys if k in run}), file=sys.stderr, flush=True)


def run_suite(work: Path, cap: int, budget: str, rounds: int, names: tuple[str, ...] = STORES) -> dict[str, Any]:
    made = prepare(work, tuple(dict.fromkeys(n.removesuffix(TORCH_KERNEL) for n in names)))
    stores = {name: made[name.removesuffix(TORCH_KERNEL)] for name in names}
    reads = []  # the disk's rate drifts (0.6-2 GB/s over a day here): measured in every round
    capped: dict[str, list[dict[str, Any]]] = {name: [] for name in stores}
    for round_number in range(rounds):  # alternate contenders, so drift hits them alike
        reads.append(cold_read_gbps(stores["bf16"]))
        for name, store in stores.items():
            print(f"round {round_number + 1}/{rounds}: {name} under {format_size(cap)}", file=sys.stderr, flush=True)
            # plan for exactly this run's tokens: the default 512-token workload's activations alone
            # (328 MiB for this shape) leave too little of a 680 MiB budget since the minimum counts them
            capped[name].append(run_one(store, budget, cap, env=contender_env(name), fit_workload=True))
            _progress(name, capped[name][-1])
    read_gbps = median(reads)
    uncapped = {}
    for name, store in stores.items():
        print(f"uncapped, automatic budget: {name}", file=sys.stderr, flush=True)
        uncapped[name] = run_one(store, "auto", None, env=contender_env(name))
        _progress(name, uncapped[name])
    summary = {name: summarise(runs, read_gbps) for name, runs in capped.items()}
    for name, store in stores.items():
        summary[name]["store_bytes"] = sum(p.stat().st_size for p in weight_files(store))
        run = uncapped[name]
        summary[name]["auto"] = {k: run.get(k) for k in ("ok", "decode_tokens_per_s", "prefill_s", "resident",
                                                          "stages", "streamed_bytes", "passes", "peak_rss_bytes")}
        if run.get("ok") and run.get("decode_tokens_per_s"):
            # weights read per decoded token when everything is resident: the store's bytes
            summary[name]["auto"]["weight_gbps"] = summary[name]["store_bytes"] * run["decode_tokens_per_s"] / 1e9
    base = summary["bf16"].get("decode_tokens_per_s")
    for name in stores:
        mine = summary[name].get("decode_tokens_per_s")
        summary[name]["decode_vs_bf16"] = mine / base if mine and base else None
        same = summary[name].get("tokens") == uncapped[name].get("tokens")
        summary[name]["tokens_equal_resident"] = same if summary[name].get("ok") and uncapped[name].get("ok") else None
        summary[name].pop("tokens", None)
    return {"machine": machine_facts(), "cap_bytes": cap, "budget": budget, "read_gbps": read_gbps,
            "read_gbps_rounds": reads,
            "memory_gbps": memory_gbps(),
            "rounds": rounds, "prompt_tokens": PROMPT, "new_tokens": NEW, "stores": summary}


def render(report: dict[str, Any]) -> str:
    lines = [f"TinyLlama-1.1B shape, {report['prompt_tokens']}-token prompt + {report['new_tokens']} new tokens, "
             f"cap {format_size(report['cap_bytes'])}, budget {report['budget']}, cold read "
             f"{report['read_gbps']:.2f} GB/s, memory copy {report['memory_gbps']:.1f} GB/s, "
             f"{report['rounds']} alternating rounds (medians)",
             "| store | size | bytes/step | prompt s | decode tok/s | vs bf16 | of disk bound | peak RSS | OOM | "
             "auto: decode tok/s | auto: weight GB/s | same tokens as resident |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in report["stores"].items():
        if not s.get("ok"):
            lines.append(f"| {name} | failed: {s.get('error')} |")
            continue
        auto = s["auto"]
        lines.append(
            f"| {name} | {format_size(s['store_bytes'])} | {format_size(int(s['bytes_per_step']))} | "
            f"{s['prompt_s']:.2f} | {s['decode_tokens_per_s']:.2f} | {s['decode_vs_bf16']:.2f}x | "
            f"{s['of_disk_bound']:.2f} | {format_size(s['peak_rss_bytes'])} | {s['oom_kills']} | "
            f"{(auto.get('decode_tokens_per_s') or 0):.2f} | {(auto.get('weight_gbps') or 0):.2f} | "
            f"{s['tokens_equal_resident']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quantized", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "quantized")
    parser.add_argument("--cap", default="734MiB", help="cgroup memory cap (default 734MiB, the suite's Llama cap)")
    parser.add_argument("--budget", default="680MiB", help="process budget each child plans with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stores", default=",".join(STORES),
                        help=f"comma-separated subset of {','.join(STORES)}, each optionally with the suffix "
                             f"{TORCH_KERNEL} (torch's int4 kernel in place of hermesd's); bf16 is always run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    wanted = args.stores.split(",")
    names = tuple(dict.fromkeys(["bf16", *(n for n in wanted if n.removesuffix(TORCH_KERNEL) in STORES)]))
    if (why := unavailable_reason()) is not None:
        print(f"bench.quantized: {why}", file=sys.stderr)
        return 1
    report = run_suite(args.work, parse_size(args.cap), args.budget, args.rounds, names)
    if args.json:
        emit_json_line(report)
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
