"""systemd/hermesd-mqtt.service: verifies clean and its exposure stays within the daemon's limit."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from container import CHECKOUT

pytestmark = pytest.mark.systemd

UNIT = CHECKOUT / "systemd" / "hermesd-mqtt.service"
MAX_EXPOSURE = 2.0


def test_bridge_unit_verifies_clean_and_exposure_within_limit() -> None:
    """As for hermesd.service: ``verify`` against a stub ExecStart on a private tmpfs, then the offline score."""
    if not shutil.which("systemd-analyze") or not shutil.which("unshare"):
        pytest.skip("systemd-analyze or unshare missing")
    script = ("set -e; mount -t tmpfs tmpfs /opt; mkdir -p /opt/hermesd/bin;"
              "printf '#!/bin/sh\\nexit 0\\n' > /opt/hermesd/bin/hermesd; chmod +x /opt/hermesd/bin/hermesd;"
              f"systemd-analyze verify --man=no {UNIT}")
    verify = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True)
    if verify.returncode != 0 and "unshare failed" in verify.stderr:
        pytest.skip(f"cannot make a private mount namespace for the ExecStart stub: {verify.stderr.strip()}")
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                              capture_output=True, text=True)
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert level, security.stdout + security.stderr
    assert float(level.group(1)) <= MAX_EXPOSURE, security.stdout
