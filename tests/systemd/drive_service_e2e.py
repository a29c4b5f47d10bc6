"""Driver (runs inside the container as root): the shipped hermesd.service through its whole life.

One boot, phases in order, each recorded in findings.json under its own key (the host test asserts):
  start      systemctl start: activating until READY=1, STATUS= in `systemctl status`, hardening in the process
  clients    generate (SmolLM2 bf16: Paris) and embed (MiniLM) as a member of hermesd-clients; others refused
  reload     systemctl reload with a changed config while jobs are queued: same process, jobs all finish
  kill9      kill -9 of the main process with a job running and jobs queued: restarted, every job done
  watchdog   a wedged executor (testing hook): pings stop, systemd kills and restarts, journal finishes jobs
  stop       systemctl stop during a job: STOPPING=1 (its STATUS= text), exit 0, queued jobs stay journaled
  badconfig  an invalid config: exit 78, no restart loop; fixed config: start, the journaled jobs run
Client work runs as ``nobody`` through ``e2e_client.py`` (payload), never as root.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import driverlib as d

UNIT = "hermesd.service"
CONFIG = Path("/etc/hermesd/hermesd.toml")
JOURNAL_DB = Path("/var/lib/private/hermesd/journal.sqlite3")
PYTHON = "/opt/hermesd/bin/python"
HERMES = "/opt/hermesd/bin/hermes"
CLIENT = "/hermesd-test/e2e_client.py"
NOBODY = 65534
PARIS_PROMPT = "What is the capital of France?"
PROPS = ("ActiveState", "SubState", "Result", "MainPID", "NRestarts", "StatusText", "ExecMainCode",
         "ExecMainStatus", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "WatchdogUSec")
EMBED = {"task": "embed", "model": "minilm", "inputs": ["a journaled sentence"], "params": {"normalize": True}}
GENERATE = {"task": "generate", "model": "smollm2", "inputs": PARIS_PROMPT, "params": {"max_new_tokens": 24}}


# -- helpers ------------------------------------------------------------------------------------------
def clients_gid() -> int:
    return grp.getgrnam("hermesd-clients").gr_gid


def client(request: dict[str, Any], member: bool = True, timeout: float = 400) -> dict[str, Any]:
    """Run e2e_client.py as nobody (in hermesd-clients when ``member``); its JSON answer."""
    done = d.sh(PYTHON, CLIENT, json.dumps(request), user=NOBODY, group=NOBODY,
                extra_groups=[clients_gid()] if member else [], timeout=timeout)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"client_failed": d.result(done)}


def props() -> dict[str, str]:
    return d.show(UNIT, *PROPS)


def submit(*jobs: dict[str, Any]) -> list[str]:
    answer = client({"op": "submit", "jobs": list(jobs)})
    ids = answer.get("ids") or []
    if len(ids) != len(jobs) or not all(ids):
        raise RuntimeError(f"submit failed: {answer}")
    return ids


def wait_jobs(ids: list[str], timeout: float = 300, until: tuple[str, ...] = ("done", "failed", "cancelled")) -> dict:
    return client({"op": "wait", "ids": ids, "timeout": timeout, "until": list(until)}, timeout=timeout + 60)


def brief(records: dict[str, Any]) -> dict[str, Any]:
    """Job records without bulky results: state, attempts, error, and the text or embedding size."""
    out = {}
    for job_id, rec in (records or {}).items():
        if rec is None:
            out[job_id] = None
            continue
        result = rec.get("result") or {}
        out[job_id] = {"state": rec["state"], "attempts": rec["attempts"], "error": rec.get("error"),
                       "task": rec["task"], "text": result.get("text"),
                       "embeddings": len(result.get("embeddings") or []) or None}
    return out


def wait_running(job_id: str, timeout: float = 120) -> bool:
    return bool(d.wait_until(
        lambda: (client({"op": "records", "ids": [job_id]})["records"][job_id] or {}).get("state") == "running",
        timeout, interval=0.3))


def journal_db_states(ids: list[str]) -> dict[str, Any]:
    """Job states straight from the SQLite journal on disk (read-only), as the next start will see them."""
    db = sqlite3.connect(f"file:{JOURNAL_DB}?mode=ro", uri=True)
    try:
        rows = db.execute(f"SELECT id, state, attempts FROM jobs WHERE id IN ({','.join('?' * len(ids))})", ids)
        return {row[0]: {"state": row[1], "attempts": row[2]} for row in rows}
    finally:
        db.close()


def unit_journal(since_usec: int = 0) -> list[dict[str, Any]]:
    """The unit's journal lines (systemd's about it and the daemon's own) with monotonic µs timestamps."""
    out = d.sh("journalctl", "-u", UNIT, "-o", "json", "--no-pager", "--output-fields=MESSAGE,_PID").stdout
    lines = []
    for raw in out.splitlines():
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError:
            continue
        usec = int(entry.get("__MONOTONIC_TIMESTAMP", 0))
        message = entry.get("MESSAGE")
        if isinstance(message, list):  # journald hands over non-UTF-8 messages as byte arrays
            message = bytes(message).decode(errors="replace")
        if usec >= since_usec:
            lines.append({"usec": usec, "pid": entry.get("_PID"), "message": message})
    return lines


