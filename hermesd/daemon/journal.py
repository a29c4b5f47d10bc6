"""The durable job journal: SQLite in the state directory.

A job is written (and synced) before the client hears ``accepted``; its end is written before the
final reply goes out. After a crash or restart, jobs still queued or running are loaded again, so
nothing accepted is lost; ended jobs keep their results for the retention period, fetchable by id.
Only the daemon's main thread uses the journal.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from hermes_client.protocol import ENDED, JobState

SCHEMA_VERSION = 3  # 2: cancel_requested; 3: owner, client_job_id unique per owner
LEGACY_OWNER = "legacy"  # jobs journaled before schema 3 had no owner: no client can see them
_JOBS = """
CREATE TABLE IF NOT EXISTS {table} (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    owner         TEXT NOT NULL,      -- the submitter's identity (hermesd.daemon.identity)
    client_job_id TEXT,
    model         TEXT NOT NULL,
    task          TEXT NOT NULL,
    request       BLOB NOT NULL,      -- msgpack {inputs, params, progress}
    priority      INTEGER NOT NULL,
    deadline      REAL,               -- unix time, or NULL
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    submitted     REAL NOT NULL,
    started       REAL,
    finished      REAL,
    result        BLOB,               -- msgpack, for state 'done'
    error_code    TEXT,
    error_message TEXT,
    cancel_requested REAL,            -- unix time a cancel of the running job was acknowledged, or NULL
    UNIQUE (owner, client_job_id)
);
"""
_SCHEMA = _JOBS.replace("{table}", "jobs") + """
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class JobRecord:
    """A job as the journal keeps it."""

    id: str
    model: str
    task: str
    inputs: Any
    params: dict[str, Any]
    priority: int = 0
    deadline: float | None = None
    client_job_id: str | None = None
    progress: bool = False
    owner: str = LEGACY_OWNER
    state: str = JobState.QUEUED.value
    attempts: int = 0
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: Any = None
    error_code: str | None = None
    error_message: str | None = None
    cancel_requested: float | None = None
    seq: int = 0

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def public(self) -> dict[str, Any]:
        """The record as the protocol's ``job`` reply carries it."""
        record = {"id": self.id, "client_job_id": self.client_job_id, "model": self.model, "task": self.task,
                  "state": self.state, "priority": self.priority, "attempts": self.attempts,
                  "submitted": self.submitted, "started": self.started, "finished": self.finished,
                  "deadline": self.deadline, "result": self.result, "error": None,
                  "cancel_requested": self.cancel_requested}
        if self.error_code:
            record["error"] = {"code": self.error_code, "message": self.error_message or ""}
        return record


