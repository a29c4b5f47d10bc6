"""The ``hermesd gateway`` subcommand's options (aiohttp is imported only when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_gateway(commands) -> None:
    """Register ``hermesd gateway`` on the ``hermesd`` command's subparsers."""
    gateway = commands.add_parser("gateway", help="serve the Ollama- and OpenAI-compatible HTTP API in front of "
                                                  "the daemon (docs/GATEWAY.md)")
    gateway.add_argument("--config", type=Path, help="TOML config (default: $HERMESD_GATEWAY_CONFIG or "
                                                     "/etc/hermesd/gateway.toml, if it exists)")
    gateway.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port to listen on (default 11434, Ollama's; 0 = any free port)")
    gateway.add_argument("--endpoint", help="the daemon's endpoint (default: $HERMES_ENDPOINT or "
                                            "ipc:///run/hermesd/hermesd.sock)")
    gateway.add_argument("--check", action="store_true", help="validate the config and exit (0 valid, 78 invalid)")
    gateway.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from hermesd.gateway.server import main

    return main(args.config, args.host, args.port, args.endpoint, args.check)
