"""One bridge worker: take a job message, get it journaled by the daemon, acknowledge it, answer it.

Each worker owns one ``hermes_client.Client`` (ZeroMQ sockets are not shared between threads) and
blocks on the daemon, never on the MQTT network thread. The order of steps is what makes a crash safe:

    submit (the daemon journals it) -> ledger.record (synced) -> PUBACK to the broker
    -> wait for the daemon's final message -> publish the answer (QoS 1, PUBACK awaited) -> ledger.answered
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

from hermes_client import Client
from hermes_client.errors import DaemonUnreachable, JobCancelled, ServerError, TryLater
from hermes_client.protocol import ErrorCode

from hermesd.mqtt import connection
from hermesd.mqtt.messages import BadMessage, JobRequest, Reply, answer, parse_job, payload_format

log = logging.getLogger("hermesd.mqtt")
RESULT_POLL_S = 2.0   # how long one wait on the daemon lasts before the stop flag is looked at again


class Stopping(Exception):
    """The bridge is stopping: leave the job as it is (unacknowledged, or open in the ledger)."""


class Worker:
    """Runs jobs for a Bridge (``bridge`` gives settings, topics, ledger, the MQTT client and the stop flag)."""

    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge
        self.settings = bridge.settings
        self.client = Client(self.settings.endpoint, timeout=self.settings.daemon_timeout_s, retries=2)

    def close(self) -> None:
        self.client.close()

    # -- entry points --------------------------------------------------------------------------
    def handle_message(self, message: Any) -> None:
        """A job message from the broker: refuse it with an answer, or run it."""
        bridge = self.bridge
        fmt = payload_format(message.payload, connection.content_type(message))
        reply = connection.incoming_reply(message, fmt)
        try:
            job = self._parse(message, fmt, reply)
        except BadMessage as exc:
            log.info("refused a message on %s: %s: %s", message.topic, exc.code, exc.message)
            if self._publish_answer(None, reply, None, "failed", code=exc.code, message=exc.message):
                bridge.ack(message)
            return
        key = job.key() or bridge.key_for_unnamed(message)
        self.run(key, job, ack=lambda: bridge.ack(message))

    def resume(self, key: str, job: JobRequest) -> None:
        """A job acknowledged by an earlier run of the bridge and not answered: wait for it and answer."""
        log.debug("resuming %s", key)
        self.run(key, job, ack=lambda: None)

    # -- steps ---------------------------------------------------------------------------------
    def _parse(self, message: Any, fmt: str, reply: Reply) -> JobRequest:
        where = self.bridge.topics.parse(message.topic)
        if where is None:
            raise BadMessage(ErrorCode.BAD_REQUEST, f"{message.topic!r} is not a job topic")
        if where.model not in self.bridge.served:
            raise BadMessage(ErrorCode.UNKNOWN_MODEL, f"model {where.model!r} is not served by node "
                                                      f"{self.settings.node}; it serves {self.bridge.served}")
        if where.task not in self.settings.tasks:
            raise BadMessage(ErrorCode.UNKNOWN_TASK, f"task {where.task!r}: this node takes {self.settings.tasks}")
        job = parse_job(where, message.payload, fmt, reply)
        expiry = connection.expiry_left(message)
        if job.submit["deadline_s"] is None and expiry:
            job.submit["deadline_s"] = float(expiry)  # the sender's message expiry bounds the job too
        return job

    def run(self, key: str, job: JobRequest, ack: Callable[[], None]) -> None:
        """Submit (idempotent by ``key``), acknowledge once journaled, wait, answer; each request once."""
        ledger, bridge = self.bridge.ledger, self.bridge
        if not bridge.claim(key):
            # The same request is being handled by another worker (a redelivery, or the resumed copy):
            # acknowledge once that one has recorded it, so the broker's copy is not acked before the journal.
            while ledger.state(key) is None and bridge.is_claimed(key) and not bridge.stop.is_set():
                bridge.stop.wait(0.05)
            if ledger.state(key) is not None:
                ack()
            return
        try:
            if ledger.state(key) == "answered":
                log.debug("%s was answered already", key)
                ack()  # a duplicate of a request already answered
                return
            handle = self._submit(key, job)
            if handle is None:  # refused by the daemon: the error was answered
                ledger.answered(key)
                ack()
                return
            ledger.record(key, handle.id, job)
            ack()
            log.debug("accepted %s as job %s", key, handle.id)
            if self._wait_and_answer(handle, key, job):
                ledger.answered(key)
                log.debug("answered %s (job %s)", key, handle.id)
        except Stopping:
            pass
        finally:
            bridge.release(key)

    def _submit(self, key: str, job: JobRequest) -> Any:
        """The daemon's Job handle, or None when it refused the job (answered here). Retries while it
        is busy, too hot or unreachable; the shared subscription pauses meanwhile."""
        delay = self.settings.reconnect_min_s
        while not self.bridge.stop.is_set():
            try:
                return self.client.submit(**_submit_args(job.submit), client_job_id=key)
            except TryLater as exc:
                log.info("daemon says %s; pausing the group subscription for %g s", exc.code, self.settings.pause_s)
                self.bridge.pause()
                self.bridge.stop.wait(self.settings.pause_s)
            except DaemonUnreachable:
                log.warning("daemon unreachable at %s; retrying in %g s", self.client.endpoint, delay)
                self.bridge.stop.wait(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
            except ServerError as exc:
                if not self._publish_answer(job, job.reply, exc.job_id, "failed", code=exc.code, message=exc.message):
                    raise Stopping from None
                return None
        raise Stopping

    def _wait_and_answer(self, handle: Any, key: str, job: JobRequest) -> bool:
        """Wait for the job's end and publish it; False if the bridge stopped first."""
        deadline = time.monotonic() + self.settings.job_timeout_s
        while not self.bridge.stop.is_set():
            try:
                result = handle.result(timeout=RESULT_POLL_S)
            except TimeoutError:
                if time.monotonic() < deadline:
                    continue
                return self._publish_answer(job, job.reply, handle.id, "failed", code=ErrorCode.DEADLINE_EXCEEDED.value,
                                            message=f"no result within job_timeout_s ({self.settings.job_timeout_s:g} s)")
            except JobCancelled:
                return self._publish_answer(job, job.reply, handle.id, "cancelled")
            except DaemonUnreachable:
                self.bridge.stop.wait(self.settings.reconnect_min_s)  # a restarting daemon re-runs it from its journal
                continue
            except ServerError as exc:
                return self._publish_answer(job, job.reply, handle.id, "failed", code=exc.code, message=exc.message)
            return self._publish_answer(job, job.reply, handle.id, "done", result=result)
        raise Stopping

    def _publish_answer(self, job: JobRequest | None, reply: Reply, job_id: str | None, status: str,
                        **fields: Any) -> bool:
        topics = self.bridge.topics
        topic = reply.topic or (topics.result(reply.request_id or job_id) if (reply.request_id or job_id)
                                else topics.errors)
        payload = answer(self.settings.node, job, reply, job_id, status, **fields)
        properties = connection.reply_properties(reply, self.settings.result_expiry_s)
        return connection.publish(self.bridge.mqtt, topic, payload, properties, stop=self.bridge.stop)


def _submit_args(submit: dict[str, Any]) -> dict[str, Any]:
    args = dict(submit)
    if args.get("deadline_s") is None:
        args.pop("deadline_s", None)
    return args


def new_key() -> str:
    """A client_job_id for a request that named itself in no way (see JobRequest.key)."""
    return f"mqtt-{uuid.uuid4().hex}"
