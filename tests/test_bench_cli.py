"""bench.cli / bench.suite / bench.plots: the command's surface, AirLLM discovery, prepare and plots."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench import cli, plots, prepare, scenarios, suite


def test_help_lists_the_modes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--json" in out and "--airllm-python" in out


def test_unknown_scenario_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--scenarios", "nope", "--no-benchmarks"]) == 2
    assert "unknown scenario" in capsys.readouterr().err


def test_missing_airllm_is_skipped_with_a_reason(tmp_path: Path) -> None:
    python, reason = suite.find_airllm(sys.executable)  # this venv has no airllm
    assert python is None and "--airllm-python" in reason
    python, reason = suite.find_airllm(str(tmp_path / "no-such-python"))
    assert python is None and "did not start" in reason


def _prepared(tmp_path: Path, plans: dict) -> prepare.Prepared:
    scenario = scenarios.select(scenarios.FULL, "llama-1b")[0]
    return prepare.Prepared(scenario, tmp_path / "store", tmp_path / "twin", 700 << 20, 2 << 30, "bfloat16",
                            tmp_path / "airllm", plans)


def test_contender_order_and_commands(tmp_path: Path) -> None:
    options = suite.Options(results=tmp_path, threads=2, timeout=10, airllm_python=None,
                            airllm_reason="absent", capped=True)
    prepared = _prepared(tmp_path, {"hermesd": {"file": "p.json"}, "hermesd-k0": {"error": "below the minimum"}})
    names = suite.contender_names(prepared, options)
    assert names == ["hermesd", "hermesd-k0", "standard", "accelerate", "io-only", "compute-only"]
    cmd = suite.command("hermesd", prepared, options, 700 << 20, prepared.plans, tmp_path / "o.npy")
    assert cmd[1:4] == ["-m", "bench.runner", "hermesd"] and "--plan" in cmd and "--timeline" in cmd
    refused = suite.command("hermesd-k0", prepared, options, 700 << 20, prepared.plans, tmp_path / "o.npy")
    assert isinstance(refused, str) and "below the minimum" in refused
    accelerate = suite.command("accelerate", prepared, options, 700 << 20, prepared.plans, tmp_path / "o.npy")
    assert accelerate[accelerate.index("--cpu-memory") + 1] == str(350 << 20)


def test_a_refused_plan_is_recorded_as_a_failed_run(tmp_path: Path) -> None:
    options = suite.Options(results=tmp_path, threads=2, timeout=10, airllm_python=None, airllm_reason="absent",
                            capped=False, log=open("/dev/null", "w"))
    prepared = _prepared(tmp_path, {"hermesd": {"error": "too small"}})
    result = suite.run_one("hermesd", prepared, options, 1 << 20, prepared.plans, tmp_path / "runs", "r0")
    assert result["ok"] is False and "too small" in result["error"]
    assert (tmp_path / "runs" / "r0-hermesd.json").is_file()


def test_cap_from_fraction_and_source_paths() -> None:
    llama = scenarios.select(scenarios.FULL, "llama-1b")[0]
    assert prepare.cap_for(llama, 2200 << 20) == 770 << 20
    assert prepare.resolve_source("pip:pkg/model").parts[-2:] == ("pkg", "model")


def test_plots_are_written(tmp_path: Path) -> None:
    reason = plots.available()
    if reason:  # matplotlib is the optional `bench` extra
        assert "matplotlib" in reason
        return
    points = [{"contender": "hermesd", "cap_bytes": 1 << 30, "latency_s": 4.0},
              {"contender": "hermesd", "cap_bytes": 2 << 30, "latency_s": 3.5},
              {"contender": "standard", "cap_bytes": 1 << 30, "latency_s": None}]
    assert plots.latency_vs_budget(points, tmp_path / "a.png", "t").stat().st_size > 1000
    events = [("h.0", "load", 0.0, 0.1), ("h.0", "compute", 0.1, 0.3), ("h.1", "load", 0.1, 0.2),
              ("h.1", "compute", 0.3, 0.5), ("h.0", "load", 0.5, 0.6)]
    assert plots.timeline(events, tmp_path / "b.png", "t").stat().st_size > 1000
