"""Two hermesd nodes (two daemons, two bridges) sharing one stream of jobs through an MQTT 5 shared
subscription on a real Mosquitto broker; one node is killed with SIGKILL mid-run and restarted, the
other has a queue too short for its bridge and steps out of the group while its daemon says busy."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter

import pytest
from daemon_support import start_daemon, write_config
from mqtt_support import Broker, Listener, require_mosquitto, start_bridge, status_is, write_bridge_config

pytestmark = pytest.mark.slow

# 200 jobs from 4 publishers, as the issue asks: 15-20 s of this test on the 2-core machine when it is
# quiet, up to two minutes when it is loaded (one MiniLM job then takes up to 1 s).
PUBLISHERS, JOBS_EACH = 4, 50
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two daemons on two cores: one torch thread each, not four fighting
READY_S = 180


@pytest.fixture(scope="module")
def cluster(minilm, tmp_path_factory):
    require_mosquitto()
    root = tmp_path_factory.mktemp("mqtt-cluster")
    broker = Broker(root / "broker")
    for name in "ab":  # node a's queue holds 2 jobs: its bridge (4 in flight) hears "busy" and steps aside
        write_config(root / f"daemon-{name}", {"minilm": {"store": minilm[1], "resident": "all"}},
                     queue_size=2 if name == "a" else 32)
    daemons = {name: start_daemon(root / f"daemon-{name}", env=ONE_THREAD, wait_ready=False) for name in "ab"}
    for daemon in daemons.values():
        daemon.notify.wait_for(lambda m: m.get("READY") == "1", READY_S)
    configs = {name: write_bridge_config(root / f"bridge-{name}", broker, daemons[name].endpoint, name, group="g",
                                         max_inflight=4, pause_s=1.0) for name in "ab"}
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
    time.sleep(0.25)  # not right on the heels of an answer, the one moment when a kill makes it answered twice

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
    expected = {(f"answers/{p}", f"{p}-{i}") for p in range(PUBLISHERS) for i in range(JOBS_EACH)}
    job_ids = {}
    for a in answers:
        job_ids.setdefault((a["topic"], a["id"]), set()).add((a["node"], a["job_id"]))
    assert set(job_ids) == expected  # none lost
    # Each request ran as one job on one node: no job was run twice, on either node or across them...
    assert all(len(ran) == 1 for ran in job_ids.values()), {k: v for k, v in job_ids.items() if len(v) > 1}
    done = sum(d.client().status()["jobs"].get("done", 0) for d in daemons.values())
    assert done == total, f"{done} jobs ran for {total} requests"
    # ...and each was answered once, except an answer whose bridge died between the broker's PUBACK for it
    # and marking it answered (docs/MQTT.md): its restart answers again, with the same job. Bounded by the
    # jobs in flight on the killed node.
    twice = Counter((a["topic"], a["id"]) for a in answers) - Counter(set(job_ids))
    assert len(answers) - total == sum(twice.values()) <= 4, twice
    assert all(a["status"] == "done" and len(a["result"]["embeddings"][0]) == 384 for a in answers)
    by_node = Counter(a["node"] for a in answers)
    assert by_node["a"] > 0 and by_node["b"] > 0, by_node
    assert answered_at_kill < total, "the kill came after the run"
    assert "daemon says busy; pausing the group subscription" in bridges["a"].log()
    print(f"{total} jobs in {elapsed:.1f} s through a kill of node b; served: {dict(by_node)}; "
          f"answered twice: {sum(twice.values())}")
