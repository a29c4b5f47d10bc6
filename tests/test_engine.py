"""The engine's correctness bar: streamed output equals the fully loaded model's, for every architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, CAUSAL, VOCAB

import hermesd
from hermesd.errors import BudgetError
from hermesd.store.manifest import Manifest


def _inputs(name: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    ids = torch.randint(1, VOCAB, (2, 19), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a padded row exercises the attention mask path
    return {"input_ids": ids, "attention_mask": mask}


def _main_output(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _stage_names(store) -> list[str]:
    return [s.name for s in Manifest.load(store).stages]


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("prefetch", [0, 1, 2, 3])
def test_streamed_forward_equals_full_model(converted, name, prefetch):
    model = converted(name)
    inputs = _inputs(name)
    with torch.inference_mode():
        want = _main_output(model.reference()(**inputs))
        with hermesd.load(model.store, prefetch=prefetch) as engine:
            got = _main_output(engine.model(**inputs))
            stats = engine.stats
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    streamed = [s for s in stats.stages if not s.resident]
    assert stats.passes == 1 and stats.bytes_read > 0
    assert {s.name for s in streamed} == set(_stage_names(model.store))
    assert stats.on_demand_loads == (len(streamed) if prefetch == 0 else 0)


@pytest.mark.parametrize("name", ARCHS)
def test_resident_stages_give_the_same_output(converted, name):
    model = converted(name)
    stages = _stage_names(model.store)
    resident = [stages[0], stages[len(stages) // 2], stages[-1]]
    inputs = _inputs(name)
    with torch.inference_mode():
        want = _main_output(model.reference()(**inputs))
        with hermesd.load(model.store, prefetch=2, resident=resident) as engine:
            got = _main_output(engine.model(**inputs))
            first = {s.name: s for s in engine.stats.stages if s.resident}
            again = _main_output(engine.model(**inputs))
            kept = {s.name: s for s in engine.stats.stages if s.resident}
            assert engine.plan.resident == tuple(resident)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, got)
    # load() maps them; the first run reads each once, where it is first needed; later runs read none
    assert set(first) == set(resident) and all(s.loads == 1 and s.bytes_read > 0 for s in first.values())
    # their compute is counted with the streamed stages' (stats.compute_s is the whole model's)
    assert set(kept) == set(resident) and all(s.compute_s > 0 and s.loads == s.bytes_read == 0 for s in kept.values())


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("resident", [None, "some"])
def test_greedy_generation_matches_token_for_token(converted, name, prefetch, resident):
    model = converted(name)
    prompt = _inputs(name)["input_ids"][:1]
    keep = _stage_names(model.store)[-2:] if resident else None
    want = model.reference().generate(prompt, max_new_tokens=8, do_sample=False)
    with hermesd.load(model.store, prefetch=prefetch, resident=keep) as engine:
        got = engine.model.generate(prompt, max_new_tokens=8, do_sample=False)
        assert engine.stats.passes == 8
    assert torch.equal(got, want)


def test_generation_keeps_the_kv_cache_and_streams_only_weights(converted):
    model = converted("llama")
    prompt = _inputs("llama")["input_ids"][:1]
    seen_lengths = []
    with hermesd.load(model.store, prefetch=2) as engine:
        handle = engine.model.model.layers[0].register_forward_pre_hook(
            lambda module, args, kwargs: seen_lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
            with_kwargs=True)
        engine.model.generate(prompt, max_new_tokens=5, do_sample=False)
        handle.remove()
        stats = engine.stats
    # With the cache, the first pass sees the prompt and every later pass one new token.
    assert seen_lengths == [prompt.shape[1]] + [1] * 4
    layer = next(s for s in stats.stages if s.name == "model.layers.0")
    assert layer.loads == 5, "weights stream again on every pass"


def test_budget_below_minimum_is_refused_with_the_minimum(converted):
    model = converted("gpt2")
    with pytest.raises(BudgetError) as caught:
        hermesd.load(model.store, memory_budget="1MiB")
    assert caught.value.minimum > caught.value.budget == 1 << 20
    assert "minimum" in str(caught.value) and "MiB" in str(caught.value)


def test_budget_holding_the_whole_model_keeps_everything_resident(converted):
    model = converted("gpt2")
    inputs = _inputs("gpt2")
    with hermesd.load(model.store, memory_budget="8GiB") as engine:
        assert engine.plan.streamed == () and engine.plan.pool_bytes == 0
        engine.wait_resident()  # every stage read now: no run counts loads
        with torch.inference_mode():
            engine.model(**inputs)
        stages = engine.stats.stages
        assert stages and all(s.resident and s.loads == 0 for s in stages), "nothing is loaded when all are resident"
        assert {s.name for s in stages} == set(_stage_names(model.store)) and engine.stats.compute_s > 0
        assert engine.stats.bytes_read == engine.stats.gathered_bytes > 0


def test_pool_never_exceeds_the_planned_window(converted):
    model = converted("gptj")
    with hermesd.load(model.store, prefetch=2) as engine:
        with torch.inference_mode():
            engine.model.generate(_inputs("gptj")["input_ids"][:1], max_new_tokens=4, do_sample=False)
        assert 0 < engine.stats.pool_high_water_bytes <= engine.plan.pool_bytes
        assert engine.stats.peak_rss_bytes > 0


@pytest.mark.parametrize("direct", [True, False])
def test_streaming_leaves_no_weights_in_the_page_cache(converted, direct):
    from conftest import evict, resident_bytes

    model = converted("gpt2")
    files = sorted((model.store / "stages").glob("*.safetensors"))
    evict(files)
    with hermesd.load(model.store, prefetch=2, direct_io=direct) as engine:
        assert engine.reader.read_mode == ("direct" if direct else "buffered")
        with torch.inference_mode():
            engine.model(**_inputs("gpt2"))
    cached = sum(resident_bytes(path) for path in files)
    total = sum(path.stat().st_size for path in files)
    assert cached < 0.01 * total, f"{cached} of {total} bytes stayed in the page cache"


def test_stage_inputs_with_a_parents_strides_get_standard_strides():
    # generate's hidden[:, -1:, :] counts as contiguous but keeps the prompt's batch stride; PyTorch's
    # CPU bf16 matmul then copies the whole weight (2 s, +500 MiB for a Llama-1B head). Same values.
    from hermesd.engine.runtime import _standard_strides

    hidden = torch.randn(1, 128, 64, dtype=torch.bfloat16)
    last = hidden[:, -1:, :]
    assert last.is_contiguous() and last.stride() == (128 * 64, 64, 1)
    args, kwargs = _standard_strides(None, (last,), {"other": last, "flag": True})
    assert args[0].stride() == (64, 64, 1) and kwargs["other"].stride() == (64, 64, 1) and kwargs["flag"] is True
    assert torch.equal(args[0], last)
    assert _standard_strides(None, (hidden,), {}) is None, "ordinary inputs pass untouched"


def test_bf16_generation_matches_the_full_model_with_restrided_head_inputs(tmp_path):
    import transformers
    from conftest import make_hf_model

    from hermesd.store.convert import convert, open_source

    _, hf_dir = make_hf_model("llama", tmp_path, dtype=torch.bfloat16)
    convert(open_source(hf_dir), tmp_path / "store")
    prompt = _inputs("llama")["input_ids"][:1]
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    want = reference.generate(prompt, max_new_tokens=8, do_sample=False)
    with hermesd.load(tmp_path / "store", prefetch=1) as engine:
        assert torch.equal(engine.model.generate(prompt, max_new_tokens=8, do_sample=False), want)


def test_an_interrupted_forward_leaves_the_engine_usable(converted):
    model = converted("gpt2")
    inputs = _inputs("gpt2")

    def interrupt(module, args):
        raise KeyboardInterrupt  # torch skips always_call hooks for it: stages stay bound, the run open

    with torch.inference_mode():
        want = model.reference()(**inputs).logits
    engine = hermesd.load(model.store, prefetch=2)
    handle = engine.model.transformer.h[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.inference_mode():
        engine.model(**inputs)
    handle.remove()
    with torch.inference_mode():
        got = engine.model(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert engine.stats.on_demand_loads == 0 and engine.reader is not None
    assert engine._runtime.prefetcher.pool.overdrafts == 0, "the interrupted run's regions were all given back"
    engine.close()
    engine.close()  # closing twice is harmless


def _loader_policies() -> set[int]:
    import os
    import threading

    return {os.sched_getscheduler(t.native_id) for t in threading.enumerate() if t.name.startswith("hermesd-loader")}


@pytest.mark.parametrize("planned,forced,expected", [("idle", "", "idle"), ("normal", "", "normal"),
                                                      ("idle", "normal", "normal")])
def test_loader_threads_run_at_the_plans_priority(converted, monkeypatch, planned, forced, expected):
    import dataclasses
    import os

    model = converted("gpt2")
    monkeypatch.setenv("HERMESD_LOADER_PRIORITY", forced)
    from hermesd.planning import resolve

    plan = dataclasses.replace(resolve(model.store, prefetch=2).plan, loader_priority=planned)
    inputs = _inputs("gpt2")
    with torch.inference_mode():
        want = _main_output(model.reference()(**inputs))
        with hermesd.load(model.store, plan=plan) as engine:
            got = _main_output(engine.model(**inputs))
            stats, policies = engine.stats, _loader_policies()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert stats.loader_priority == expected and stats.loaders == 1
    assert policies == {os.SCHED_IDLE if expected == "idle" else os.SCHED_OTHER}
    # The reading thread's CPU is measured per load, and one thread cannot use more CPU than wall time.
    assert 0 < stats.load_cpu_s <= stats.load_s + 0.01


def test_close_gives_the_ring_back_even_while_the_engine_is_still_referenced(converted):
    # The profiler opens engine after engine in one process; a closed engine's ring that stayed
    # resident until garbage collection was counted in the next engine's peak (244 MiB on GPT-2-XL).
    import dataclasses

    from hermesd import memory

    model = converted("gpt2")
    with hermesd.load(model.store, prefetch=1) as probe:
        plan = probe.plan
    assert plan.streamed, "the ring is only mapped for a plan that streams"
    engine = hermesd.load(model.store, plan=dataclasses.replace(plan, pool_bytes=128 << 20))
    with torch.inference_mode():
        engine.model(**_inputs("gpt2"))
    open_rss = memory.rss_bytes()
    engine.close()
    assert open_rss - memory.rss_bytes() > 100 << 20  # the 128 MiB ring, faulted in at open
    assert engine.plan.pool_bytes == 128 << 20  # the object itself is still alive
