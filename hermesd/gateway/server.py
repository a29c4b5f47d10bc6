"""``hermesd gateway``: load the settings, refuse an unsafe address, serve until SIGTERM.

Exit codes: 0 stopped by SIGTERM/SIGINT, 78 invalid configuration (EX_CONFIG, as the daemon), 71 the
address cannot be bound.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import sdnotify
from aiohttp import web

from hermesd.gateway.app import create_app
from hermesd.gateway.config import GatewayConfigError, GatewaySettings, load_gateway_settings

log = logging.getLogger("hermesd.gateway")
EX_OK, EX_OSERR, EX_CONFIG = 0, 71, 78


def main(config: Path | None = None, host: str | None = None, port: int | None = None,
         endpoint: str | None = None, check: bool = False) -> int:
    """Entry point of ``hermesd gateway``; command-line values override the file and environment."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = load_gateway_settings(config)
        overrides = {k: v for k, v in (("host", host), ("port", port), ("endpoint", endpoint)) if v is not None}
        settings = GatewaySettings.model_validate(settings.model_dump() | overrides) if overrides else settings
        settings.check_exposure()
    except (GatewayConfigError, ValueError) as exc:
        log.error("configuration error: %s", str(exc).splitlines()[0])
        return EX_CONFIG
    logging.getLogger().setLevel(settings.log_level.upper())
    if check:
        print(f"gateway config ok: http://{settings.host}:{settings.port} -> {settings.daemon_endpoint()}")
        return EX_OK
    try:
        return asyncio.run(_serve(settings))
    except GatewayConfigError as exc:
        log.error("configuration error: %s", exc)
        return EX_CONFIG
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        return EX_OSERR


async def _serve(settings: GatewaySettings) -> int:
    runner = web.AppRunner(create_app(settings), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        bound = ", ".join(f"http://{address[0]}:{address[1]}" for address in runner.addresses)
        log.info("gateway listening on %s for the daemon at %s", bound, settings.daemon_endpoint())
        print(f"READY {bound}", flush=True)  # tests and scripts wait for this line
        sdnotify.SystemdNotifier().notify(f"READY=1\nSTATUS=listening on {bound}")
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
    return EX_OK
