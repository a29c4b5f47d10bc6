"""The Layer Profiler on a real (small) store, its fingerprint, and saved plans used by load()."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from daemon_support import CHILD_PATH, REPO

import hermesd
from hermesd.plan.planner import choose_plan
from hermesd.plan.profile import Profile, fingerprint, load_fresh_profile, profile_path
from hermesd.plan.saved import save_plan, saved_plan
from hermesd.plan.workload import Workload
from hermesd.profiling import profile_store
from hermesd.store.manifest import Manifest


@pytest.fixture(scope="module")
def profiled(converted, tmp_path_factory):
    """A private copy of the GPT-2 test store, profiled once."""
    import shutil

    store = tmp_path_factory.mktemp("profiled") / "gpt2"
    shutil.copytree(converted("gpt2").store, store)
    messages = []
    profile = profile_store(store, reference_tokens=32, progress=messages.append)
    profile.save(profile_path(store))
    return store, profile, messages


def test_profile_measures_every_stage(profiled):
    store, profile, messages = profiled
    manifest = Manifest.load(store)
    assert [s.name for s in profile.stages] == [s.name for s in manifest.stages]
    blocks = [s for s in profile.stages if s.kind == "block"]
    assert all(s.load_cold_s > 0 and s.compute_prompt_s > 0 and s.compute_decode_s > 0 for s in blocks)
    assert all(s.bytes >= manifest.stage(s.name).stored_bytes for s in blocks)
    assert profile.causal and profile.kv_bytes_per_token >= 2 * 3 * 64 * 4  # 2 x layers x hidden x fp32, or measured
    assert profile.runtime_bytes > 100 << 20 and profile.interference >= 1.0
    assert profile.read_direct_gbps > 0 and profile.read_buffered_gbps > 0
    assert [m.split(":")[0] for m in messages][:6] == [f"pass {n}/6" for n in range(1, 7)]
    assert profile.interference_idle >= 1.0 and profile.idle_read_slowdown >= 1.0
    assert profile.fault_gbps > 0 and profile.skeleton_s > 0 and profile.peak_slack_bytes >= 0
    assert profile.first_read_cpu_s_per_gb > 0, "a resident first read costs its thread some CPU"


@pytest.mark.parametrize("depth,workload", [(1, "32:4"), (2, "32:0")])
def test_predicted_peak_is_never_below_the_measured_peak(profiled, tmp_path, depth, workload):
    """The planner's plan, run in a fresh process (as ``hermesd run`` does): its measured peak RSS
    (VmHWM over the run) is within the predicted peak."""
    store, profile, _ = profiled
    parsed = Workload.parse(workload)
    prediction = choose_plan(profile, None, parsed, depths=range(depth, depth + 1))  # all streamed
    assert prediction.plan.streamed and prediction.plan.prefetch == depth
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(prediction.to_dict()))
    done = subprocess.run([sys.executable, "-m", "bench.plan_runner", str(store), str(plan_file),
                           str(parsed.prompt_tokens), str(parsed.new_tokens)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": CHILD_PATH})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["stats"]["peak_rss_bytes"] <= prediction.peak_bytes, (measured, prediction.peak_bytes)


def test_profile_round_trips_and_goes_stale_when_the_store_changes(profiled, tmp_path):
    store, profile, _ = profiled
    assert Profile.load(profile_path(store)) == profile
    assert load_fresh_profile(store) == profile
    assert set(profile.fingerprint) >= {"cpu", "cores", "ram_bytes", "torch", "transformers", "store_sha256",
                                        "filesystem"}
    manifest = store / "manifest.json"
    original = manifest.read_text()
    manifest.write_text(original.replace('"n_layer": 3', '"n_layer": 3 '))
    try:
        assert fingerprint(store)["store_sha256"] != profile.fingerprint["store_sha256"]
        assert load_fresh_profile(store) is None, "a changed store makes the profile stale"
    finally:
        manifest.write_text(original)
    assert load_fresh_profile(store) == profile


def test_load_uses_the_saved_plan_for_its_budget(profiled):
    store, profile, _ = profiled
    budget = profile.runtime_bytes + (64 << 20)
    prediction = choose_plan(profile, budget, Workload(32))
    save_plan(store, prediction, Workload(32), profile)
    assert saved_plan(store, budget) == prediction.plan
    with hermesd.load(store, memory_budget=budget) as engine:
        assert engine.plan == prediction.plan
    with hermesd.load(store, prefetch=3) as engine:
        assert engine.plan.prefetch == 3 and engine.plan.budget is None, "explicit settings bypass saved plans"


def test_plan_command_explains_and_refuses_too_small_budgets(profiled):
    store, profile, _ = profiled
    run = [sys.executable, "-m", "hermesd.cli", "plan", str(store), "--json", "--explain"]
    done = subprocess.run(run + ["--memory-budget", str(profile.runtime_bytes + (200 << 20)), "--workload", "32:4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["predicted_peak_bytes"] <= report["plan"]["budget"]
    assert any(line.startswith("bound:") for line in report["explanation"])
    assert any("at double the budget" in line for line in report["explanation"])
    small = subprocess.run(run + ["--memory-budget", "1MiB"], capture_output=True, text=True, timeout=300)
    assert small.returncode == 1 and "below the minimum" in small.stderr


def test_a_profile_measured_beside_other_work_says_so(converted, tmp_path):
    # two busy processes while a small store is profiled: their CPU time is in /proc/stat, not ours
    import shutil

    from hermesd.profiling import BUSY_NOTE, OthersCpu

    store = tmp_path / "gpt2"
    shutil.copytree(converted("gpt2").store, store)
    spin = "import time\nend = time.time() + 60\nwhile time.time() < end: pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        watch = OthersCpu()
        profile = profile_store(store)
        assert watch.share() > 0.3
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert any(note.startswith(BUSY_NOTE) for note in profile.notes), profile.notes


def test_an_image_models_profile_counts_patch_tokens(converted, store_copy):
    """The planner's unit for images is patches plus the class token per image (``hermesd plan
    --workload``); the profile must count its reference pass in that unit, or a plan's compute is scaled
    by the wrong ratio (ViT-large: 14.3 s predicted for a 4.4 s forward)."""
    store = store_copy(converted("vit").store)
    profile = profile_store(store, reference_tokens=128)  # two 32-pixel images of 8-pixel patches
    per_image = (32 // 8) ** 2 + 1
    assert profile.reference_tokens == 2 * per_image
    two_images = choose_plan(profile, None, Workload(prompt_tokens=per_image, batch=2), depths=range(0, 1))
    measured = sum(s.compute_prompt_s for s in profile.stages)
    assert two_images.compute_s == pytest.approx(measured), "the reference pass predicts itself"
