"""Bridge settings: a TOML file (default /etc/hermesd/mqtt.toml) overridden by HERMESD_MQTT_* variables.

Every field is documented in etc/mqtt.toml. A separate file from the daemon's config: the bridge runs
as its own unit, with its own credentials, and the daemon's config refuses unknown fields.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path

from hermes_client.protocol import TASK_NAMES
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from hermesd.errors import HermesError

DEFAULT_CONFIG = Path("/etc/hermesd/mqtt.toml")
CONFIG_ENV = "HERMESD_MQTT_CONFIG"
_TOPIC_WORD = "letters, digits, '-', '_' or '.'"


class ConfigError(HermesError):
    """The bridge's configuration cannot be used (exit 78, EX_CONFIG)."""


def _is_word(text: str) -> bool:
    """A topic level we put names into: no MQTT wildcards, separators or '$'."""
    return bool(text) and len(text) <= 64 and all(c.isalnum() or c in "-_." for c in text)


class BridgeSettings(BaseSettings):
    """Everything ``hermesd mqtt`` reads. Paths in the file are relative to the file."""

    model_config = SettingsConfigDict(env_prefix="HERMESD_MQTT_", extra="forbid")

    # -- broker --
    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    client_id: str | None = None
    session_expiry_s: int = Field(default=86_400, ge=0, le=0xFFFFFFFF)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)
    # -- topics --
    node: str = Field(default_factory=lambda: socket.gethostname().split(".")[0])
    prefix: str = "hermes"
    group: str | None = "hermes"
    models: list[str] | None = None
    tasks: list[str] = Field(default_factory=lambda: list(TASK_NAMES))
    result_expiry_s: int | None = Field(default=None, ge=1, le=0xFFFFFFFF)
    # -- the daemon --
    endpoint: str | None = None
    daemon_timeout_s: float = Field(default=10.0, gt=0)
    max_inflight: int = Field(default=8, ge=1, le=1024)
    job_timeout_s: float = Field(default=3600.0, gt=0)
    pause_s: float = Field(default=5.0, gt=0)
    state_dir: Path | None = None
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")

    @field_validator("node", "prefix", "group")
    @classmethod
    def _word(cls, value: str | None) -> str | None:
        if value == "":
            return None  # group = "": no shared subscription, this node takes only its own topic
        if value is not None and not _is_word(value):
            raise ValueError(f"{value!r}: use 1-64 {_TOPIC_WORD}")
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not _is_word(name):
                raise ValueError(f"model {name!r}: use 1-64 {_TOPIC_WORD}")
        return value

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(TASK_NAMES))
        if unknown or not value:
            raise ValueError(f"tasks must be some of {list(TASK_NAMES)}; got {value}")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> "BridgeSettings":
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        if (self.cert_file or self.ca_file) and not self.tls:
            raise ValueError("ca_file, cert_file and key_file need tls = true")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        return self

    # -- resolved values -------------------------------------------------------------------------
    def resolved_client_id(self) -> str:
        """The MQTT client id: stable per node, so a restarted bridge gets its session back."""
        return self.client_id or f"hermesd-{self.node}"

    def resolved_state_dir(self) -> Path:
        """state_dir, else systemd's $STATE_DIRECTORY, else /var/lib/hermesd-mqtt."""
        return self.state_dir or Path(os.environ.get("STATE_DIRECTORY", "/var/lib/hermesd-mqtt").split(":")[0])

    def resolved_password(self) -> str | None:
        """The password, read from password_file (e.g. a systemd credential) when one is named."""
        if self.password_file is None:
            return self.password
        return self.password_file.read_text(encoding="utf-8").rstrip("\n")


def load_bridge_settings(path: Path | None = None) -> BridgeSettings:
    """Read the bridge's config file (``path``, $HERMESD_MQTT_CONFIG or the default) and environment.

    A missing default file means all defaults; a named file that is missing or bad is a ConfigError.
    """
    named = path or os.environ.get(CONFIG_ENV)
    path = Path(named or DEFAULT_CONFIG)
    if not path.exists() and named is None:
        return _parse(BridgeSettings, path)
    try:
        with open(path, "rb") as handle:
            tomllib.load(handle)  # syntax errors with their line, before pydantic
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    settings = _parse(_from_file(path), path)
    return _relative_to(settings, path.parent)


def _from_file(path: Path) -> type[BridgeSettings]:
    class FileSettings(BridgeSettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                       env_settings: PydanticBaseSettingsSource, **_: PydanticBaseSettingsSource):
            return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path)

    return FileSettings


def _parse(cls: type[BridgeSettings], path: Path) -> BridgeSettings:
    try:
        return cls()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"{path}: {where}: {error['msg'].removeprefix('Value error, ')}{more}") from None


def _relative_to(settings: BridgeSettings, base: Path) -> BridgeSettings:
    names = ("ca_file", "cert_file", "key_file", "password_file", "state_dir")
    updates = {name: (base / value).resolve() for name in names
               if (value := getattr(settings, name)) is not None and not value.is_absolute()}
    return settings.model_copy(update=updates)
