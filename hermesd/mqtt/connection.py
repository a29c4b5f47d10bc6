"""The broker connection: a paho-mqtt 2 client set up for the bridge (MQTT 5, QoS 1, manual acks).

paho-mqtt rather than aiomqtt: the bridge's work is blocking calls to the daemon (``hermes_client`` is a
synchronous ZeroMQ client), so threads suit it better than an event loop; paho's own network thread
reconnects with backoff, its ``manual_ack`` lets the bridge acknowledge a job only once it is journaled,
and aiomqtt is itself a wrapper over paho (asyncio on top, nothing more the bridge needs).
"""

from __future__ import annotations

import socket
import ssl
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hermesd.mqtt.messages import CONTENT_TYPES, Reply
from hermesd.mqtt.settings import BridgeSettings
from hermesd.mqtt.topics import Topics

QOS = 1
OFFLINE, ONLINE = b"offline", b"online"


def make_client(settings: BridgeSettings, topics: Topics) -> mqtt.Client:
    """A configured, not yet connected client: credentials, TLS, last will, reconnect backoff."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=settings.resolved_client_id(),
                         protocol=mqtt.MQTTv5, manual_ack=True)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.resolved_password())
    if settings.tls:
        client.tls_set(ca_certs=_str(settings.ca_file), certfile=_str(settings.cert_file),
                       keyfile=_str(settings.key_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    # The broker publishes this if the bridge vanishes without a DISCONNECT (crash, kill -9, lost link).
    client.will_set(topics.status, OFFLINE, qos=QOS, retain=True)
    client.reconnect_delay_set(min_delay=max(1, round(settings.reconnect_min_s)),
                               max_delay=max(1, round(settings.reconnect_max_s)))
    return client


def connect_properties(settings: BridgeSettings) -> Properties:
    """A persistent session (unacknowledged jobs survive a bridge restart) and a bounded in-flight window."""
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = settings.session_expiry_s
    # The broker sends at most this many unacknowledged jobs: jobs waiting here are jobs no other node gets.
    properties.ReceiveMaximum = settings.max_inflight
    return properties


def reply_properties(reply: Reply, expiry_s: int | None) -> Properties:
    """Correlation data echoed, the payload's content type, the request's user properties, an expiry."""
    properties = Properties(PacketTypes.PUBLISH)
    properties.ContentType = CONTENT_TYPES[reply.fmt]
    if reply.correlation is not None:
        properties.CorrelationData = reply.correlation
    if reply.user_properties:
        properties.UserProperty = list(reply.user_properties)
    if expiry_s is not None:
        properties.MessageExpiryInterval = expiry_s
    return properties


def publish(client: mqtt.Client, topic: str, payload: bytes, properties: Properties | None = None,
            retain: bool = False, stop: threading.Event | None = None, timeout_s: float = 5.0) -> bool:
    """Publish at QoS 1 and wait for the broker's PUBACK, retrying across reconnects until ``stop``.

    True once the broker has it; False if ``stop`` was set first (the caller keeps the job open so the
    next start answers it).
    """
    while stop is None or not stop.is_set():
        if client.is_connected():
            info = client.publish(topic, payload, qos=QOS, retain=retain, properties=properties)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError):
                pass  # not queued (connection lost meanwhile): try again
            if info.is_published():
                return True
        if stop is None:
            return False
        stop.wait(0.2)
    return False


def incoming_reply(message: mqtt.MQTTMessage, fmt: str) -> Reply:
    """The reply routing an MQTT 5 message carries: response topic, correlation data, user properties."""
    props = getattr(message, "properties", None)
    topic = getattr(props, "ResponseTopic", None) if props is not None else None
    correlation = getattr(props, "CorrelationData", None) if props is not None else None
    user = getattr(props, "UserProperty", None) if props is not None else None
    return Reply(topic=topic or None, correlation=bytes(correlation) if correlation is not None else None,
                 fmt=fmt, request_id=None, user_properties=[tuple(pair) for pair in user or []])


def content_type(message: mqtt.MQTTMessage) -> str | None:
    props = getattr(message, "properties", None)
    return getattr(props, "ContentType", None) if props is not None else None


def expiry_left(message: mqtt.MQTTMessage) -> int | None:
    """Seconds the sender gave the message to live (MQTT 5 message expiry), as the broker counts them down."""
    props = getattr(message, "properties", None)
    return getattr(props, "MessageExpiryInterval", None) if props is not None else None


def no_delay(client: mqtt.Client) -> None:
    """Turn Nagle's algorithm off: a job and its PUBACK are small packets that would otherwise wait
    for the peer's delayed ACK (tens of ms each way). paho does not do it itself."""
    sock = client.socket()
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _str(path: object) -> str | None:
    return None if path is None else str(path)
