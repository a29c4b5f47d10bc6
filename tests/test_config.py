"""Daemon settings: TOML plus HERMESD_* overrides, errors that name the field, every field documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hermesd.daemon.config import ConfigError, ModelSettings, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "hermesd.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hermesd.toml"
    path.write_text(text)
    return path


def test_file_values_env_overrides_and_relative_paths(tmp_path, monkeypatch):
    path = _write(tmp_path, 'queue_size = 4\nruntime_dir = "run"\n[models.a]\nstore = "stores/a"\n'
                            'memory_budget = "800MiB"\n[models.a.defaults.generate]\nmax_new_tokens = 9\n'
                            '[thermal]\npaths = ["t1"]\n')
    settings = load_settings(path)
    assert settings.queue_size == 4 and settings.runtime_dir == tmp_path / "run"
    assert settings.models["a"].store == tmp_path / "stores" / "a"
    assert settings.models["a"].budget_bytes == 800 * 2**20
    assert settings.models["a"].defaults == {"generate": {"max_new_tokens": 9}}
    assert settings.thermal.paths == [tmp_path / "t1"]
    assert settings.resolved_endpoint() == f"ipc://{tmp_path / 'run' / 'hermesd.sock'}"

    monkeypatch.setenv("HERMESD_QUEUE_SIZE", "7")
    monkeypatch.setenv("HERMESD_MODELS__A__MEMORY_BUDGET", "1GiB")
    monkeypatch.setenv("HERMESD_THERMAL__SOFT_C", "60")
    settings = load_settings(path)
    assert settings.queue_size == 7 and settings.models["a"].budget_bytes == 2**30
    assert settings.thermal.soft_c == 60 and settings.thermal.hard_c == 82  # the rest of the table stays


def test_systemd_directories_are_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/hermesd")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/hermesd")
    settings = load_settings(_write(tmp_path, '[models.a]\nstore = "/s"\n'))
    assert settings.resolved_state_dir() == Path("/var/lib/hermesd")
    assert settings.resolved_endpoint() == "ipc:///run/hermesd/hermesd.sock"


@pytest.mark.parametrize("text, names", [
    ('queue_size = "many"\n[models.a]\nstore = "/s"\n', "queue_size"),
    ('[models.a]\nstore = "/s"\nmemory_budget = "lots"\n', "models.a.memory_budget: not a size"),
    ('[models.a]\nstore = "/s"\nprefetch = -1\n', "models.a.prefetch"),
    ('[models.a]\nstore = "/s"\nbogus = 1\n', "models.a.bogus: Extra inputs are not permitted"),
    ('[models.a]\nstore = "/s"\n[models.a.defaults.dance]\nx = 1\n', "models.a.defaults: unknown task"),
    ('socket_mode = "rwx"\n[models.a]\nstore = "/s"\n', "socket_mode: must be an octal mode"),
    ('log_level = "chatty"\n[models.a]\nstore = "/s"\n', "log_level"),
    ('queue_size = 3\n', "models: Value error, declare at least one model"),
    ('[models."a b"]\nstore = "/s"\n', "model name 'a b'"),
    ('[models.a\n', "line 1"),
])
def test_errors_name_the_file_and_field(tmp_path, text, names):
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text))
    assert str(info.value).startswith(str(tmp_path / "hermesd.toml"))
    assert names.replace("Value error, ", "") in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_the_example_config_is_valid_and_documents_every_field():
    settings = load_settings(EXAMPLE)
    assert set(settings.models) == {"smollm2", "minilm"}
    text = EXAMPLE.read_text()
    sections = {"": Settings, "models.smollm2": ModelSettings,
                "thermal": type(settings.thermal), "memory": type(settings.memory)}
    for section, cls in sections.items():
        for name in cls.model_fields:
            if section == "" and name in ("models", "thermal", "memory"):
                continue
            # each field appears as a setting line (possibly commented out) preceded by a comment
            setting = rf"(?m)^# .*\n(?:#.*\n)*#? ?{name} = "
            table = rf"(?m)^# .*\n(?:#.*\n)*\[{re.escape(section)}\.{name}[.\]]"  # a table such as defaults
            assert re.search(setting, text) or re.search(table, text), \
                f"{section or 'top level'}.{name} is not documented in etc/hermesd.toml"
