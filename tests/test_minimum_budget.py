"""`hermesd info`, `plan`, `run` and `serve --check` quote one minimum budget for one workload (issue 16),
with the real bundled models, and `run` works at exactly that minimum. The store is profiled by a
separate `hermesd profile` process (as a user would); the commands then run through ``hermesd.cli.main``
in this process, which saves a torch import per command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_support import CHILD_PATH, write_config

from hermesd.cli import main

WORKLOAD = "64:8"
ENV = {**os.environ, "PYTHONPATH": CHILD_PATH}
CASES = {"smollm2": ("generate", "What is the capital of France?", "Paris"),
         "minilm": ("embed", "a sentence to embed", "dims")}


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def hermesd(capsys):
    """Run ``hermesd ARGS`` through its real entry point; (status, stdout, stderr)."""
    def run(*args: str) -> Done:
        capsys.readouterr()
        status = main(list(args))
        out, err = capsys.readouterr()
        return Done(status, out, err)
    return run


def refused_minimum(done: Done) -> int:
    """The exact minimum a refusal names ("... give at least N bytes")."""
    assert done.returncode in (1, 78), done
    found = re.search(r"below the minimum .*give at least (\d+) bytes", done.stderr)
    assert found, done.stderr
    return int(found.group(1))


@pytest.fixture(params=sorted(CASES))
def profiled_store(request, tmp_path: Path) -> tuple[str, Path]:
    """A hard-linked copy of a real store (the profile lands in the copy, not the shared fixture), profiled."""
    _, source = request.getfixturevalue(request.param)
    store = tmp_path / request.param
    shutil.copytree(source, store, copy_function=os.link)
    profiled = subprocess.run([sys.executable, "-m", "hermesd.cli", "profile", "--quiet", str(store)], env=ENV,
                              capture_output=True, text=True, timeout=300)
    assert profiled.returncode == 0, profiled.stderr
    return request.param, store


def test_info_plan_run_and_serve_agree_on_the_minimum(profiled_store, hermesd, tmp_path):
    name, store = profiled_store
    task, prompt, expected = CASES[name]
    info = json.loads(hermesd("info", str(store), "--workload", WORKLOAD, "--json").stdout)
    minimum = info["minimum_budget"]
    assert info["minimum_source"] == "profile" and info["minimum_workload"] == "p64-n8-b1"
    assert refused_minimum(hermesd("plan", str(store), "--workload", WORKLOAD, "--memory-budget", "1MiB")) == minimum
    run = ["run", str(store), "--task", task, "--workload", WORKLOAD, "--max-new-tokens", "8"]
    below = hermesd(*run, "--memory-budget", str(minimum - (8 << 20)), prompt)
    assert refused_minimum(below) == minimum and below.stderr.count("\n") == 1, ("one clear line", below.stderr)
    assert "64-token prompt and 8 new tokens" in below.stderr
    config = write_config(tmp_path / "daemon", {name: {"store": store, "memory_budget": "1MiB",
                                                       "max_prompt_tokens": 64, "max_new_tokens": 8}})
    assert refused_minimum(hermesd("serve", "--check", "--config", str(config))) == minimum
    at = hermesd(*run, "--memory-budget", str(minimum), prompt)
    assert at.returncode == 0 and expected in at.stdout, at.stderr
