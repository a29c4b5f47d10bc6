"""``hermesd mqtt``: the bridge's lifecycle, its MQTT callbacks and the pause of the group subscription.

Threads: paho's network thread runs the callbacks (they only queue work and never block); ``max_inflight``
workers (worker.py) talk to the daemon; the main thread ticks (resubscribe after a pause, prune the
ledger) until SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from typing import Any

from hermes_client import Client
from hermes_client.errors import HermesClientError

from hermesd.mqtt import connection
from hermesd.mqtt.ledger import Ledger
from hermesd.mqtt.settings import BridgeSettings
from hermesd.mqtt.topics import Topics
from hermesd.mqtt.worker import Worker, new_key

log = logging.getLogger("hermesd.mqtt")
TICK_S = 0.25
PRUNE_EVERY_S = 3600.0
KEEP_ANSWERED_S = 7 * 86_400.0   # a duplicate arriving later than this is run again


class Bridge:
    """One node's bridge between a broker and its local daemon."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.prefix, settings.node, settings.group)
        self.ledger = Ledger(settings.resolved_state_dir() / "mqtt-ledger.sqlite")
        self.mqtt = connection.make_client(settings, self.topics)
        self.stop = threading.Event()
        self.served: list[str] = []
        self._work: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._claimed: set[str] = set()
        self._unnamed: dict[int, str] = {}     # packet id -> key of a request that named itself in no way
        self._paused_until: float | None = None
        self._workers: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status (0)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())
        models = self._daemon_models()
        if models is None:
            return 0
        self.served = [m["name"] for m in models if self.settings.models is None or m["name"] in self.settings.models]
        self._models_payload = json.dumps({"node": self.settings.node, "group": self.settings.group,
                                           "tasks": self.settings.tasks,
                                           "models": [{"name": m["name"], "architecture": m.get("architecture")}
                                                      for m in models if m["name"] in self.served]}).encode()
        for key, _job_id, job in self.ledger.open_requests():
            self._work.put(("resume", key, job))
        self._start_workers()
        self.mqtt.on_connect, self.mqtt.on_message = self._on_connect, self._on_message
        self.mqtt.on_disconnect = self._on_disconnect
        self.mqtt.connect_async(self.settings.host, self.settings.port, self.settings.keepalive_s, clean_start=False,
                                properties=connection.connect_properties(self.settings))
        self.mqtt.loop_start()
        log.info("node %s serving %s from %s:%d", self.settings.node, self.served, self.settings.host,
                 self.settings.port)
        self._main_loop()
        self._shutdown()
        return 0

    def _daemon_models(self) -> list[dict[str, Any]] | None:
        """The daemon's models, waiting for the daemon to answer (None if stopped first)."""
        delay = self.settings.reconnect_min_s
        while not self.stop.is_set():
            try:
                with Client(self.settings.endpoint, timeout=self.settings.daemon_timeout_s, retries=0) as client:
                    return client.models()
            except HermesClientError as exc:
                log.warning("daemon not answering (%s); retrying in %g s", exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
        return None

    def _start_workers(self) -> None:
        for index in range(self.settings.max_inflight):
            thread = threading.Thread(target=self._work_loop, name=f"mqtt-worker-{index}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def _main_loop(self) -> None:
        next_prune = time.monotonic()
        while not self.stop.wait(TICK_S):
            self._maybe_resume()
            if time.monotonic() >= next_prune:
                self.ledger.prune(KEEP_ANSWERED_S)
                next_prune = time.monotonic() + PRUNE_EVERY_S

    def _shutdown(self) -> None:
        """Leave the group first (no more of its jobs queue for us), let workers put their jobs down,
        then say offline and disconnect. Unacknowledged jobs come back on the next start (persistent
        session); acknowledged ones are in the ledger."""
        log.info("stopping")
        with self._lock:
            self._unsubscribe_shared()
        for thread in self._workers:
            thread.join(timeout=self.settings.daemon_timeout_s * 3 + 5)
        if self.mqtt.is_connected():
            self.mqtt.publish(self.topics.status, connection.OFFLINE, qos=connection.QOS, retain=True).wait_for_publish(5)
        self.mqtt.disconnect()
        self.mqtt.loop_stop()
        self.ledger.close()

    def _work_loop(self) -> None:
        worker = Worker(self)
        try:
            while not self.stop.is_set():
                try:
                    item = self._work.get(timeout=TICK_S)
                except queue.Empty:
                    continue
                try:
                    if item[0] == "message":
                        worker.handle_message(item[1])
                    else:
                        worker.resume(item[1], item[2])
                except Exception:  # a bug must not take the worker (and its share of jobs) down
                    log.exception("unexpected error handling a job; the bridge keeps serving")
        finally:
            worker.close()

    # -- MQTT callbacks (paho's network thread: queue, never block) -----------------------------------
    def _on_connect(self, client: Any, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        log.info("connected to %s:%d (session present: %s)", self.settings.host, self.settings.port,
                 flags.session_present)
        connection.no_delay(client)
        client.publish(self.topics.status, connection.ONLINE, qos=connection.QOS, retain=True)
        client.publish(self.topics.models, self._models_payload, qos=connection.QOS, retain=True)
        client.subscribe(self.topics.direct_filter(), qos=connection.QOS)
        with self._lock:
            if self._paused_until is None:
                self._subscribe_shared()

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not self.stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self._work.put(("message", message))

    def ack(self, message: Any) -> None:
        """Acknowledge a job message to the broker (after it is journaled, or answered with a refusal)."""
        self.mqtt.ack(message.mid, message.qos)
        with self._lock:
            self._unnamed.pop(message.mid, None)

    # -- duplicates ----------------------------------------------------------------------------
    def key_for_unnamed(self, message: Any) -> str:
        """A key for a request without correlation data or id: the same for a redelivery of the same
        unacknowledged packet while this bridge lives, new otherwise."""
        with self._lock:
            if message.dup and message.mid in self._unnamed:
                return self._unnamed[message.mid]
            key = self._unnamed[message.mid] = new_key()
            return key

    def claim(self, key: str) -> bool:
        with self._lock:
            if key in self._claimed:
                return False
            self._claimed.add(key)
            return True

    def is_claimed(self, key: str) -> bool:
        with self._lock:
            return key in self._claimed

    def release(self, key: str) -> None:
        with self._lock:
            self._claimed.discard(key)

    # -- the group subscription ----------------------------------------------------------------
    def pause(self) -> None:
        """The daemon cannot take jobs now: leave the group for ``pause_s`` so other nodes get them."""
        with self._lock:
            if self._paused_until is None:
                self._unsubscribe_shared()
            self._paused_until = time.monotonic() + self.settings.pause_s

    def _maybe_resume(self) -> None:
        with self._lock:
            if self._paused_until is not None and time.monotonic() >= self._paused_until:
                self._paused_until = None
                if self.mqtt.is_connected():
                    self._subscribe_shared()
                log.info("taking group jobs again")

    def _subscribe_shared(self) -> None:
        filters = self.topics.shared_filters(self.served)
        if filters:
            self.mqtt.subscribe([(f, connection.QOS) for f in filters])

    def _unsubscribe_shared(self) -> None:
        filters = self.topics.shared_filters(self.served)
        if filters and self.mqtt.is_connected():
            self.mqtt.unsubscribe(filters)


def serve(settings: BridgeSettings) -> int:
    """Run a bridge with logging set up from the settings; the exit status."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return Bridge(settings).run()
