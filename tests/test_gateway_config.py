"""The gateway's settings, its exposure rule and the Prometheus rendering of a status reply (no daemon)."""

from __future__ import annotations

from pathlib import Path

import hermes_client
import pytest
from hermes_client.metrics import prometheus_text
from prometheus_client.parser import text_string_to_metric_families

import hermesd
from hermesd.gateway.config import GatewayConfigError, is_loopback, load_gateway_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "hermesd-gateway.toml"


def test_the_documented_example_is_the_defaults(monkeypatch):
    monkeypatch.delenv("HERMES_ENDPOINT", raising=False)
    settings = load_gateway_settings(EXAMPLE)
    assert (settings.host, settings.port, settings.bearer_token()) == ("127.0.0.1", 11434, None)
    assert settings.daemon_endpoint() == "ipc:///run/hermesd/hermesd.sock"
    settings.check_exposure()  # loopback without a token is fine


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("192.168.1.5", False), ("::", False), ("myhost", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_a_remote_address_needs_a_token_or_an_explicit_yes(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text('host = "0.0.0.0"\n')
    with pytest.raises(GatewayConfigError, match="token"):
        load_gateway_settings(config).check_exposure()
    (tmp_path / "token").write_text("0123456789abcdef0123\n")
    config.write_text('host = "0.0.0.0"\ntoken_file = "token"\n')
    settings = load_gateway_settings(config)
    settings.check_exposure()
    assert settings.bearer_token() == "0123456789abcdef0123"
    config.write_text('host = "0.0.0.0"\nallow_unauthenticated_remote = true\n')
    load_gateway_settings(config).check_exposure()
    config.write_text('token = "short"\n')
    with pytest.raises(GatewayConfigError, match="token"):
        load_gateway_settings(config)


def test_prometheus_text_of_a_status_reply_parses():
    status = {"state": "ready", "version": "0.1.0", "uptime_s": 12.5, "queued": 2, "current_job": None,
              "jobs": {"done": 3}, "memory": {"rss_bytes": 100, "peak_rss_bytes": 200},
              "executor": {"healthy": True},
              "watchdogs": {"thermal": {"level": "soft", "reading": {"celsius": 76.5, "source": 'zone "x"'}},
                            "memory": {"level": "normal", "reading": {"used_bytes": 5, "limit_bytes": 10,
                                                                      "source": "cgroup", "psi_some_avg10": 0.0}},
                            "actions": {"prefetch_paused": True}, "transitions": 4},
              "counters": {"jobs": [{"task": "embed", "model": "m", "outcome": "done", "count": 3}],
                           "latency_buckets_s": [0.1, 1.0], "latency": {"embed": {"counts": [1, 3], "sum": 0.9,
                                                                                   "count": 3}},
                           "models": {"m": {"tokens_generated": 0, "bytes_read": 7, "wait_s": 0.1,
                                            "compute_s": 0.2, "paused_s": 0.0}}}}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(prometheus_text(status)) for s in family.samples}
    assert samples[("hermesd_watchdog_level", (("watchdog", "thermal"),))] == 1
    assert samples[("hermesd_temperature_celsius", (("source", 'zone "x"'),))] == 76.5
    assert samples[("hermesd_job_latency_seconds_bucket", (("le", "+Inf"), ("task", "embed")))] == 3
    assert samples[("hermesd_jobs_total", (("model", "m"), ("outcome", "done"), ("task", "embed")))] == 3
    assert samples[("hermesd_watchdog_transitions_total", ())] == 4
    assert samples[("hermesd_memory_limit_bytes", (("source", "cgroup"),))] == 10


def test_the_daemon_and_its_client_share_one_version():
    assert hermesd.__version__ == hermes_client.__version__