def messages(since_usec: int = 0) -> list[str]:
    return [line["message"] for line in unit_journal(since_usec)]


def watch(until: list[str], timeout: float, new_pid_of: str | None = None) -> list[dict[str, str]]:
    """Distinct (state, StatusText, MainPID) seen until ActiveState/SubState is one of ``until``
    (and, with ``new_pid_of``, the main PID is another one than that: a restart, not the old process)."""
    seen: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = d.show(UNIT, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
        entry = {"state": f"{p['ActiveState']}/{p['SubState']}", "status": p["StatusText"], "pid": p["MainPID"],
                 "restarts": p["NRestarts"], "t": round(time.monotonic(), 2)}
        if not seen or {k: v for k, v in seen[-1].items() if k != "t"} != {k: v for k, v in entry.items() if k != "t"}:
            seen.append(entry)
        if entry["state"] in until and (new_pid_of is None or entry["state"] == "failed/failed"
                                        or entry["pid"] not in (new_pid_of, "0")):
            break
        time.sleep(0.05)
    return seen


@contextlib.contextmanager
def pid1_debug() -> Iterator[None]:
    """systemd (PID 1) at log level debug: it then journals every sd_notify message it gets
    ("Got notification message from PID N (READY=1, STATUS=...)"), the proof of what the daemon sent."""
    d.sh("systemd-analyze", "log-level", "debug", check=True)
    try:
        yield
    finally:
        d.sh("systemd-analyze", "log-level", "info")


def notifications(since_usec: int) -> list[str]:
    return [m for m in messages(since_usec) if m and "Got notification message" in m]


# -- phases -------------------------------------------------------------------------------------------
def phase_start() -> None:
    d.record("unit_cat", d.sh("systemctl", "cat", UNIT).stdout)
    security = d.sh("systemd-analyze", "security", "--no-pager", UNIT)
    d.record("exposure", d.exposure(UNIT))
    d.record("security_table", security.stdout[-6000:])
    t0 = d.monotonic_usec()
    with pid1_debug():
        d.sh("systemctl", "start", "--no-block", UNIT, check=True)
        d.record("start_watch", watch(["active/running", "failed/failed", "inactive/dead"], 300))
    after = d.record("after_start", props())
    d.record("start_journal", [ln for ln in unit_journal(t0) if "Got notification" not in (ln["message"] or "")
                               or "READY=1" in ln["message"]])
    d.record("start_notifications", [m[:300] for m in notifications(t0) if "WATCHDOG=1" not in m])
    d.record("systemctl_status", d.sh("systemctl", "status", "--no-pager", "--lines=0", UNIT).stdout)
    # after the start: --check reads the stores, and with DynamicUser the /var/lib/hermesd link to the
    # private state directory exists only once the service has run
    d.record("config_check", d.result(d.sh("/opt/hermesd/bin/hermesd", "serve", "--check", "--config", str(CONFIG))))
    if after["ActiveState"] != "active":
        raise SystemExit(1)

    pid = after["MainPID"]
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    d.record("process", {k: status[k].strip() for k in ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "CapEff",
                                                          "CapBnd", "CapPrm")})
    d.record("namespaces", {ns: os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/1/ns/{ns}")
                            for ns in ("mnt", "net", "ipc", "uts", "user")})
    d.record("process_env", sorted(k for k in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
                                   if k.startswith(("WATCHDOG_USEC", "NOTIFY_SOCKET", "RUNTIME_DIRECTORY",
                                                    "STATE_DIRECTORY"))))
    runtime = os.stat("/run/hermesd")
    sock = os.stat("/run/hermesd/hermesd.sock")
    d.record("runtime_dir", {"mode": oct(stat.S_IMODE(runtime.st_mode)), "gid": runtime.st_gid})
    d.record("socket", {"mode": oct(stat.S_IMODE(sock.st_mode)), "gid": sock.st_gid, "uid": sock.st_uid})
    d.record("clients_gid", clients_gid())
    d.record("dynamic_user", d.sh("getent", "passwd", "hermesd").stdout.strip())


