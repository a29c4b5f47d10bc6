"""Daemon settings: a TOML file (default /etc/hermesd/hermesd.toml) overridden by HERMESD_* variables.

Nested fields use ``__`` in variable names: ``HERMESD_QUEUE_SIZE=8``,
``HERMESD_MODELS__SMOLLM2__MEMORY_BUDGET=700MiB``. etc/hermesd.toml documents every field.
Settings are plain data; the daemon builds its runtime objects from them once (and again on SIGHUP).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from hermes_client.protocol import MAX_FORWARD_VALUES, MAX_NEW_TOKENS, TASK_NAMES
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from hermesd.errors import HermesError
from hermesd.images import DEFAULT_MAX_PIXELS, MAX_IMAGE_BYTES, ImagePolicy
from hermesd.units import parse_size
from hermesd.watchdog.settings import MemoryWatchSettings, ThermalSettings

DEFAULT_CONFIG = Path("/etc/hermesd/hermesd.toml")
CONFIG_ENV = "HERMESD_CONFIG"


class ConfigError(HermesError):
    """The configuration cannot be used; the daemon exits with EX_CONFIG (78)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    """One served model: its store and how much memory it may use."""

    store: Path
    memory_budget: str | None = None
    prefetch: int | None = Field(default=None, ge=0, le=16)
    resident: list[str] | Literal["all"] | None = None
    profile: bool = False
    max_prompt_tokens: int = Field(default=512, ge=1, le=1 << 20)
    max_new_tokens: int = Field(default=256, ge=1, le=MAX_NEW_TOKENS)
    max_batch: int = Field(default=16, ge=1, le=256)  # jobs sharing one weight sweep at most (1: no batching)
    # generate's prompt passes multiply bf16/fp16 linears in fp32 (hermesd.fp32linear): 4-5x faster
    # prompts where bf16 is emulated; batched equals solo, but not transformers' bf16 bits
    fp32_prompts: bool = False
    defaults: dict[str, dict[str, Any]] = Field(default_factory=dict)
    keep_alive: float | str = -1  # how long an idle model stays loaded: seconds or "30s"/"5m"/"2h"; 0; -1 forever
    load: Literal["start", "first_use"] = "start"

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: float | str) -> float | str:
        parse_duration(value)  # raises ValueError with the reason
        return value

    @property
    def keep_alive_s(self) -> float | None:
        """Seconds an idle model stays loaded; None: forever (keep_alive -1, the default)."""
        seconds = parse_duration(self.keep_alive)
        return None if seconds < 0 else seconds

    @field_validator("memory_budget")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and value != "auto":
            parse_size(value)  # raises ValueError with the reason
        return value

    @field_validator("defaults")
    @classmethod
    def _tasks(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(value) - set(TASK_NAMES))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; tasks are {list(TASK_NAMES)}")
        return value

    @property
    def budget_bytes(self) -> int | None:
        """The budget in bytes when it is a size; None for "auto" or no budget (planned at load)."""
        explicit = self.memory_budget is not None and self.memory_budget != "auto"
        return parse_size(self.memory_budget) if explicit else None


def parse_duration(value: float | str) -> float:
    """Seconds from a number or "NUMBER[s|m|h]" (Ollama's keep_alive style); a negative value means forever."""
    if isinstance(value, bool):
        raise ValueError("a duration is seconds or a string such as \"5m\"")
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    try:
        return float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise ValueError(f"duration {value!r}: use seconds, or a number with s, m or h (\"5m\"); -1 = forever") from None


