"""CURVE on the TCP endpoint: the server's key pair, the allowed clients' keys, and the ZAP handler.

``hermesd keys`` makes the server key pair in ``curve_keys_dir``. A ``tcp_endpoint`` is served only
with CURVE (encrypted, and only clients whose public key file is in ``curve_clients_dir`` get in),
unless the config says ``allow_insecure_tcp = true``. pyzmq's ThreadAuthenticator answers ZeroMQ's
ZAP requests from the clients directory; the ipc:// endpoint is bound before the CURVE options are
set (ZeroMQ copies a socket's options at bind time), so local clients keep using the socket file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from hermesd.daemon.config import ConfigError, Settings

log = logging.getLogger("hermesd.server")
ZAP_DOMAIN = "hermesd"
SERVER_NAME = "server"  # server.key (public, give it to clients) and server.key_secret


def make_keys(directory: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Create ``name.key`` and ``name.key_secret`` in ``directory`` (0700); refuse to overwrite."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise ConfigError(f"{secret} already exists; pass --force to replace the key pair")
    old_umask = os.umask(0o077)  # the secret is private from its first byte
    try:
        made = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old_umask)
    Path(made[0]).chmod(0o644)  # the public key is for handing out
    return Path(made[0]), Path(made[1])


def server_secret(settings: Settings) -> tuple[bytes, bytes] | None:
    """The server's (public, secret) key, or None when ``hermesd keys`` has not made one."""
    path = settings.resolved_curve_keys_dir() / f"{SERVER_NAME}.key_secret"
    if not path.exists():
        return None
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the server key: {exc}") from None
    if secret is None:
        raise ConfigError(f"{path}: holds no secret key")
    return public, secret


def secure_tcp(context: zmq.Context, router: zmq.Socket, settings: Settings) -> ThreadAuthenticator | None:
    """Make the router's next binds CURVE servers checked by a ZAP handler; None for allowed plain TCP.

    Raises ConfigError when TCP has no server key and ``allow_insecure_tcp`` is false, or the clients
    directory is missing.
    """
    keys = server_secret(settings)
    if keys is None:
        if not settings.allow_insecure_tcp:
            raise ConfigError(f"tcp_endpoint {settings.tcp_endpoint} needs CURVE keys: run `hermesd keys` (they go "
                              f"to {settings.resolved_curve_keys_dir()}), or set allow_insecure_tcp = true")
        log.warning("tcp_endpoint %s without CURVE (allow_insecure_tcp): anyone who reaches it may submit, "
                    "unencrypted, as one shared identity", settings.tcp_endpoint)
        return None
    clients = settings.resolved_curve_clients_dir()
    if not clients.is_dir():
        raise ConfigError(f"curve_clients_dir {clients} does not exist: put the allowed clients' public *.key "
                          f"files there")
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("hermesd.zap"))
    authenticator.start()
    authenticator.configure_curve(domain=ZAP_DOMAIN, location=str(clients))
    router.curve_publickey, router.curve_secretkey = keys
    router.curve_server = True
    router.zap_domain = ZAP_DOMAIN.encode()
    log.info("tcp_endpoint %s: CURVE, %d allowed client key(s) in %s", settings.tcp_endpoint,
             len(zmq.auth.load_certificates(str(clients))), clients)
    return authenticator


def reload_clients(authenticator: ThreadAuthenticator | None, settings: Settings) -> None:
    """Re-read the allowed client keys (SIGHUP): a key added or removed counts for new connections."""
    if authenticator is not None:
        authenticator.configure_curve(domain=ZAP_DOMAIN, location=str(settings.resolved_curve_clients_dir()))