def phase_clients() -> None:
    d.record("client_generate", client({"op": "generate", "model": "smollm2", "inputs": PARIS_PROMPT,
                                        "params": {"max_new_tokens": 24}}))
    texts = ["A cat sits on the mat.", "There is a cat sitting on a mat.", "Stock markets fell sharply today."]
    d.record("client_embed", client({"op": "embed", "model": "minilm", "inputs": texts,
                                     "params": {"normalize": True}}))
    cli = d.sh(HERMES, "--json", "--timeout", "60", "generate", "--model", "smollm2", "--max-new-tokens", "24",
               PARIS_PROMPT, user=NOBODY, group=NOBODY, extra_groups=[clients_gid()], timeout=300)
    d.record("cli_generate", d.result(cli))
    d.record("connect_member", client({"op": "connect"}))
    d.record("connect_other", client({"op": "connect"}, member=False))
    other = d.sh(HERMES, "--timeout", "2", "--retries", "0", "ping", user=NOBODY, group=NOBODY, extra_groups=[],
                 timeout=60)
    d.record("cli_other", d.result(other))


def write_config(text: str) -> None:
    CONFIG.write_text(text)
    CONFIG.chmod(0o644)


def phase_reload(good_config: str) -> None:
    before = props()
    over_limit = dict(GENERATE, params={"max_new_tokens": 48})
    d.record("reload_refused_before", client({"op": "submit", "jobs": [over_limit]}))
    hold = dict(EMBED, inputs=["hang:8"])  # the executor hook holds it 8 s: busy while we reload
    ids = submit(hold, GENERATE, EMBED)
    d.record("reload_running_first", wait_running(ids[0]))
    write_config(good_config.replace("max_new_tokens = 32", "max_new_tokens = 64"))
    t0 = d.monotonic_usec()
    started = time.monotonic()
    with pid1_debug():
        d.record("reload", d.result(d.sh("systemctl", "reload", UNIT, timeout=120)))
        d.record("reload_seconds", time.monotonic() - started)
        time.sleep(1)
    d.record("reload_notifications", [m[:300] for m in notifications(t0) if "WATCHDOG=1" not in m])
    d.record("reload_queued_after", {"ids": ids, "records": brief(client({"op": "records", "ids": ids})["records"])})
    accepted = client({"op": "submit", "jobs": [over_limit]})
    d.record("reload_accepted_after", accepted)
    all_ids = ids + [i for i in accepted.get("ids", []) if i]
    done = wait_jobs(all_ids, 300)
    d.record("reload_jobs", {"ids": all_ids, "complete": done.get("complete"), "records": brief(done.get("records"))})
    d.record("reload_props", {"before": before, "after": props()})
    d.record("reload_journal", messages(t0))
    write_config(good_config)  # back to the shipped test config; the next restart reads it


def phase_kill9() -> None:
    before = props()
    ids = submit(GENERATE, EMBED, GENERATE, EMBED)
    d.record("kill9_running_first", wait_running(ids[0]))
    t0 = d.monotonic_usec()
    d.record("kill9_pre_records", brief(client({"op": "records", "ids": ids})["records"]))
    os.kill(int(before["MainPID"]), 9)
    d.record("kill9_watch", watch(["active/running", "failed/failed"], 300, new_pid_of=before["MainPID"]))
    done = wait_jobs(ids, 300)
    d.record("kill9_jobs", {"ids": ids, "complete": done.get("complete"), "records": brief(done.get("records"))})
    d.record("kill9_props", {"before": before, "after": props()})
    d.record("kill9_journal", messages(t0))


