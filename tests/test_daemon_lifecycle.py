"""The daemon's life as systemd sees it: notify messages, watchdog, drain, crash recovery, reload, bad config.

Every test runs real ``hermesd serve`` processes with a real NOTIFY_SOCKET and the real client.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon_support import CHILD_PATH, NotifySocket, start_daemon, wait_for_state, write_config
from hermes_client import ServerError
from hooked_daemon import hang_input

PROMPT = "w5 w17 w230 w42"


def _models(stores, **extra):
    return {"llama": {"store": stores["llama"], "max_new_tokens": 32},
            "bert": {"store": stores["bert"]}, **extra}


def test_notify_ready_status_watchdog_and_stopping(daemon_stores, tmp_path):
    """READY=1 after loading; STATUS= with queue and job; WATCHDOG=1 only while the executor progresses."""
    write_config(tmp_path, _models(daemon_stores), executor_stall_s=1.5)
    daemon = start_daemon(tmp_path, env={"WATCHDOG_USEC": "1000000"}, hooked=True)  # ping every 0.5 s
    notify = daemon.notify
    ready = notify.wait_for(lambda m: m.get("READY") == "1", 1)
    assert ready["STATUS"].startswith("ready: 0 queued; idle") and ready["MAINPID"] == str(daemon.proc.pid)
    assert any("EXTEND_TIMEOUT_USEC" in m for m in notify.messages)  # asked for time while loading models
    pings = [m for m in notify.drain(2.0) if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 3

    client = daemon.client()
    job = client.submit("embed", "bert", hang_input(6))  # a wedged engine: no stage progress for 6 s
    notify.wait_for(lambda m: "running " + job.id in m.get("STATUS", ""), 10)
    notify.drain(2.0)  # past executor_stall_s: from here on the daemon withholds pings
    silent = notify.drain(2.0)
    assert not [m for m in silent if m.get("WATCHDOG") == "1"], silent
    assert "withholding watchdog pings" in daemon.log()
    assert client.ping()["state"] == "ready"  # the socket loop itself still answers
    job.result(30)
    resumed = notify.drain(2.0)
    assert [m for m in resumed if m.get("WATCHDOG") == "1"], "pings did not resume after the job"

    daemon.send_signal(signal.SIGTERM)
    stopping = notify.wait_for(lambda m: m.get("STOPPING") == "1", 30)
    assert stopping["STATUS"].startswith("draining")
    assert daemon.stop() == 0


def test_sigterm_drains_the_running_job_and_keeps_the_queue_for_the_next_start(daemon_stores, tmp_path):
    write_config(tmp_path, _models(daemon_stores), drain_timeout_s=60)
    daemon = start_daemon(tmp_path, hooked=True)
    client = daemon.client()
    running = client.submit("embed", "bert", hang_input(3))
    wait_for_state(client, running.id, "running")
    queued = [client.submit("embed", "bert", f"w{i}") for i in range(2, 5)]
    daemon.send_signal(signal.SIGTERM)
    daemon.notify.wait_for(lambda m: m.get("STOPPING") == "1", 10)
    with pytest.raises(ServerError) as info:  # draining: no new work
        client.submit("embed", "bert", "w9")
    assert info.value.code == "shutting_down"
    assert running.result(60)["dimensions"] == 64  # the running job finished and its reply went out
    assert daemon.stop(keep_clients=True) == 0
    assert "3 job(s) left queued in the journal" in daemon.log()

    # Lazy Pirate: a request sent while no daemon runs is resent until the next one answers.
    waiting = daemon.client(timeout=2.0, retries=90)
    answer: list = []
    pinger = threading.Thread(target=lambda: answer.append(waiting.ping()))
    pinger.start()
    again = start_daemon(tmp_path, hooked=True)
    pinger.join(200)
    assert answer and answer[0]["state"] == "ready"
    for job in queued:  # the old handles, whose pushes went to a dead daemon, find their results by id
        assert job.result(120)["dimensions"] == 64
    assert again.client().job(queued[0].id)["attempts"] == 1
    daemon.close_clients()
    assert again.stop() == 0


def test_sigkill_loses_no_accepted_job_and_runs_each_to_the_end_once(daemon_stores, tmp_path):
    write_config(tmp_path, _models(daemon_stores))
    daemon = start_daemon(tmp_path, hooked=True)
    client = daemon.client()
    running = client.submit("embed", "bert", hang_input(30))
    wait_for_state(client, running.id, "running")
    queued = [client.submit("generate", "llama", PROMPT, {"max_new_tokens": 4}),
              client.submit("embed", "bert", "w2"), client.submit("embed", "bert", "w3")]
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL

    again = start_daemon(tmp_path)  # the same state directory, as after Restart=on-failure (no hook: the job just runs)
    client = again.client()
    ids = [running.id] + [job.id for job in queued]
    records = {job_id: wait_for_state(client, job_id, "done", timeout=120) for job_id in ids}
    assert records[running.id]["attempts"] == 2  # it was running at the kill, so it ran again
    assert all(records[job.id]["attempts"] == 1 for job in queued)  # queued ones ran exactly once
    assert records[queued[0].id]["result"]["new_tokens"] == 4
    assert f"job {running.id} was running when the daemon stopped" in again.log()
    assert again.stop() == 0
    with sqlite3.connect(tmp_path / "state" / "journal.sqlite3") as db:
        states = db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
    assert states == [("done", 4)]


def test_a_cancel_acknowledged_just_before_a_crash_is_not_forgotten(daemon_stores, tmp_path):
    write_config(tmp_path, _models(daemon_stores))
    daemon = start_daemon(tmp_path, hooked=True)
    client = daemon.client()
    job = client.submit("embed", "bert", hang_input(4))  # running, no stage reached yet
    wait_for_state(client, job.id, "running")
    assert client.cancel(job.id) is True
    daemon.proc.kill()  # SIGKILL right after the acknowledgement
    daemon.stop()
    again = start_daemon(tmp_path, hooked=True)
    record = again.client().job(job.id)
    assert record["state"] == "cancelled" and record["cancel_requested"] is not None, record
    time.sleep(5)  # longer than the job would have taken had it been run again
    assert again.client().job(job.id)["state"] == "cancelled"
    assert "it stays cancelled" in again.log()
    assert again.stop() == 0


def test_state_and_journal_are_private_whatever_the_umask(daemon_stores, tmp_path):
    from hermesd.daemon.journal import Journal

    write_config(tmp_path, _models(daemon_stores))
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    Journal(state / "journal.sqlite3").close()  # a journal left world-readable by an older hermesd
    os.chmod(state / "journal.sqlite3", 0o644)
    daemon = start_daemon(tmp_path, preexec=lambda: os.umask(0))  # the most permissive umask there is
    client = daemon.client()
    client.embed("bert", "w1")  # the journal has been written to (its -wal file exists)

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    assert mode(state) == 0o700
    journal_files = [p for p in state.iterdir() if p.name.startswith("journal.sqlite3")]
    assert len(journal_files) >= 2 and {p.name: mode(p) for p in journal_files} == \
        {p.name: 0o600 for p in journal_files}
    assert mode(state / "hermesd.lock") == 0o600
    socket_path = tmp_path / "run" / "hermesd.sock"
    assert mode(socket_path) == 0o660
    assert mode(socket_path.parent) == 0o710  # group members may reach the socket, no one may list
    assert daemon.stop() == 0


def test_sighup_reloads_config_and_queued_jobs_survive(daemon_stores, tmp_path):
    write_config(tmp_path, _models(daemon_stores), queue_size=4)
    daemon = start_daemon(tmp_path, hooked=True)
    client = daemon.client()
    blocker = client.submit("embed", "bert", hang_input(3))
    wait_for_state(client, blocker.id, "running")
    queued = [client.submit("embed", "bert", f"w{i}") for i in (2, 3)]

    write_config(tmp_path, _models(daemon_stores, cls={"store": daemon_stores["bert-cls"]}),
                 queue_size=8)
    before = len(daemon.notify.messages)
    daemon.send_signal(signal.SIGHUP)
    daemon.notify.wait_for(lambda m: m.get("RELOADING") == "1", 10, since=before)
    daemon.notify.wait_for(lambda m: m.get("READY") == "1", 10, since=before)
    labels = client.classify("cls", "w4 w5", timeout=60)["labels"]  # the model added by the reload
    assert len(labels[0]) == 3
    for job in queued:
        assert job.result(60)["dimensions"] == 64

    (tmp_path / "hermesd.toml").write_text("queue_size = 'lots'\n[models.x]\nstore = 1\n")
    daemon.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in daemon.log():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.embed("bert", "w6")["dimensions"] == 64  # still serving on the old config

    write_config(tmp_path, _models(daemon_stores, bert={"store": daemon_stores["bert"],
                                                        "defaults": {"embed": {"normalise": True}}}))
    daemon.send_signal(signal.SIGHUP)  # a typo in a default is refused too, not applied to every job
    deadline = time.monotonic() + 10
    while "models.bert.defaults.embed" not in daemon.log():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.embed("bert", "w6")["dimensions"] == 64
    assert daemon.stop() == 0


def _serve(config, *extra, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "hermesd.cli", "serve", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": CHILD_PATH, **(env or {})})


def test_bad_config_exits_78_with_a_message_naming_the_field(daemon_stores, tmp_path):
    config = write_config(tmp_path, {"bert": {"store": daemon_stores["bert"], "memory_budget": "plenty"}})
    result = _serve(config)
    assert result.returncode == 78
    assert "models.bert.memory_budget" in result.stderr and "not a size: 'plenty'" in result.stderr
    assert "Traceback" not in result.stderr

    config = write_config(tmp_path, {"bert": {"store": tmp_path / "no-such-store"}})
    result = _serve(config)
    assert result.returncode == 78 and "models.bert.store" in result.stderr

    config = write_config(tmp_path, {"bert": {"store": daemon_stores["bert"], "memory_budget": "1MiB"}})
    result = _serve(config)
    assert result.returncode == 78 and "models.bert.memory_budget" in result.stderr and "minimum" in result.stderr

    assert _serve(tmp_path / "missing.toml").returncode == 78
    config = write_config(tmp_path, {"bert": {"store": daemon_stores["bert"]}})
    assert _serve(config, env={"HERMESD_QUEUE_SIZE": "0"}).returncode == 78  # environment overrides count too
    checked = _serve(config, "--check")
    assert checked.returncode == 0 and "config ok: 1 model(s)" in checked.stdout and "bert: BertModel" in checked.stdout


CHECKED = [  # (model settings or top-level settings, what the error must name); serve --check says it first
    ({"defaults": {"embed": {"normalise": True}}}, "models.bert.defaults.embed: unknown parameter(s) ['normalise']"),
    ({"defaults": {"embed": {"pooling": "max"}}}, "models.bert.defaults.embed: pooling must be"),
    ({"defaults": {"generate": {"max_new_tokens": 8}}}, "models.bert.defaults.generate: BertModel is not a causal"),
    ({"memory_budget": "1MiB"}, "models.bert.memory_budget"),
    ({"store": "no-such-store"}, "models.bert.store"),
    ({"tcp_endpoint": "tcp://127.0.0.1:1"}, "hermesd keys"),
    ({"image_dirs": ["/no/such/dir"]}, "image_dirs: /no/such/dir"),
]


def test_serve_check_refuses_what_serve_would(daemon_stores, tmp_path):
    from hermesd.daemon.config import ConfigError, load_settings
    from hermesd.daemon.preflight import check_settings

    for fields, named in CHECKED:  # in-process: the function `serve --check` and `serve` run
        top = {k: v for k, v in fields.items() if k in ("tcp_endpoint", "image_dirs")}
        model = {"store": daemon_stores["bert"], **{k: v for k, v in fields.items() if k not in top}}
        if model["store"] == "no-such-store":
            model["store"] = tmp_path / "no-such-store"
        with pytest.raises(ConfigError) as info:
            check_settings(load_settings(write_config(tmp_path, {"bert": model}, **top)))
        assert named in str(info.value), (fields, str(info.value))
    config = write_config(tmp_path, {"bert": {"store": daemon_stores["bert"],
                                              "defaults": {"embed": {"normalise": True}}}})
    checked = _serve(config, "--check")
    assert checked.returncode == 78 and CHECKED[0][1] in checked.stderr and "Traceback" not in checked.stderr
    served = _serve(config)  # serve itself refuses the typo too, before it takes a job
    assert served.returncode == 78 and "normalise" in served.stderr


def test_a_second_daemon_on_the_same_state_directory_refuses_to_start(daemon_stores, tmp_path):
    write_config(tmp_path, _models(daemon_stores))
    daemon = start_daemon(tmp_path)
    second = _serve(tmp_path / "hermesd.toml")
    assert second.returncode == 70 and "another hermesd is running" in second.stderr
    assert daemon.client().ping()["state"] == "ready"  # and the first one still owns its socket
    assert daemon.stop() == 0


def test_notify_socket_helper_sees_datagrams(tmp_path):
    """The test's stand-in for systemd receives what sdnotify sends (guards the other tests' premise)."""
    notify = NotifySocket(tmp_path / "n.sock")
    code = "import sdnotify; sdnotify.SystemdNotifier().notify('READY=1\\nSTATUS=hello')"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "NOTIFY_SOCKET": str(notify.path)}, check=True)
    assert notify.wait_for(lambda m: m.get("READY") == "1", 5)["STATUS"] == "hello"
    notify.close()


@pytest.mark.slow
def test_the_client_installs_and_runs_without_torch(tmp_path):
    """pip install ./client into a bare venv: pyzmq and msgpack only; `hermes` runs."""
    checkout = Path(__file__).resolve().parent.parent
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    str(checkout / "client")], check=True, timeout=600)
    probe = ("import sys, importlib.metadata as m, hermes_client; "
             "print('torch' in sys.modules, m.version('hermesd-client') == hermes_client.__version__)")
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False True"  # distribution hermesd-client, one version source
    version = subprocess.run([str(venv / "bin" / "hermes"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == "hermes 0.1.0"
    has_torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert has_torch.returncode != 0
    ping = subprocess.run([str(venv / "bin" / "hermes"), "--endpoint", "ipc:///nonexistent/x", "--timeout", "0.2",
                           "--retries", "0", "ping"], capture_output=True, text=True)
    assert ping.returncode == 69
