"""``hermesd mqtt`` with a real Mosquitto broker and a real daemon serving the bundled SmolLM2 and MiniLM.

Jobs are sent and answers read with Mosquitto's own clients (mosquitto_pub / mosquitto_sub, MQTT 5
properties on the command line), as a sensor or a home-automation hub would.
"""

from __future__ import annotations

import signal

import msgpack
import pytest
from daemon_support import start_daemon, write_config
from mqtt_support import (
    Broker,
    Listener,
    mosquitto_pub,
    mosquitto_sub,
    require_mosquitto,
    start_bridge,
    status_is,
    sub_messages,
    write_bridge_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(smollm2, minilm, tmp_path_factory):
    """A broker, a daemon with both real models, and a bridge for node "n1"."""
    require_mosquitto()
    root = tmp_path_factory.mktemp("mqtt-node")
    broker = Broker(root / "broker")
    write_config(root / "daemon", {"smollm2": {"store": smollm2[1], "max_new_tokens": 64},
                                   "minilm": {"store": minilm[1], "resident": "all"}})
    daemon = start_daemon(root / "daemon")
    listener = Listener(broker, "hermes/+/status")
    bridge = start_bridge(write_bridge_config(root / "bridge", broker, daemon.endpoint, "n1"))
    listener.wait_for(status_is("n1", b"online"), 60)
    yield broker, daemon, bridge
    listener.close()
    assert bridge.stop() == 0, bridge.log()
    assert daemon.stop() == 0
    broker.stop()


def _job(broker, topic, payload, response_topic, correlation):
    sub = mosquitto_sub(broker, response_topic)
    mosquitto_pub(broker, topic, "-D", "PUBLISH", "response-topic", response_topic,
                  "-D", "PUBLISH", "correlation-data", correlation, message=payload)
    [answer] = sub_messages(sub)
    return answer


def test_generate_from_mosquitto_pub_answers_paris(node):
    broker, _, _ = node
    answer = _job(broker, "hermes/n1/jobs/smollm2/generate",
                  '{"inputs": "What is the capital of France?", "params": {"max_new_tokens": 24}}', "sensor/7/answer",
                  "req-1")
    assert answer["properties"]["correlation-data"] == "req-1"
    assert answer["properties"]["content-type"] == "application/json"
    body = answer["body"]
    assert body["status"] == "done" and body["node"] == "n1" and body["job_id"].startswith("j-")
    assert "Paris" in body["result"]["text"]


def test_embed_through_the_group_topic(node):
    broker, _, _ = node
    body = _job(broker, "hermes/jobs/minilm/embed", '{"inputs": ["hello world", "good night"]}', "hub/emb",
                "e-1")["body"]
    assert body["status"] == "done" and body["model"] == "minilm"
    assert [len(v) for v in body["result"]["embeddings"]] == [384, 384]


def test_bad_payloads_get_stable_codes_and_the_bridge_keeps_serving(node):
    broker, _, bridge = node
    cases = [("hermes/n1/jobs/minilm/embed", '{"inputs": ', "bad_request"),
             ("hermes/n1/jobs/minilm/embed", '["not", "an", "object"]', "bad_request"),
             ("hermes/n1/jobs/minilm/embed", '{"text": "x"}', "bad_request"),
             ("hermes/n1/jobs/nosuch/embed", '{"inputs": "x"}', "unknown_model"),
             ("hermes/n1/jobs/minilm/dance", '{"inputs": "x"}', "unknown_task"),
             ("hermes/n1/jobs/minilm/embed", '{"inputs": "x", "params": {"pooling": "max"}}', "invalid_params")]
    for index, (topic, payload, code) in enumerate(cases):
        body = _job(broker, topic, payload, f"bad/{index}", f"b-{index}")["body"]
        assert body["status"] == "failed" and body["error"]["code"] == code, (payload, body)
        assert "Traceback" not in body["error"]["message"]
    assert bridge.proc.poll() is None
    assert _job(broker, "hermes/n1/jobs/minilm/embed", '{"inputs": "still here"}', "bad/ok", "ok")["body"]["status"] \
        == "done"


def test_msgpack_payload_is_answered_in_msgpack_and_a_duplicate_runs_once(node, tmp_path):
    broker, daemon, _ = node
    listener = Listener(broker, "pack/#")
    payload = tmp_path / "job.msgpack"
    payload.write_bytes(msgpack.packb({"inputs": "packed", "id": "m-1"}))
    done_before = daemon.client().status()["jobs"].get("done", 0)
    for _ in range(3):  # the same request (same reply topic and id) three times: one job, one answer
        mosquitto_pub(broker, "hermes/n1/jobs/minilm/embed", "-D", "PUBLISH", "response-topic", "pack/r", "-f",
                      str(payload))
    [answer] = listener.wait_for(lambda m: m.topic == "pack/r", 60)
    body = msgpack.unpackb(answer.payload)
    assert body["status"] == "done" and body["id"] == "m-1" and len(body["result"]["embeddings"][0]) == 384
    marker = _job(broker, "hermes/n1/jobs/minilm/embed", '{"inputs": "after"}', "pack/after", "x")  # all 3 handled
    assert marker["body"]["status"] == "done"
    assert len([m for m in listener.messages if m.topic == "pack/r"]) == 1
    assert daemon.client().status()["jobs"]["done"] == done_before + 2
    listener.close()


def test_broker_restart_reconnects_and_last_will_says_offline(node, tmp_path):
    _, daemon, _ = node
    broker = Broker(tmp_path / "broker2")
    watcher = Listener(broker, "hermes/n2/status")
    bridge = start_bridge(write_bridge_config(tmp_path / "bridge2", broker, daemon.endpoint, "n2", group="other"))
    watcher.wait_for(status_is("n2", b"online"), 60)
    watcher.close()
    broker.stop()
    broker.start()  # same port, same persistence: the bridge's backoff finds it again
    watcher = Listener(broker, "hermes/n2/status")
    watcher.wait_for(lambda m: status_is("n2", b"online")(m) and not m.retain, 30)  # said again, not the retained copy
    body = _job(broker, "hermes/n2/jobs/minilm/embed", '{"inputs": "after the restart"}', "r/2", "r-2")["body"]
    assert body["status"] == "done" and body["node"] == "n2"
    assert "session present: True" in bridge.log().split("disconnected", 1)[-1]
    bridge.proc.send_signal(signal.SIGKILL)
    bridge.proc.wait(10)
    watcher.wait_for(status_is("n2", b"offline"), 30)  # the broker's last will, not the bridge
    watcher.close()
    broker.stop()
