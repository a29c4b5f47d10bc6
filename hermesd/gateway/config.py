"""Gateway settings: a TOML file (default /etc/hermesd/gateway.toml) overridden by HERMESD_GATEWAY_* variables.

etc/hermesd-gateway.toml documents every field. A missing default file means all defaults (a
gateway on 127.0.0.1:11434 in front of the default daemon socket).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

DEFAULT_CONFIG = Path("/etc/hermesd/gateway.toml")
CONFIG_ENV = "HERMESD_GATEWAY_CONFIG"


class GatewayConfigError(Exception):
    """The gateway's configuration cannot be used (exit status 78)."""


class GatewaySettings(BaseSettings):
    """What the gateway listens on, where the daemon is, and who may call it."""

    model_config = SettingsConfigDict(env_prefix="HERMESD_GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=11434, ge=0, le=65535)
    endpoint: str | None = None
    token: str | None = Field(default=None, min_length=16)
    token_file: Path | None = None
    allow_unauthenticated_remote: bool = False
    daemon_timeout_s: float = Field(default=5.0, gt=0, le=300)
    daemon_retries: int = Field(default=1, ge=0, le=10)
    job_timeout_s: float = Field(default=600.0, gt=0)
    retry_after_s: int = Field(default=5, ge=1, le=3600)
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    priority: int = Field(default=0, ge=0, le=9)
    models_cache_s: float = Field(default=5.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def daemon_endpoint(self) -> str:
        """``endpoint``, else $HERMES_ENDPOINT, else the daemon's default ipc socket."""
        return self.endpoint or os.environ.get("HERMES_ENDPOINT") or "ipc:///run/hermesd/hermesd.sock"

    def bearer_token(self) -> str | None:
        """The token requests must carry: ``token``, else the first line of ``token_file``, else None."""
        if self.token is not None:
            return self.token
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise GatewayConfigError(f"token_file: {exc}") from None
        if len(token) < 16:
            raise GatewayConfigError(f"token_file: {self.token_file} holds fewer than 16 characters")
        return token

    def check_exposure(self) -> None:
        """Refuse a non-loopback address without a token, unless explicitly allowed."""
        if not is_loopback(self.host) and self.bearer_token() is None and not self.allow_unauthenticated_remote:
            raise GatewayConfigError(
                f"host {self.host!r} is reachable from other machines: set token or token_file, or "
                "allow_unauthenticated_remote = true to serve it without authentication")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine: a loopback address or "localhost"."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def load_gateway_settings(path: Path | None = None) -> GatewaySettings:
    """Read the file (``path``, $HERMESD_GATEWAY_CONFIG or the default) and the environment.

    An explicitly named file must exist; the default one may be absent. Raises GatewayConfigError
    with one line naming the file and the field.
    """
    named = path or os.environ.get(CONFIG_ENV)
    path = Path(named or DEFAULT_CONFIG)
    if not path.exists() and not named:
        return _checked(lambda: GatewaySettings(), path)
    try:
        with open(path, "rb") as handle:
            tomllib.load(handle)
    except FileNotFoundError:
        raise GatewayConfigError(f"{path}: config file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise GatewayConfigError(f"{path}: {exc}") from None

    class FileSettings(GatewaySettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                       env_settings: PydanticBaseSettingsSource, **_: PydanticBaseSettingsSource):
            return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path)

    settings = _checked(FileSettings, path)
    if settings.token_file is not None and not settings.token_file.is_absolute():
        settings = settings.model_copy(update={"token_file": (path.parent / settings.token_file).resolve()})
    return settings


def _checked(make, path: Path) -> GatewaySettings:
    try:
        return make()
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise GatewayConfigError(f"{path}: {field}: {error['msg'].removeprefix('Value error, ')}") from None
