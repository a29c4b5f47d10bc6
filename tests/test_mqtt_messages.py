"""The bridge's pure parts: topics, payload decoding, request keys and its settings (no broker needed)."""

from __future__ import annotations

import json

import msgpack
import pytest

from hermesd.mqtt.ledger import Ledger
from hermesd.mqtt.messages import JSON, MSGPACK, BadMessage, Reply, answer, parse_job, payload_format
from hermesd.mqtt.settings import ConfigError, load_bridge_settings
from hermesd.mqtt.topics import JobTopic, Topics, valid_reply_topic

TOPICS = Topics("hermes", "n1", "g")


def _reply(topic="r/1", correlation=b"c1", fmt=JSON):
    return Reply(topic=topic, correlation=correlation, fmt=fmt, request_id=None)


def test_topics_name_and_parse_direct_and_group_jobs():
    assert TOPICS.parse("hermes/n1/jobs/minilm/embed") == JobTopic("minilm", "embed", shared=False)
    assert TOPICS.parse("hermes/jobs/minilm/embed") == JobTopic("minilm", "embed", shared=True)
    assert TOPICS.parse("hermes/n2/jobs/minilm/embed") is None and TOPICS.parse("hermes/n1/status") is None
    assert TOPICS.shared_filters(["a", "b"]) == ["$share/g/hermes/jobs/a/+", "$share/g/hermes/jobs/b/+"]
    assert Topics("hermes", "n1", None).shared_filters(["a"]) == []
    assert not valid_reply_topic("a/+/b") and not valid_reply_topic("$SYS/x") and valid_reply_topic("a/b")


def test_key_is_stable_per_requester_and_request():
    where = JobTopic("m", "embed", False)
    key = parse_job(where, b'{"inputs": "x"}', JSON, _reply()).key()
    assert key == parse_job(where, b'{"inputs": "other"}', JSON, _reply()).key()  # a redelivery: same key
    assert key != parse_job(where, b'{"inputs": "x"}', JSON, _reply(topic="r/2")).key()  # another requester
    assert key != parse_job(where, b'{"inputs": "x"}', JSON, _reply(correlation=b"c2")).key()
    by_id = parse_job(where, b'{"inputs": "x", "id": "a1"}', JSON, _reply(topic=None, correlation=None))
    assert by_id.key().startswith("mqtt-") and len(by_id.key()) <= 128 and by_id.reply.request_id == "a1"
    assert parse_job(where, b'{"inputs": "x"}', JSON, _reply(topic=None, correlation=None)).key() is None


@pytest.mark.parametrize("payload, code", [
    (b'{"inputs": ', "bad_request"), (b"[1, 2]", "bad_request"), (b'{"text": "x"}', "bad_request"),
    (b'{"inputs": "x", "params": 3}', "bad_request"), (b'{"inputs": "x", "id": "a/b"}', "bad_request"),
    (b'{"inputs": "x", "reply_to": "a/#"}', "bad_request"), (b"\xff\xfe", "bad_request"),
    (b'{"inputs": "' + b"x" * (1 << 20) + b'"}', "too_large")])
def test_bad_payloads_are_refused_with_stable_codes(payload, code):
    with pytest.raises(BadMessage) as refused:
        parse_job(JobTopic("m", "embed", False), payload, payload_format(payload, None), _reply())
    assert refused.value.code == code


def test_msgpack_in_msgpack_out_and_reply_to_for_mqtt311_clients():
    packed = msgpack.packb({"inputs": ["a"], "reply_to": "old/client", "priority": 3})
    assert payload_format(packed, None) == MSGPACK and payload_format(b'{"a": 1}', None) == JSON
    reply = _reply(topic=None, fmt=MSGPACK)
    job = parse_job(JobTopic("m", "embed", True), packed, MSGPACK, reply)
    assert job.reply.topic == "old/client" and job.submit["priority"] == 3 and job.shared
    body = msgpack.unpackb(answer("n1", job, job.reply, "j-1", "done", result={"embeddings": [[0.5]]}))
    assert body == {"id": None, "job_id": "j-1", "node": "n1", "status": "done", "model": "m", "task": "embed",
                    "result": {"embeddings": [[0.5]]}}
    failed = json.loads(answer("n1", None, _reply(), None, "failed", code="bad_request", message="no"))
    assert failed["error"] == {"code": "bad_request", "message": "no"} and failed["model"] is None


def test_ledger_remembers_open_and_answered_requests_across_reopening(tmp_path):
    job = parse_job(JobTopic("m", "embed", True), b'{"inputs": "x", "id": "k"}', JSON, _reply())
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.record("k1", "j-1", job)
    ledger.answered("k2")
    ledger.close()
    ledger = Ledger(tmp_path / "l.sqlite")
    assert (ledger.state("k1"), ledger.state("k2"), ledger.state("k3")) == ("open", "answered", None)
    [(key, job_id, again)] = ledger.open_requests()
    assert (key, job_id, again.submit, again.reply) == ("k1", "j-1", job.submit, job.reply)
    assert (tmp_path / "l.sqlite").stat().st_mode & 0o077 == 0
    ledger.answered("k1")
    assert ledger.open_requests() == [] and ledger.prune(-1) == 2


def test_settings_file_env_and_refusals(tmp_path, monkeypatch):
    config = tmp_path / "mqtt.toml"
    config.write_text('node = "kitchen"\ngroup = ""\ntls = true\nca_file = "ca.pem"\npassword_file = "pw"\n'
                      'username = "u"\n')
    (tmp_path / "pw").write_text("secret\n")
    monkeypatch.setenv("HERMESD_MQTT_PORT", "8883")
    settings = load_bridge_settings(config)
    assert (settings.node, settings.group, settings.port) == ("kitchen", None, 8883)
    assert settings.ca_file == tmp_path / "ca.pem" and settings.resolved_password() == "secret"
    assert settings.resolved_client_id() == "hermesd-kitchen"
    for bad, words in [('node = "a/b"', "node"), ('password = "x"\npassword_file = "y"', "not both"),
                       ('cert_file = "c"', "key_file"), ('ca_file = "c"', "tls = true"), ('tasks = ["x"]', "tasks"),
                       ('colour = "red"', "colour"), ("port = ", "line")]:
        config.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=words):
            load_bridge_settings(config)
    with pytest.raises(ConfigError, match="not found"):
        load_bridge_settings(tmp_path / "missing.toml")


def test_the_bridge_never_imports_torch():
    import subprocess
    import sys

    probe = "import sys, hermesd.cli, hermesd.mqtt.bridge; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
