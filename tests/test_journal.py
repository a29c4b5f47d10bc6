"""The SQLite job journal: durable records, recovery lists, idempotency keys, retention."""

from __future__ import annotations

import sqlite3
import time

import pytest
from hermes_client import JobState

from hermesd.daemon.jobs import JobQueue, QueuedJob
from hermesd.daemon.journal import JobRecord, Journal
from hermesd.errors import Refused


def _record(job_id: str, **fields) -> JobRecord:
    return JobRecord(id=job_id, model="m", task="embed", inputs=["a", "b"], params={"normalize": True},
                     **({"owner": "uid:1000"} | fields))


def test_records_survive_reopening_and_unfinished_jobs_come_back_in_order(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    for name in ("a", "b", "c", "d"):
        journal.add(_record(name, client_job_id=f"cid-{name}", priority=1))
    journal.mark_running("a")
    journal.finish("b", JobState.DONE, result={"embeddings": [[0.5]]})
    journal.finish("c", JobState.FAILED, error=("invalid_params", "nope"))
    journal.close()

    journal = Journal(tmp_path / "j.sqlite3")  # as after a crash
    unfinished = journal.unfinished()
    assert [(r.id, r.state, r.attempts) for r in unfinished] == [("a", "running", 1), ("d", "queued", 0)]
    assert unfinished[0].inputs == ["a", "b"] and unfinished[0].params == {"normalize": True}
    assert journal.get("b").result == {"embeddings": [[0.5]]} and journal.get("b").ended
    assert journal.get("c").public()["error"] == {"code": "invalid_params", "message": "nope"}
    assert journal.by_client_id("uid:1000", "cid-d").id == "d" and journal.get("d").owner == "uid:1000"
    assert journal.by_client_id("uid:1001", "cid-d") is None  # client job ids are scoped per owner
    assert journal.counts() == {"running": 1, "done": 1, "failed": 1, "queued": 1}
    with pytest.raises(sqlite3.IntegrityError):  # one job per idempotency key and owner
        journal.add(_record("e", client_job_id="cid-a"))
    journal.add(_record("f", client_job_id="cid-a", owner="key:other"))  # another owner's key space


def test_purge_forgets_only_old_ended_jobs(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    journal.add(_record("old"))
    journal.add(_record("queued"))
    journal.finish("old", JobState.DONE, result={})
    assert journal.purge(older_than_s=3600) == 0
    time.sleep(0.01)
    assert journal.purge(older_than_s=0) == 1
    assert journal.get("old") is None and journal.get("queued") is not None


def test_a_journal_from_a_newer_hermesd_is_refused(tmp_path):
    Journal(tmp_path / "j.sqlite3").close()
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    with pytest.raises(sqlite3.DatabaseError, match="schema 99"):
        Journal(tmp_path / "j.sqlite3")


SCHEMA_1 = """
CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, client_job_id TEXT UNIQUE,
    model TEXT NOT NULL, task TEXT NOT NULL, request BLOB NOT NULL, priority INTEGER NOT NULL, deadline REAL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, submitted REAL NOT NULL, started REAL,
    finished REAL, result BLOB, error_code TEXT, error_message TEXT);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
"""


def test_a_schema_1_journal_is_migrated_and_cancels_are_journaled(tmp_path):
    import msgpack

    path = tmp_path / "j.sqlite3"
    with sqlite3.connect(path) as db:  # as hermesd before cancels were journaled wrote it
        db.executescript(SCHEMA_1)
        db.execute("INSERT INTO jobs (id, model, task, request, priority, state, attempts, submitted)"
                   " VALUES ('old', 'm', 'embed', ?, 0, 'running', 1, 1.0)",
                   (msgpack.packb({"inputs": "x", "params": {}, "progress": False}),))
    journal = Journal(path)
    old = journal.get("old")
    assert old.state == "running" and old.cancel_requested is None and old.inputs == "x"
    assert old.owner == "legacy"  # from before owners: no client's identity matches it
    journal.request_cancel("old")
    journal.close()
    journal = Journal(path)
    assert journal.unfinished()[0].cancel_requested is not None
    assert journal.get("old").public()["cancel_requested"] is not None
    journal.finish("old", JobState.CANCELLED)
    journal.request_cancel("old")  # an ended job is not marked
    journal.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("3",)


def test_a_schema_2_journal_gets_owners_and_client_job_ids_scoped_per_owner(tmp_path):
    import msgpack

    path = tmp_path / "j.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_1.replace("'1'", "'2'").replace("error_message TEXT)",
                                                                  "error_message TEXT, cancel_requested REAL)"))
        db.execute("INSERT INTO jobs (id, client_job_id, model, task, request, priority, state, submitted,"
                   " cancel_requested) VALUES ('q', 'cid', 'm', 'embed', ?, 3, 'queued', 2.0, 5.0)",
                   (msgpack.packb({"inputs": "x", "params": {}, "progress": True}),))
    journal = Journal(path)
    queued = journal.unfinished()[0]
    assert (queued.id, queued.owner, queued.priority, queued.cancel_requested, queued.progress) == \
        ("q", "legacy", 3, 5.0, True)
    journal.add(_record("n", client_job_id="cid"))  # the same key under a real owner is another job
    assert journal.by_client_id("uid:1000", "cid").id == "n" and journal.by_client_id("legacy", "cid").id == "q"
    journal.add(_record("later"))
    assert journal.get("later").seq > queued.seq  # submission order continues after the rebuild
    journal.close()


def test_queue_orders_by_priority_then_submission_and_is_bounded():
    queue = JobQueue(capacity=3)
    jobs = [QueuedJob(_record(name, priority=priority, seq=seq))
            for seq, (name, priority) in enumerate([("low", 0), ("high", 9), ("mid", 5)], start=1)]
    assert [queue.put(job) for job in jobs] == [0, 0, 1]
    with pytest.raises(Refused) as info:
        queue.put(QueuedJob(_record("x", seq=9)))
    assert info.value.code.value == "busy"
    assert queue.remove("mid").id == "mid" and queue.remove("mid") is None
    assert [queue.get(0.1).id for _ in range(2)] == ["high", "low"]
    assert queue.get(0.05) is None and len(queue) == 0
