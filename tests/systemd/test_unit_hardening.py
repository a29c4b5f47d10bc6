"""systemd/hermesd.service: statically clean, and its hardening does not break bf16 inference.

The static test runs anywhere systemd-analyze exists. The container test boots a real systemd
(``container.py``), installs the unit *as shipped* plus a drop-in that swaps only ExecStart for a
probe (``probe_service.py``: torch matmuls, sd_notify, the daemon's kinds of system access), and
asserts from the host what the driver (``drive_hardening.py``) saw.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from container import CONTAINER_PAYLOAD, CONTAINER_VENV, HERE, SHIPPED_UNIT, nspawn_venv, run_container  # noqa: F401  (nspawn_venv is a fixture)

pytestmark = pytest.mark.systemd

MAX_EXPOSURE = 2.0
MEMORY_LIMIT = 2 << 30  # the whole container: systemd, journal, torch + matmuls peak near 0.3 GiB
PROBE_DROPIN = ("[Service]\n# Only the command changes: the daemon is not written yet, the probe stands in.\n"
                f"ExecStart=\nExecStart={CONTAINER_VENV}/bin/python {CONTAINER_PAYLOAD}/probe_service.py"
                " --config /etc/hermesd/hermesd.toml\n")


def _unit_settings(text: str) -> dict[str, str]:
    """The [Service] settings of a unit file (last value wins, as for systemd's single-value keys)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string(text)
    return dict(parser["Service"])


@pytest.mark.parametrize("unit", [SHIPPED_UNIT, SHIPPED_UNIT.with_name("hermesd-gateway.service")],
                         ids=lambda path: path.name)
def test_unit_verifies_clean_and_exposure_within_limit(unit: Path) -> None:
    """``systemd-analyze verify`` has nothing to say and the offline exposure is at most 2.0
    (the daemon's unit and the HTTP gateway's).

    verify checks that ExecStart exists, so a stub ``/opt/hermesd/bin/hermesd`` is made on a tmpfs
    over /opt in a private mount namespace: nothing is left on the host.
    """
    if not shutil.which("systemd-analyze") or not shutil.which("unshare"):
        pytest.skip("systemd-analyze or unshare missing")
    script = ("set -e; mount -t tmpfs tmpfs /opt; mkdir -p /opt/hermesd/bin;"
              "printf '#!/bin/sh\\nexit 0\\n' > /opt/hermesd/bin/hermesd; chmod +x /opt/hermesd/bin/hermesd;"
              f"systemd-analyze verify --man=no {SHIPPED_UNIT} {unit}")
    verify = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True)
    if verify.returncode != 0 and "unshare failed" in verify.stderr:
        pytest.skip(f"cannot make a private mount namespace for the ExecStart stub: {verify.stderr.strip()}")
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr

    security = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                              capture_output=True, text=True)
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert level, security.stdout + security.stderr
    assert float(level.group(1)) <= MAX_EXPOSURE, security.stdout


def test_unit_never_denies_write_execute() -> None:
    """MemoryDenyWriteExecute=yes passes systemd-analyze and breaks bf16 (oneDNN JIT): keep it out."""
    settings = _unit_settings(SHIPPED_UNIT.read_text())
    assert settings.get("MemoryDenyWriteExecute", "no") == "no"
    assert "ProcSubset" not in settings  # would hide /proc/pressure/memory from the PSI watchdog


