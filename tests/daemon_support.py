"""Helpers for tests against a real ``hermesd serve`` process: config files, a real NOTIFY_SOCKET, a tokenizer.

A test starts the daemon as a subprocess with a TOML config it writes, listens on a datagram socket
as systemd would (NOTIFY_SOCKET), and talks to it through the real client over ipc://.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hermes_client import Client

READY_TIMEOUT_S = 180.0  # torch + transformers import and model loading on a busy 2-core machine
HOOKED_DAEMON = Path(__file__).with_name("hooked_daemon.py")
REPO = Path(__file__).resolve().parent.parent
# The daemon under test imports this checkout's hermesd and hermes_client, not whatever copy the venv
# has installed (an editable install may point at another worktree).
CHILD_PATH = os.pathsep.join([str(REPO), str(REPO / "client"), *filter(None, [os.environ.get("PYTHONPATH")])])
STARTED: list[subprocess.Popen] = []  # every daemon a test started; conftest kills leftovers at session end


def toml_dumps(data: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for test configs: scalars, lists of scalars, nested tables."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    text = "\n".join(lines) + "\n"
    for key, value in tables:
        name = f"{prefix}.{key}" if prefix else key
        text += f"\n[{name}]\n" + toml_dumps(value, name)
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket; keeps every message received."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []
        self.times: list[float] = []

    def _collect(self, timeout: float) -> None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            return
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        self.times.append(time.monotonic())

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float, since: int = 0) -> dict[str, str]:
        """The first message from index ``since`` on (received, or arriving within ``timeout``) that matches."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching notify message in {timeout} s; got {self.messages[-5:]}")
            self._collect(min(left, 0.5))

    def drain(self, seconds: float) -> list[dict[str, str]]:
        """Everything that arrives in the next ``seconds``."""
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._collect(min(left, 0.2))
        return self.messages[start:]

    def close(self) -> None:
        self.sock.close()


@dataclass
class RunningDaemon:
    """A hermesd process started by a test."""

    proc: subprocess.Popen
    root: Path
    config_path: Path
    endpoint: str
    notify: NotifySocket
    log_path: Path
    clients: list[Client] = field(default_factory=list)

    def client(self, **kwargs: Any) -> Client:
        client = Client(self.endpoint, **({"timeout": 30.0, "retries": 2} | kwargs))
        self.clients.append(client)
        return client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0, keep_clients: bool = False) -> int:
        """Signal the daemon and return its exit status (clients are closed unless ``keep_clients``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            if not keep_clients:
                self.close_clients()

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()


def wait_for_state(client: Client, job_id: str, state: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll a job's record until it reaches ``state``; returns the record."""
    deadline = time.monotonic() + timeout
    while (record := client.job(job_id))["state"] != state:
        assert time.monotonic() < deadline, f"job {job_id} stayed {record['state']}"
        time.sleep(0.05)
    return record


def write_config(root: Path, models: dict[str, dict[str, Any]], **settings: Any) -> Path:
    """A config under ``root`` (runtime and state dirs inside it) serving ``models``."""
    config = {"runtime_dir": str(root / "run"), "state_dir": str(root / "state"), "log_level": "debug",
              "heartbeat_s": 1.0, **settings,
              "models": {name: {k: (str(v) if isinstance(v, Path) else v) for k, v in model.items()}
                         for name, model in models.items()}}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "hermesd.toml"
    path.write_text(toml_dumps(config), encoding="utf-8")
    return path


def start_daemon(root: Path, config_path: Path | None = None, env: dict[str, str] | None = None,
                 wait_ready: bool = True, notify: NotifySocket | None = None,
                 preexec: Callable[[], None] | None = None, hooked: bool = False) -> RunningDaemon:
    """Start ``hermesd serve`` on ``root/hermesd.toml`` with a real NOTIFY_SOCKET; wait for READY=1.

    ``hooked``: start it through tests/hooked_daemon.py, whose executor hook wedges on "hang:N" inputs.
    """
    root.mkdir(parents=True, exist_ok=True)
    config_path = config_path or root / "hermesd.toml"
    notify = notify or NotifySocket(root / f"notify-{time.monotonic_ns()}.sock")
    log_path = root / "daemon.log"
    environment = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": CHILD_PATH, **(env or {})}
    with open(log_path, "ab") as log:
        command = [str(HOOKED_DAEMON)] if hooked else ["-m", "hermesd.cli", "serve"]
        proc = subprocess.Popen([sys.executable, *command, "--config", str(config_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=environment, preexec_fn=preexec)
    STARTED.append(proc)
    daemon = RunningDaemon(proc, root, config_path, f"ipc://{root / 'run' / 'hermesd.sock'}", notify, log_path)
    if wait_ready:
        try:
            notify.wait_for(lambda m: m.get("READY") == "1", READY_TIMEOUT_S)
        except AssertionError:
            proc.kill()
            raise AssertionError(f"daemon never became ready; log:\n{daemon.log()}") from None
    return daemon


def save_tiny_tokenizer(store: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``vocab_size`` made-up words (id 0 is end of text), saved into ``store``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "[UNK]", "[PAD]"] + [f"w{i}" for i in range(vocab_size - 3)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="<eos>")
    fast.save_pretrained(store)