class Journal:
    """SQLite-backed job records. Every write is its own synced transaction."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # accepted means on disk, even after a power cut
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._check_version()

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"{self.path} has journal schema {row[0]}; this hermesd knows "
                                        f"{SCHEMA_VERSION} (a newer hermesd wrote it)")
        self._migrate()
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    def _migrate(self) -> None:
        """Bring a journal written by an older hermesd up to this schema (columns added, none dropped)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "cancel_requested" not in columns:  # schema 1
            self._db.execute("ALTER TABLE jobs ADD COLUMN cancel_requested REAL")
        if "owner" not in columns:  # schema 2: client_job_id was unique over all clients; rebuild the table
            kept = [c for c in columns | {"cancel_requested"} if c != "seq"]
            names = ", ".join(["seq", *kept])
            self._db.executescript(
                "BEGIN;" + _JOBS.replace("{table}", "jobs_v3") +
                f"; INSERT INTO jobs_v3 ({names}, owner) SELECT {names}, '{LEGACY_OWNER}' FROM jobs;"
                " DROP TABLE jobs; ALTER TABLE jobs_v3 RENAME TO jobs;"
                " CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state); COMMIT;")

    def close(self) -> None:
        self._db.close()

    def files(self) -> list[Path]:
        """The journal's files on disk: the database and, in WAL mode, its -wal and -shm files."""
        candidates = [self.path, *(self.path.with_name(self.path.name + suffix) for suffix in ("-wal", "-shm"))]
        return [path for path in candidates if path.exists()]

    # -- writes ---------------------------------------------------------------------------------
    def add(self, job: JobRecord) -> JobRecord:
        """Insert a queued job; its ``seq`` (submission order) is filled in."""
        request = msgpack.packb({"inputs": job.inputs, "params": job.params, "progress": job.progress})
        cursor = self._db.execute(
            "INSERT INTO jobs (id, owner, client_job_id, model, task, request, priority, deadline, state, submitted)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.id, job.owner, job.client_job_id, job.model, job.task, request, job.priority, job.deadline, job.state,
             job.submitted))
        job.seq = cursor.lastrowid
        return job

    def mark_running(self, job_id: str) -> None:
        self._db.execute("UPDATE jobs SET state=?, started=?, attempts=attempts+1 WHERE id=?",
                         (JobState.RUNNING.value, time.time(), job_id))

    def request_cancel(self, job_id: str) -> None:
        """Record that a cancel of an unfinished job was acknowledged; a restart ends it cancelled."""
        self._db.execute("UPDATE jobs SET cancel_requested=? WHERE id=? AND state IN (?, ?)",
                         (time.time(), job_id, JobState.QUEUED.value, JobState.RUNNING.value))

    def requeue(self, job_id: str) -> None:
        """Put a job that was interrupted by shutdown back in the queue (it runs again next start)."""
        self._db.execute("UPDATE jobs SET state=? WHERE id=?", (JobState.QUEUED.value, job_id))

    def finish(self, job_id: str, state: JobState, result: Any = None, error: tuple[str, str] | None = None) -> None:
        """Record a job's end: done with a result, failed with (code, message), or cancelled."""
        code, message = error if error else (None, None)
        self._db.execute(
            "UPDATE jobs SET state=?, finished=?, result=?, error_code=?, error_message=? WHERE id=?",
            (state.value, time.time(), msgpack.packb(result) if result is not None else None, code, message, job_id))

    def purge(self, older_than_s: float) -> int:
        """Forget ended jobs that finished more than ``older_than_s`` ago; returns how many."""
        cutoff = time.time() - older_than_s
        placeholders = ",".join("?" * len(ENDED))
        cursor = self._db.execute(f"DELETE FROM jobs WHERE state IN ({placeholders}) AND finished < ?",
                                  (*sorted(ENDED), cutoff))
        return cursor.rowcount

    # -- reads ----------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        return self._one("SELECT * FROM jobs WHERE id=?", (job_id,))

    def by_client_id(self, owner: str, client_job_id: str) -> JobRecord | None:
        """The job ``owner`` submitted under ``client_job_id`` (client job ids are scoped per owner)."""
        return self._one("SELECT * FROM jobs WHERE owner=? AND client_job_id=?", (owner, client_job_id))

    def unfinished(self) -> list[JobRecord]:
        """Jobs queued or running when the daemon last stopped, in submission order."""
        cursor = self._db.execute("SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY seq",
                                  (JobState.QUEUED.value, JobState.RUNNING.value))
        return [self._record(cursor.description, row) for row in cursor.fetchall()]

    def counts(self) -> dict[str, int]:
        """Jobs per state."""
        return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def _one(self, query: str, args: tuple) -> JobRecord | None:
        cursor = self._db.execute(query, args)
        row = cursor.fetchone()
        return self._record(cursor.description, row) if row else None

    @staticmethod
    def _record(description: Any, row: tuple) -> JobRecord:
        values = dict(zip((column[0] for column in description), row))
        request = msgpack.unpackb(values.pop("request"), raw=False)
        result = values.pop("result")
        return JobRecord(**values, inputs=request["inputs"], params=request["params"],
                         progress=request.get("progress", False),
                         result=msgpack.unpackb(result, raw=False) if result is not None else None)
