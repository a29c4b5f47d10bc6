"""Progress bars of `hermesd convert` and `hermesd profile` (issue 16): drawn on a terminal (a real
pseudo-terminal here), absent when stderr is not one, and absent with --quiet, transformers' too."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios

import pytest
from daemon_support import CHILD_PATH
from pty_support import read_terminal

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": CHILD_PATH}
ENV.pop("TQDM_DISABLE", None)
# A tqdm bar as it draws itself: "  38%|███▊      | 3/8 [00:01<00:02, ...]"
BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")


def in_terminal(*args: str) -> tuple[int, str]:
    """Run ``hermesd ARGS`` with stdout and stderr on a pseudo-terminal of 120 columns; (status, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # tqdm sizes bars to the width
    proc = subprocess.Popen([sys.executable, "-m", "hermesd.cli", *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env=ENV)
    os.close(slave)
    output = read_terminal(master, 300)
    os.close(master)
    return proc.wait(60), output.decode(errors="replace")


def piped(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hermesd.cli", *args], capture_output=True, text=True,
                          timeout=300, env=ENV)


def test_convert_draws_a_stage_bar_only_on_a_terminal(minilm, tmp_path):
    source, _ = minilm
    status, output = in_terminal("convert", str(source), str(tmp_path / "tty"))
    assert status == 0, output
    assert BAR.search(output) and "8/8" in output and "stage/s" in output, output
    assert "MiB pooler" in output, "the bar names the stage written and the bytes so far"
    done = piped("convert", str(source), str(tmp_path / "piped"))
    assert done.returncode == 0 and not BAR.search(done.stderr) and "\r" not in done.stderr
    assert "[8/8] pooler" in done.stderr, "off a terminal: one plain line per stage"
    status, output = in_terminal("convert", "--quiet", str(source), str(tmp_path / "quiet"))
    assert status == 0 and not BAR.search(output) and "[1/8]" not in output, output
    assert output.strip().splitlines()[-1].startswith("wrote "), output


def test_profile_draws_a_bar_of_the_stages_it_profiles(minilm, tmp_path):
    store = tmp_path / "minilm"  # a hard-linked copy: the profile lands there, not in the shared store
    shutil.copytree(minilm[1], store, copy_function=os.link)
    status, output = in_terminal("profile", str(store))
    assert status == 0, output
    assert BAR.search(output) and "32/32" in output and "pass 4/4" in output, output  # 4 passes x 8 stages
    assert re.search(r"^8 stages: cold load", output, re.M), output
