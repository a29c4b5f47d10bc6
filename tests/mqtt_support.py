"""Helpers for tests of ``hermesd mqtt`` against a real Mosquitto broker the tests start themselves.

The broker runs as a subprocess on a free local port with its own config and persistence directory;
bridges run as ``hermesd mqtt`` subprocesses; results are read with Mosquitto's own clients
(mosquitto_sub -F %j) or a paho listener.
"""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from daemon_support import CHILD_PATH, STARTED, toml_dumps

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
CLIENTS = shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")


def require_mosquitto() -> None:
    """Skip, with the reason, where the broker or its clients are not installed."""
    if not MOSQUITTO or not CLIENTS:
        pytest.skip("mosquitto or mosquitto-clients not installed (apt-get install mosquitto mosquitto-clients; "
                    ".ci/run installs them where it can)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Broker:
    """A Mosquitto process on 127.0.0.1:port; persistence on, so sessions and retained messages outlive a restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.conf = root / "mosquitto.conf"
        # user: started as root, mosquitto would switch to its own user, who cannot write the test's directory.
        self.conf.write_text(f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             "persistence true\n"
                             f"persistence_location {root}/\nautosave_interval 1\nlog_dest file {root}/broker.log\n"
                             "max_queued_messages 10000\nset_tcp_nodelay true\n")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        STARTED.append(self.proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def write_bridge_config(root: Path, broker: Broker, endpoint: str, node: str, **settings: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = {"host": "127.0.0.1", "port": broker.port, "node": node, "endpoint": endpoint,
              "state_dir": str(root / "state"), "reconnect_min_s": 1.0, "reconnect_max_s": 2.0,
              "log_level": "debug", **settings}
    path = root / "mqtt.toml"
    path.write_text(toml_dumps(config), encoding="utf-8")
    return path


@dataclass
class BridgeProcess:
    proc: subprocess.Popen
    config: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def start_bridge(config: Path) -> BridgeProcess:
    """``hermesd mqtt --config CONFIG`` as a subprocess (this checkout's code), logging beside its config."""
    log_path = config.with_suffix(".log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hermesd.cli", "mqtt", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={"PYTHONPATH": CHILD_PATH, "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"})
    STARTED.append(proc)
    return BridgeProcess(proc, config, log_path)


class Listener:
    """A paho subscriber in the test process that keeps every message it gets (topic, payload, properties)."""

    def __init__(self, broker: Broker, *topics: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[Any] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.on_message = lambda _c, _u, message: self._keep(message)
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.on_connect = lambda client, *_: client.subscribe([(t, 1) for t in topics])
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()
        assert subscribed.wait(10), "listener never subscribed"

    def _keep(self, message: Any) -> None:
        with self._lock:
            self.messages.append(message)

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float, count: int = 1) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [m for m in self.messages if predicate(m)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} expected messages in {timeout} s")
            time.sleep(0.05)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def status_is(node: str, value: bytes) -> Callable[[Any], bool]:
    return lambda m: m.topic == f"hermes/{node}/status" and m.payload == value


def mosquitto_pub(broker: Broker, topic: str, *args: str, message: str | None = None) -> None:
    """Publish one QoS 1 MQTT 5 message with Mosquitto's own client (``args``: -D PUBLISH ... properties)."""
    payload = ["-m", message] if message is not None else []
    subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-V", "mqttv5", "-q", "1", "-t", topic, *args,
                    *payload], check=True, timeout=30)


def mosquitto_sub(broker: Broker, topic: str, count: int = 1, timeout: int = 180) -> subprocess.Popen:
    """A running ``mosquitto_sub -F %j`` for ``count`` messages; read them with ``sub_messages``."""
    proc = subprocess.Popen(["mosquitto_sub", "-p", str(broker.port), "-V", "mqttv5", "-q", "1", "-t", topic,
                             "-C", str(count), "-W", str(timeout), "-F", "%j"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)  # its SUBSCRIBE reaches the broker before the test publishes
    return proc


def sub_messages(proc: subprocess.Popen, timeout: float = 180) -> list[dict[str, Any]]:
    """mosquitto_sub's JSON lines, each with its payload decoded from JSON as "body"."""
    out, _ = proc.communicate(timeout=timeout)
    messages = [json.loads(line) for line in out.splitlines() if line.strip()]
    for message in messages:
        payload = message.get("payload")
        message["body"] = json.loads(payload) if isinstance(payload, str) else payload
    return messages
