"""Watchdogs in a real daemon: a thermal source the test writes, memory thresholds that shed the resident set.

The real-cgroup memory scenario is in test_memory_watchdog_cgroup.py (slow).
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from daemon_support import start_daemon, write_config
from hermes_client import ErrorCode, TryLater

import hermesd
from hermesd import memory
from hermesd.store.convert import convert, open_source
from hermesd.watchdog.sensors import read_temperature

PROMPT = "w5 w17 w230 w42"


def _wait_status(client, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate(status := client.status()):
        assert time.monotonic() < deadline, status["watchdogs"]
        time.sleep(0.2)
    return status


def test_thermal_soft_hard_critical(daemon_stores, tmp_path):
    sensor = tmp_path / "temp"
    sensor.write_text("45000\n")  # sysfs style: millidegrees
    write_config(tmp_path, {"llama": {"store": daemon_stores["llama"], "prefetch": 2}},
                 thermal={"paths": [str(sensor)], "soft_c": 75.0, "hard_c": 82.0, "critical_c": 90.0,
                          "hysteresis_c": 5.0},
                 memory={"enabled": False})
    daemon = start_daemon(tmp_path)
    client = daemon.client()
    normal = client.generate("llama", PROMPT, max_new_tokens=8)
    assert normal["stats"]["prefetch_paused_stages"] == 0

    sensor.write_text("78000\n")  # soft: prefetch pauses, stages load on demand
    status = _wait_status(client, lambda s: s["watchdogs"]["actions"]["prefetch_paused"])
    assert status["watchdogs"]["thermal"] == {"level": "soft", "reading": {"celsius": 78.0, "source": str(sensor)}}
    daemon.notify.wait_for(lambda m: "prefetch paused" in m.get("STATUS", ""), 10)
    soft = client.generate("llama", PROMPT, max_new_tokens=8)
    assert soft["text"] == normal["text"]  # identical output, only slower
    assert soft["stats"]["prefetch_paused_stages"] == soft["stats"]["stages_run"] > 0
    assert soft["stats"]["on_demand_loads"] > normal["stats"]["on_demand_loads"]

    sensor.write_text("85000\n")  # hard: execution holds between stages
    _wait_status(client, lambda s: s["watchdogs"]["actions"]["execution_held"])
    job = client.submit("generate", "llama", PROMPT, {"max_new_tokens": 8}, progress=True)
    time.sleep(2.0)
    held = client.job(job.id)
    assert held["state"] == "running" and held["result"] is None
    sensor.write_text("60000\n")  # cooled: the job continues where it stood
    resumed = job.result(60)
    assert resumed["text"] == normal["text"] and resumed["stats"]["paused_s"] >= 1.5

    sensor.write_text("95000\n")  # critical: new jobs are refused
    _wait_status(client, lambda s: s["watchdogs"]["actions"]["refusing"] == "overheated")
    with pytest.raises(TryLater) as info:
        client.generate("llama", PROMPT, max_new_tokens=2)
    assert info.value.code == ErrorCode.OVERHEATED.value and "95.0 C" in info.value.message
    sensor.write_text("50000\n")
    _wait_status(client, lambda s: s["watchdogs"]["thermal"]["level"] == "normal")
    assert client.generate("llama", PROMPT, max_new_tokens=8)["text"] == normal["text"]
    assert daemon.stop() == 0
    log = daemon.log()
    for transition in ("NORMAL -> SOFT", "SOFT -> HARD", "HARD -> NORMAL", "NORMAL -> CRITICAL", "CRITICAL -> NORMAL"):
        assert log.count(f"thermal {transition}") == 1, transition  # each change logged once


def test_memory_low_water_sheds_the_resident_set_and_recovery_restores_it(daemon_stores, tmp_path):
    model = {"store": daemon_stores["llama"], "resident": "all"}
    write_config(tmp_path, {"llama": model}, memory={"low_water": 0.001, "critical": 0.999, "recover": 0.0005},
                 thermal={"enabled": False})  # any use of this machine's memory counts as low water
    daemon = start_daemon(tmp_path)
    client = daemon.client()
    _wait_status(client, lambda s: s["watchdogs"]["memory"]["level"] == "low")
    shed = client.generate("llama", PROMPT, max_new_tokens=8)
    assert client.models()[0]["resident_now"] == []  # released (idle executor or this job's checkpoints)
    assert shed["stats"]["on_demand_loads"] > 0

    write_config(tmp_path, {"llama": model}, memory={"low_water": 0.99, "critical": 0.999, "recover": 0.98},
                 thermal={"enabled": False})
    daemon.send_signal(1)  # SIGHUP: thresholds far above use, so memory recovers
    _wait_status(client, lambda s: s["watchdogs"]["memory"]["level"] == "normal")
    deadline = time.monotonic() + 30
    while not client.models()[0]["resident_now"]:
        assert time.monotonic() < deadline, "resident set not restored"
        time.sleep(0.2)
    restored = client.generate("llama", PROMPT, max_new_tokens=8)
    assert restored["text"] == shed["text"] and restored["stats"]["on_demand_loads"] == 0
    assert daemon.stop() == 0


def test_engine_shed_and_restore_keep_output_and_release_memory(converted):
    model = converted("gpt2")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with hermesd.load(model.store, resident="all", prefetch=0) as engine:
        expected = engine.model(ids).logits
        assert len(engine.resident_now) == len(engine.manifest.stages)
        assert engine.shed_resident() == len(engine.manifest.stages) and engine.resident_now == []
        torch.testing.assert_close(engine.model(ids).logits, expected, rtol=0, atol=0)
        assert engine.stats.on_demand_loads == len(engine.manifest.stages)
        assert engine.restore_resident() == len(engine.manifest.stages)
        torch.testing.assert_close(engine.model(ids).logits, expected, rtol=0, atol=0)
        assert engine.stats.on_demand_loads == 0


def test_shedding_a_large_resident_set_returns_its_memory(tmp_path):
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 4, "n_embd": 1024,
              "n_head": 8, "vocab_size": 1000, "n_positions": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    store = tmp_path / "store"
    convert(open_source(None, random_config=tmp_path / "config.json"), store)
    with hermesd.load(store, resident="all", prefetch=0) as engine:
        engine.wait_resident()  # load() only maps them
        before = memory.rss_bytes()
        engine.shed_resident()
        released = before - memory.rss_bytes()
        assert released > 0.8 * sum(s.bytes for s in engine.manifest.stages)


def test_temperature_sources(tmp_path):
    hot, cold, junk = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    hot.write_text("71250\n"), cold.write_text("40.5\n"), junk.write_text("n/a\n")
    reading = read_temperature([hot, cold, junk], [])
    assert reading.celsius == pytest.approx(71.25) and reading.source == str(hot)
    assert read_temperature([junk, tmp_path / "missing"], []) is None  # configured paths only: no guessing