@pytest.mark.slow
def test_bf16_inference_under_shipped_hardening(nspawn_venv: Path, tmp_path: Path) -> None:
    """Under the shipped unit: active only after READY, bf16 correct, socket reachable by the group only."""
    shipped = SHIPPED_UNIT.read_text()
    result = run_container(
        (HERE / "drive_hardening.py").read_text(),
        venv=nspawn_venv, out_dir=tmp_path / "out", state_dir=tmp_path / "state", timeout=420,
        memory_limit=MEMORY_LIMIT,
        units={"hermesd.service": shipped, "hermesd.service.d/probe.conf": PROBE_DROPIN},
        payload={"probe_service.py": (HERE / "probe_service.py").read_text()},
        files={"/etc/hermesd/hermesd.toml": "# the probe only reads this (the daemon's config)\n"})
    assert result.returncode == 0, result.diagnostics()
    f = result.findings
    why = result.diagnostics()

    # The unit in force is the shipped file plus a drop-in that touches ExecStart only.
    assert shipped in f["unit_cat"], why
    dropin = [ln for ln in PROBE_DROPIN.splitlines() if ln and not ln.startswith(("#", "["))]
    assert all(ln.startswith("ExecStart=") for ln in dropin)
    assert f["exposure"] is not None and f["exposure"] <= MAX_EXPOSURE, f["exposure"]

    # Type=notify: "activating" until READY=1, then active; systemd entered active after the probe sent it.
    assert f["start_states"][0].startswith("activating"), f["start_states"]
    assert f["start_states"][-1] == "active/running", why
    probe = f["probe"]
    assert int(f["after_start"]["ActiveEnterTimestampMonotonic"]) >= probe["ready_sent_usec"]
    assert f["after_start"]["StatusText"] == probe["status_text"]

    # bf16 inference works under every hardening setting (and fp32, threads, the daemon's I/O paths).
    matmul = probe["matmul"]
    for case in ("bf16_matmul", "bf16_linear", "fp32_matmul"):
        assert matmul[case]["ok"], (case, matmul)
    assert probe["threads"]["ok"], probe["threads"]
    assert probe["o_direct"]["ok"], probe["o_direct"]
    assert probe["madv_hugepage"]["ok"], probe["madv_hugepage"]
    assert probe["psi_memory"]["ok"] and probe["meminfo"], probe["psi_memory"]
    assert probe["notify_socket"] and probe["env"]["WATCHDOG_USEC"] == "30000000"

    # ...and the hardening really was in force in that process.
    status = probe["status"]
    assert status["Uid"].split()[0] != "0" and status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, status
    assert probe["write_opt"] == "EROFS" and probe["write_etc"] == "EROFS", probe
    assert probe["config"]["read"] and probe["config"]["write"] in ("EACCES", "EROFS")  # root's, read-only
    assert probe["affinity"] == "EPERM"  # @resources filtered, and torch did not need it

    # Socket access: root and members of hermesd-clients connect and get served; others are refused.
    assert f["runtime_dir"] == {"mode": "0o750", "gid": f["clients_gid"]}
    assert probe["socket"]["mode"] == "0o770" and probe["socket"]["gid"] == f["clients_gid"]
    assert f["client_root"]["connect"] == "ok"
    assert f["client_member"]["connect"] == "ok"
    assert f["client_member"]["reply"]["echo"] == {"ping": "client"}
    assert f["client_other"]["connect"].startswith("13 "), f["client_other"]  # EACCES

    # Negative control: MemoryDenyWriteExecute=yes loses bf16 (oneDNN JIT) but keeps fp32.
    control = f["mdwe_control"]
    assert control["fp32_matmul"]["ok"], control
    if control["mkldnn_bf16_supported"]:
        assert not control["bf16_matmul"]["ok"], control
        assert "could not create a primitive" in control["bf16_matmul"]["error"], control

    # systemctl stop: SIGTERM -> STOPPING=1 -> exit 0, well inside TimeoutStopSec.
    assert f["stop"]["rc"] == 0 and f["probe_stop"] is not None, why
    assert f["after_stop"]["Result"] == "success" and f["after_stop"]["ExecMainStatus"] == "0", f["after_stop"]
    assert f["stop_seconds"] < 45
    assert f["after_start"]["NRestarts"] == "0"

    # The host-side memory cap held the whole container (the harness's way to cap and measure).
    assert result.memory and result.memory["oom_kill"] == 0 and 0 < result.memory["peak"] <= MEMORY_LIMIT
