"""The bridge's own small journal: which MQTT requests it handed to the daemon and which it answered.

A job is acknowledged to the broker only after the daemon journaled it *and* this ledger holds the way
back to its requester (reply topic, correlation data, format). So a bridge killed at any point either
gets the message again from the broker (not yet acknowledged) or finds it here at its next start and
waits for the daemon's answer (acknowledged). Answered keys stay for a while, so a redelivered
duplicate is acknowledged without being answered twice.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgpack

from hermesd.mqtt.messages import JobRequest, Reply

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    key       TEXT PRIMARY KEY,
    job_id    TEXT NOT NULL,
    request   BLOB NOT NULL,
    recorded  REAL NOT NULL,
    answered  REAL
);
CREATE INDEX IF NOT EXISTS requests_open ON requests (answered);
"""


class Ledger:
    """SQLite file in the bridge's state directory; safe to share between the bridge's threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.touch(mode=0o600, exist_ok=True)  # it holds prompts: private before SQLite writes a byte
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # recorded means on disk: it is what the broker ack rests on
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def state(self, key: str) -> str | None:
        """"open" (recorded, not answered), "answered", or None (never seen)."""
        with self._lock:
            row = self._db.execute("SELECT answered FROM requests WHERE key = ?", (key,)).fetchone()
        return None if row is None else "open" if row[0] is None else "answered"

    def record(self, key: str, job_id: str, job: JobRequest) -> None:
        """Remember an accepted job and the way back to its requester (synced before returning)."""
        blob = msgpack.packb({"model": job.model, "task": job.task, "submit": job.submit, "shared": job.shared,
                              "reply": asdict(job.reply)}, use_bin_type=True)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO requests (key, job_id, request, recorded, answered) "
                             "VALUES (?, ?, ?, ?, NULL)", (key, job_id, blob, time.time()))

    def answered(self, key: str) -> None:
        """Mark a request answered; it is kept so a duplicate is recognised (see ``prune``)."""
        with self._lock:
            # Not synced: written to the WAL it survives the bridge's death, and between the answer's PUBACK
            # and this mark a kill means a second answer after restart; an fsync here would widen that window.
            # (A power cut may lose the mark: a duplicate answer, never a lost one.)
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("INSERT INTO requests (key, job_id, request, recorded, answered) VALUES "
                                 "(?, '', x'80', ?, ?) ON CONFLICT(key) DO UPDATE SET answered = excluded.answered",
                                 (key, time.time(), time.time()))
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def open_requests(self) -> list[tuple[str, str, JobRequest]]:
        """(key, job id, request) of every job acknowledged to the broker but not answered yet."""
        with self._lock:
            rows = self._db.execute("SELECT key, job_id, request FROM requests WHERE answered IS NULL "
                                    "ORDER BY recorded").fetchall()
        return [(key, job_id, _request(blob)) for key, job_id, blob in rows]

    def prune(self, keep_s: float) -> int:
        """Forget answered requests older than ``keep_s`` seconds; returns how many."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM requests WHERE answered IS NOT NULL AND answered < ?",
                                      (time.time() - keep_s,))
        return cursor.rowcount


def _request(blob: bytes) -> JobRequest:
    data: dict[str, Any] = msgpack.unpackb(blob, raw=False)
    reply = data["reply"]
    reply["user_properties"] = [tuple(pair) for pair in reply.get("user_properties", [])]
    return JobRequest(data["model"], data["task"], data["submit"], Reply(**reply), data["shared"])
