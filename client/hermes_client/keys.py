"""CURVE keys for a client of a daemon's ``tcp://`` endpoint.

The daemon's public key comes as its Z85 text (40 characters) or as the path of its ``server.key``
file; the client's own key pair as the path of a ``NAME.key_secret`` file made by ``hermesd keys
--client NAME`` (the daemon must have ``NAME.key`` in its clients directory). Without a key pair of its
own, the client makes a throwaway one, which a daemon lets in only if told to accept any key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.utils import z85

SERVER_KEY_ENV = "HERMES_SERVER_KEY"
CLIENT_KEY_ENV = "HERMES_CLIENT_KEY"


@dataclass(frozen=True)
class CurveKeys:
    """What a DEALER socket needs to connect to a CURVE server."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def curve_keys(server_key: str | None = None, client_key: str | None = None) -> CurveKeys | None:
    """Keys from the arguments, else ``$HERMES_SERVER_KEY`` / ``$HERMES_CLIENT_KEY``; None without a
    server key (a plain connection). Raises ValueError, in one line, for a key that cannot be read."""
    server_key = server_key or os.environ.get(SERVER_KEY_ENV)
    client_key = client_key or os.environ.get(CLIENT_KEY_ENV)
    if not server_key:
        if client_key:
            raise ValueError("a client key needs the daemon's public key too (--server-key or $HERMES_SERVER_KEY)")
        return None
    server_public = _public_key(server_key)
    if client_key:
        public, secret = _load(client_key)
        if secret is None:
            raise ValueError(f"{client_key}: holds no secret key (use the NAME.key_secret file)")
    else:
        public, secret = zmq.curve_keypair()
    return CurveKeys(server_public, public, secret)


def _public_key(text: str) -> bytes:
    if len(text) == 40 and not os.path.exists(text):
        try:
            z85.decode(text)
        except Exception:  # z85 raises KeyError, ValueError or struct.error for bad text
            raise ValueError("server key: not a Z85 key of 40 characters nor a key file") from None
        return text.encode("ascii")
    return _load(text)[0]


def _load(path: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"key file {path}: {exc}") from None
    return public, secret
