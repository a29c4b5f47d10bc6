"""The hermesd command line, run as a real process: convert, info, run; JSON output; exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def hermesd(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hermesd.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_convert_then_info_then_run_forward(converted, tmp_path):
    source = converted("gpt2").hf_dir
    store = tmp_path / "store"
    done = hermesd("convert", str(source), str(store), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["stages"] == 7 and summary["peak_rss_bytes"] > 0
    assert "[7/7] lm_head" in done.stderr, "progress is shown per stage"

    again = hermesd("convert", str(source), str(store))
    assert again.returncode == 1 and "--force" in again.stderr

    info = json.loads(hermesd("info", str(store), "--json").stdout)
    assert [s["name"] for s in info["stages"]][:2] == ["transformer.wte", "transformer.wpe"]
    assert info["minimum_budget"] > 0


@pytest.mark.slow
def test_run_generate_human_and_json(smollm2):
    store = str(smollm2[1])
    human = hermesd("run", store, "--task", "generate", "--max-new-tokens", "12", "--prefetch", "1",
                    "What is the capital of France?")
    assert human.returncode == 0, human.stderr
    assert "Paris" in human.stdout and "peak RSS" in human.stderr and "load() " in human.stderr
    # --prefetch: streamed as told (with no budget at all the model would now simply be resident)
    machine = hermesd("run", store, "--task", "generate", "--json", "--timeline", "--max-new-tokens", "4",
                      "--prefetch", "2", "--input", "Hello")
    report = json.loads(machine.stdout)
    assert set(report) == {"task", "result", "stats", "plan", "load"}
    assert report["load"]["wall_s"] > 0 and report["load"]["ring_bytes"] >= report["plan"]["pool_bytes"] > 0
    assert report["stats"]["loaders"] == 1 and report["stats"]["prefetch"] == 2, "one loader, two ahead"
    assert report["stats"]["passes"] == report["result"]["new_tokens"]
    assert {event[1] for event in report["stats"]["timeline"]} == {"load", "compute"}


@pytest.mark.slow
def test_run_embed_json(minilm):
    done = hermesd("run", str(minilm[1]), "--task", "embed", "--normalize", "--json", "first text", "second text")
    vectors = json.loads(done.stdout)["result"]["embeddings"]
    assert len(vectors) == 2 and abs(sum(x * x for x in vectors[0]) - 1) < 1e-4


@pytest.mark.parametrize("args, message", [
    (["--memory-budget", "1MiB"], "below the minimum"),
    (["--memory-budget", "lots"], "not a size"),
    (["--resident", "no.such.stage"], "unknown stage"),
])
def test_run_errors_exit_1_with_one_clear_line(converted, args, message):
    done = hermesd("run", str(converted("gpt2").store), "--task", "forward", "x", *args)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr


def test_missing_store_and_usage_errors(tmp_path):
    missing = hermesd("run", str(tmp_path), "--task", "embed", "hi")
    assert missing.returncode == 1 and "not a hermesd store" in missing.stderr
    assert hermesd("run", str(tmp_path), "--task", "dance", "hi").returncode == 2
    assert hermesd("convert", str(tmp_path)).returncode == 1