def phase_watchdog() -> None:
    before = props()
    # The executor hook ("hang:N", tests/hooked_daemon.py) sleeps without progress: a wedged engine. The job's deadline passes
    # while it is wedged, so after the restart the journal ends it (deadline_exceeded) instead of
    # wedging the new process too; the jobs queued behind it run to completion.
    wedged = dict(EMBED, inputs=["hang:3600"], deadline_s=20)
    ids = submit(wedged, GENERATE, EMBED)
    d.record("watchdog_running_first", wait_running(ids[0]))
    t0 = d.monotonic_usec()
    hung_at = time.monotonic()
    d.record("watchdog_watch", watch(["active/running", "failed/failed"], 300, new_pid_of=before["MainPID"]))
    d.record("watchdog_restart_after_s", time.monotonic() - hung_at)
    done = wait_jobs(ids, 300)
    d.record("watchdog_jobs", {"ids": ids, "complete": done.get("complete"), "records": brief(done.get("records"))})
    d.record("watchdog_props", {"before": before, "after": props()})
    d.record("watchdog_journal", messages(t0))


def phase_stop() -> list[str]:
    before = props()
    running = dict(EMBED, inputs=["hang:5"])
    ids = submit(running, GENERATE, EMBED)
    d.record("stop_running_first", wait_running(ids[0]))
    t0 = d.monotonic_usec()
    started = time.monotonic()
    with pid1_debug():
        d.sh("systemctl", "stop", "--no-block", UNIT, check=True)
        d.record("stop_watch", watch(["inactive/dead", "failed/failed"], 120))
        d.record("stop_seconds", time.monotonic() - started)
    d.record("stop_notifications", [m[:300] for m in notifications(t0) if "WATCHDOG=1" not in m])
    d.record("stop_props", {"before": before, "after": props()})
    d.record("stop_journal_db", {"ids": ids, "states": journal_db_states(ids)})
    d.record("stop_journal", messages(t0))
    return ids[1:]


def phase_badconfig(good_config: str, journaled: list[str]) -> None:
    write_config('queue_size = "lots"\n' + good_config)  # a top-level field of the wrong type
    t0 = d.monotonic_usec()
    d.record("bad_start", d.result(d.sh("systemctl", "start", UNIT, timeout=180)))
    d.record("bad_props", props())
    time.sleep(10)  # twice RestartSec=5s: a restart loop would have shown by now
    d.record("bad_props_later", props())
    d.record("bad_journal", messages(t0))

    write_config(good_config)
    t1 = d.monotonic_usec()
    d.record("fixed_start", d.result(d.sh("systemctl", "start", UNIT, timeout=300)))
    d.record("fixed_props", props())
    done = wait_jobs(journaled, 300)
    d.record("fixed_jobs", {"ids": journaled, "complete": done.get("complete"),
                            "records": brief(done.get("records"))})
    d.record("fixed_journal", messages(t1))
    d.record("final_status", client({"op": "status"}))
    started, t2 = time.monotonic(), d.monotonic_usec()
    d.record("final_stop", d.result(d.sh("systemctl", "stop", UNIT, timeout=120)))
    d.record("final_stop_seconds", time.monotonic() - started)
    d.record("final_props", props())
    d.record("final_journal", messages(t2))


def main() -> None:
    good_config = CONFIG.read_text()
    started = time.monotonic()
    phase_start()
    phase_clients()
    for name, phase in (("reload", lambda: phase_reload(good_config)), ("kill9", phase_kill9),
                        ("watchdog", phase_watchdog)):
        d.record(f"{name}_began_s", round(time.monotonic() - started, 1))
        phase()
    d.record("stop_began_s", round(time.monotonic() - started, 1))
    journaled = phase_stop()
    d.record("badconfig_began_s", round(time.monotonic() - started, 1))
    phase_badconfig(good_config, journaled)
    d.record("driver_seconds", round(time.monotonic() - started, 1))


if __name__ == "__main__":
    main()
