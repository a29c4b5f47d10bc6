"""Two hermesd nodes (two daemons, two bridges) sharing one stream of jobs through an MQTT 5 shared
subscription on a real Mosquitto broker; one node is killed with SIGKILL mid-run and restarted."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter

import pytest
from daemon_support import start_daemon, write_config
from mqtt_support import (
    Broker,
    Listener,
    require_mosquitto,
    start_bridge,
    status_is,
    write_bridge_config,
)

pytestmark = pytest.mark.slow

# The issue asks for 200 jobs from 4 publishers; on the shared 2-core test machine one MiniLM job takes
# 0.2-1 s under load, so 4 x 25 keeps this test near a minute. bench/mqtt.py runs larger counts.
PUBLISHERS, JOBS_EACH = 4, 25
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two daemons on two cores: one torch thread each, not four fighting
READY_S = 180


@pytest.fixture(scope="module")
def cluster(minilm, tmp_path_factory):
    require_mosquitto()
    root = tmp_path_factory.mktemp("mqtt-cluster")
    broker = Broker(root / "broker")
    for name in "ab":
        write_config(root / f"daemon-{name}", {"minilm": {"store": minilm[1], "resident": "all"}})
    daemons = {name: start_daemon(root / f"daemon-{name}", env=ONE_THREAD, wait_ready=False) for name in "ab"}
    for daemon in daemons.values():
        daemon.notify.wait_for(lambda m: m.get("READY") == "1", READY_S)
    configs = {name: write_bridge_config(root / f"bridge-{name}", broker, daemons[name].endpoint, name, group="g",
                                         max_inflight=4) for name in "ab"}
    listener = Listener(broker, "hermes/+/status", "answers/#")
    bridges = {name: start_bridge(config) for name, config in configs.items()}
    for name in "ab":
        listener.wait_for(status_is(name, b"online"), 60)
    yield broker, daemons, configs, bridges, listener
    listener.close()
    for bridge in bridges.values():
        bridge.stop()
    for daemon in daemons.values():
        daemon.stop()
    broker.stop()


def _publish_all(broker) -> list[subprocess.Popen]:
    """Four mosquitto_pub processes, each sending its jobs as lines (-l) with one response topic."""
    procs = []
    for p in range(PUBLISHERS):
        proc = subprocess.Popen(["mosquitto_pub", "-p", str(broker.port), "-V", "mqttv5", "-q", "1",
                                 "-t", "hermes/jobs/minilm/embed", "-D", "PUBLISH", "response-topic", f"answers/{p}",
                                 "-l"], stdin=subprocess.PIPE, text=True)
        lines = "".join(json.dumps({"inputs": f"reading {i} from sensor {p}", "id": f"{p}-{i}"}) + "\n"
                        for i in range(JOBS_EACH))
        proc.stdin.write(lines)
        proc.stdin.close()
        procs.append(proc)
    return procs


def test_shared_jobs_answered_exactly_once_across_a_node_killed_mid_run(cluster):
    broker, daemons, configs, bridges, listener = cluster
    total = PUBLISHERS * JOBS_EACH
    is_answer = lambda m: m.topic.startswith("answers/")  # noqa: E731
    started = time.monotonic()
    for proc in _publish_all(broker):
        assert proc.wait(30) == 0
    listener.wait_for(lambda m: is_answer(m) and json.loads(m.payload)["node"] == "b", 120, count=3)

    # Node b dies at once, bridge and daemon, with jobs acknowledged, running and still queued for it.
    bridges["b"].proc.send_signal(signal.SIGKILL)
    daemons["b"].proc.send_signal(signal.SIGKILL)
    bridges["b"].proc.wait(10)
    daemons["b"].proc.wait(10)
    listener.wait_for(status_is("b", b"offline"), 30)  # its last will
    answered_at_kill = len([m for m in listener.messages if is_answer(m)])
    daemons["b"] = start_daemon(daemons["b"].root, env=ONE_THREAD)
    bridges["b"] = start_bridge(configs["b"])

    answers = listener.wait_for(is_answer, 240, count=total)
    elapsed = time.monotonic() - started
    time.sleep(3)  # anything answered twice would arrive by now
    answers = [json.loads(m.payload) | {"topic": m.topic} for m in listener.messages if is_answer(m)]
    counts = Counter((a["topic"], a["id"]) for a in answers)
    expected = {(f"answers/{p}", f"{p}-{i}") for p in range(PUBLISHERS) for i in range(JOBS_EACH)}
    assert set(counts) == expected and max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    assert all(a["status"] == "done" and len(a["result"]["embeddings"][0]) == 384 for a in answers)
    by_node = Counter(a["node"] for a in answers)
    assert by_node["a"] > 0 and by_node["b"] > 0, by_node
    assert answered_at_kill < total, "the kill came after the run"
    print(f"{total} jobs in {elapsed:.1f} s through a kill of node b; served: {dict(by_node)}")