class Settings(BaseSettings):
    """Everything the daemon reads from its config. Paths in the file are relative to the file."""

    model_config = SettingsConfigDict(env_prefix="HERMESD_", env_nested_delimiter="__", extra="forbid",
                                      nested_model_default_partial_update=True)

    runtime_dir: Path | None = None
    state_dir: Path | None = None
    endpoint: str | None = None
    tcp_endpoint: str | None = None
    socket_mode: str = "0660"
    allow_insecure_tcp: bool = False       # serve tcp_endpoint without CURVE (every TCP client is one identity)
    curve_keys_dir: Path | None = None     # server.key / server.key_secret (`hermesd keys`); default state_dir/curve
    curve_clients_dir: Path | None = None  # allowed clients' public *.key files; default curve_keys_dir/clients
    max_message_bytes: int = Field(default=1 << 20, ge=4096, le=1 << 30)
    max_message_frames: int = Field(default=3, ge=3, le=64)
    max_stop_strings: int = Field(default=16, ge=0, le=1024)
    max_stop_chars: int = Field(default=64, ge=1, le=4096)
    max_image_bytes: int = Field(default=4 << 20, ge=1024, le=MAX_IMAGE_BYTES)
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1, le=1 << 28)
    image_dirs: list[Path] = Field(default_factory=list)  # classify may read image files only under these
    max_forward_output_bytes: int = Field(default=MAX_FORWARD_VALUES * 4, ge=4096, le=MAX_FORWARD_VALUES * 4)
    heartbeat_s: float = Field(default=5.0, ge=0)
    queue_size: int = Field(default=32, ge=1, le=100_000)
    result_retention_s: float = Field(default=86_400.0, ge=0)
    max_attempts: int = Field(default=3, ge=1)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    progress_interval_s: float = Field(default=0.25, ge=0)
    executor_stall_s: float | None = Field(default=None, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    thermal: ThermalSettings = Field(default_factory=ThermalSettings)
    memory: MemoryWatchSettings = Field(default_factory=MemoryWatchSettings)

    @field_validator("socket_mode")
    @classmethod
    def _octal(cls, value: str) -> str:
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError("must be an octal mode such as \"0660\"") from None
        if not 0 <= mode <= 0o777:
            raise ValueError("must be between 0000 and 0777")
        return value

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        if not value:
            raise ValueError("declare at least one model: [models.NAME] with store = \"PATH\"")
        for name in value:
            if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"model name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        return value

    # -- places -------------------------------------------------------------------------------
    def resolved_runtime_dir(self) -> Path:
        """runtime_dir, else systemd's $RUNTIME_DIRECTORY, else /run/hermesd."""
        return self.runtime_dir or Path(os.environ.get("RUNTIME_DIRECTORY", "/run/hermesd").split(":")[0])

    def resolved_state_dir(self) -> Path:
        """state_dir, else systemd's $STATE_DIRECTORY, else /var/lib/hermesd."""
        return self.state_dir or Path(os.environ.get("STATE_DIRECTORY", "/var/lib/hermesd").split(":")[0])

    def image_policy(self) -> ImagePolicy:
        """What classify jobs may read: images as bytes, files only under ``image_dirs`` (resolved)."""
        return ImagePolicy(dirs=tuple(Path(os.path.realpath(d)) for d in self.image_dirs),
                           max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    def resolved_curve_keys_dir(self) -> Path:
        return self.curve_keys_dir or self.resolved_state_dir() / "curve"

    def resolved_curve_clients_dir(self) -> Path:
        return self.curve_clients_dir or self.resolved_curve_keys_dir() / "clients"

    def resolved_endpoint(self) -> str:
        return self.endpoint or f"ipc://{self.resolved_runtime_dir() / 'hermesd.sock'}"


def load_settings(path: Path | None = None) -> Settings:
    """Read the config file (``path``, $HERMESD_CONFIG or the default) and the environment.

    Raises ConfigError with one line that names the file and the offending field.
    """
    path = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        with open(path, "rb") as handle:
            tomllib.load(handle)  # parse errors are reported with their line here, before pydantic
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        settings = _settings_class(path)()
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_problem(exc)}") from None
    return _relative_to(settings, path.parent)


def _settings_class(path: Path) -> type[Settings]:
    """Settings whose sources are: environment first, then the TOML file at ``path``."""

    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                       env_settings: PydanticBaseSettingsSource, **_: PydanticBaseSettingsSource):
            return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path, deep_merge=True)

    return FileSettings


def _first_problem(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def _relative_to(settings: Settings, base: Path) -> Settings:
    """Resolve relative paths in the file against the file's own directory."""
    def resolve(path: Path | None) -> Path | None:
        return None if path is None or path.is_absolute() else (base / path).resolve()

    names = ("runtime_dir", "state_dir", "curve_keys_dir", "curve_clients_dir")
    updates: dict[str, Any] = {name: resolve(getattr(settings, name)) for name in names
                               if getattr(settings, name) is not None and not getattr(settings, name).is_absolute()}
    models = {name: model.model_copy(update={"store": resolve(model.store) or model.store})
              for name, model in settings.models.items()}
    thermal = settings.thermal.model_copy(update={"paths": [resolve(p) or p for p in settings.thermal.paths]})
    image_dirs = [resolve(d) or d for d in settings.image_dirs]
    return settings.model_copy(update=updates | {"models": models, "thermal": thermal, "image_dirs": image_dirs})
