"""Who sent a message: the identity that owns the jobs it submits.

The identity comes from the transport, never from the message, so a client cannot claim another's:

- ``ipc://``: the peer's uid, which the kernel reports for the Unix socket (SO_PEERCRED; ZeroMQ puts
  it in the ``Peer-Address`` property as ``HOST:UID:GID:PID``). Processes of one user share jobs.
- ``tcp://`` with CURVE: the client's public key (Z85), which the ZAP handler authenticated and ZeroMQ
  reports as the ``User-Id`` property.
- ``tcp://`` without CURVE (``allow_insecure_tcp = true``): every client is the one identity
  ``anonymous``; nothing separates their jobs.

In a user namespace that maps only some uids (systemd's ``PrivateUsers=yes``), the kernel reports
every unmapped peer uid as the overflow uid (65534), so those peers share one identity.
"""

from __future__ import annotations

import re

import zmq

ANONYMOUS = "anonymous"
# HOST:UID:GID:PID. A TCP peer's address never matches: IPv4 has no colon and IPv6 has either eight
# groups or an empty one ("::").
_UNIX_PEER = re.compile(r"^[^:]*:(\d+):\d+:\d+$")


def peer_identity(frame: zmq.Frame) -> str:
    """The identity of the peer that sent ``frame`` (a frame received on the daemon's ROUTER)."""
    user = _property(frame, "User-Id")
    if user:
        return f"key:{user}"
    match = _UNIX_PEER.match(_property(frame, "Peer-Address"))
    if match:
        return f"uid:{int(match.group(1))}"
    return ANONYMOUS


def _property(frame: zmq.Frame, name: str) -> str:
    try:
        value = frame.get(name)
    except (zmq.ZMQError, UnicodeDecodeError):  # not set for this transport or mechanism
        return ""
    return value if isinstance(value, str) else ""


def partial_uid_namespace(uid_map: str = "/proc/self/uid_map") -> bool:
    """Whether this process runs in a user namespace that maps fewer uids than the whole range."""
    try:
        with open(uid_map, encoding="ascii") as handle:
            mapped = sum(int(line.split()[2]) for line in handle if line.strip())
    except (OSError, ValueError, IndexError):
        return False
    return mapped < 4294967295
