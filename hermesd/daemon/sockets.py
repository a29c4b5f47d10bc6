"""The daemon's sockets: the ZeroMQ ROUTER with its protective options, and the wake-up pair."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from hermesd.daemon.config import ConfigError, Settings
from hermesd.daemon.curve import secure_tcp
from hermesd.daemon.identity import ANONYMOUS, peer_identity


def open_router(context: zmq.Context, settings: Settings) -> tuple[zmq.Socket, list[str], ThreadAuthenticator | None]:
    """A ROUTER bound to the configured endpoints, and the ZAP handler of its CURVE TCP endpoint (if any).

    A bind failure, or TCP without keys or allow_insecure_tcp, is a ConfigError (exit 78).
    """
    router = context.socket(zmq.ROUTER)
    # ROUTER_MANDATORY: a reply to a vanished client fails at once instead of queueing forever;
    # MAXMSGSIZE: an oversize message drops its sender before a byte of it is decoded.
    for option, value in ((zmq.ROUTER_MANDATORY, 1), (zmq.MAXMSGSIZE, settings.max_message_bytes),
                          (zmq.LINGER, 1000), (zmq.SNDHWM, 10_000)):
        router.setsockopt(option, value)
    if settings.heartbeat_s > 0:
        interval = int(settings.heartbeat_s * 1000)
        for option, value in ((zmq.HEARTBEAT_IVL, interval), (zmq.HEARTBEAT_TIMEOUT, 3 * interval),
                              (zmq.HEARTBEAT_TTL, 3 * interval)):
            router.setsockopt(option, value)
    endpoints = [e for e in (settings.resolved_endpoint(), settings.tcp_endpoint) if e]
    authenticator = None
    try:
        _bind(router, endpoints[0], int(settings.socket_mode, 8))
        if settings.tcp_endpoint:
            authenticator = secure_tcp(context, router, settings)  # options set now apply to the next bind only
            _bind(router, settings.tcp_endpoint, int(settings.socket_mode, 8))
    except ConfigError:
        router.close(linger=0)
        if authenticator is not None:
            authenticator.stop()
        raise
    return router, endpoints, authenticator


def _bind(router: zmq.Socket, endpoint: str, mode: int) -> None:
    path = Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None
    try:
        if path is not None and not path.parent.exists():
            path.parent.mkdir(parents=True)
            # Under the daemon's umask 077 the directory would shut out the clients socket_mode lets in:
            # give them search permission, nothing more (the socket's mode decides who connects).
            os.chmod(path.parent, 0o700 | (0o010 if mode & 0o060 else 0) | (0o001 if mode & 0o006 else 0))
        router.bind(endpoint)
        if path is not None:
            os.chmod(path, mode)
    except (zmq.ZMQError, OSError) as exc:
        raise ConfigError(f"endpoint {endpoint}: cannot bind: {exc}") from None


@dataclass
class Incoming:
    """One message from the ROUTER: its envelope, and its payload or why it was dropped."""

    envelope: list[bytes]
    payload: bytes | None
    problem: str | None = None
    identity: str = ANONYMOUS  # who sent it (hermesd.daemon.identity): the owner of what it submits


def receive(router: zmq.Socket, max_frames: int, max_bytes: int) -> Incoming:
    """Read one whole message frame by frame (zmq.Again when none is waiting).

    ZeroMQ's MAXMSGSIZE bounds each frame, not the message: a client could send thousands of frames of
    max_message_bytes each. Frames past ``max_frames`` or ``max_bytes`` in all are read and dropped
    one at a time, never kept or echoed back in a reply's envelope.
    """
    kept: list[bytes] = []
    frames = total = 0
    more = True
    while more:
        frame = router.recv(zmq.NOBLOCK, copy=False)  # the parts of a message arrive together
        more = frame.more
        if frames == 0:
            identity = peer_identity(frame)
        frames += 1
        total += len(frame)
        if frames <= max_frames and total <= max_bytes:
            kept.append(frame.bytes)
    if frames > max_frames:
        return Incoming(_reply_envelope(kept), None, f"message of {frames} frames; the limit is {max_frames} "
                                                      f"(max_message_frames: envelope and one payload frame)")
    if total > max_bytes:
        return Incoming(_reply_envelope(kept), None, f"message of {total} bytes over its frames; the limit is "
                                                      f"{max_bytes} (max_message_bytes)")
    return Incoming(kept[:-1], kept[-1] if len(kept) >= 2 else None, identity=identity)


def _reply_envelope(kept: list[bytes]) -> list[bytes]:
    """The routing frames of a refused message: up to its empty delimiter, else the client's identity."""
    if b"" in kept[1:]:
        return kept[: kept.index(b"", 1) + 1]
    return kept[:1]


class WakePair:
    """A socketpair whose read end the main loop polls: the executor and signal handlers write to it."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        for end in (self.reader, self.writer):
            end.setblocking(False)

    def wake(self) -> None:
        try:
            self.writer.send(b"\0")
        except OSError:  # the buffer is full (BlockingIOError): the loop is waking anyway
            pass

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except OSError:
            pass
