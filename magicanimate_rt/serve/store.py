"""Jobs and references as rows of one SQLite database (``<data-dir>/jobs.sqlite3``).

The standard library's ``sqlite3`` in WAL mode, one connection shared by the threads under a
lock (every statement is short: a job is a handful of writes over its life). What a job was
asked (its settings) is JSON in ``params``; its stage timings JSON in ``timings``. Progress
within a running job lives in memory (``jobs.py``) and is not written per step.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

#: every status a job can have; the last three are final
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    params TEXT NOT NULL,
    source TEXT,
    reference_id TEXT,
    driving TEXT NOT NULL,
    grid INTEGER NOT NULL,
    error TEXT,
    timings TEXT,
    progress TEXT,
    worker TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE TABLE IF NOT EXISTS refs (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    created REAL NOT NULL,
    used REAL NOT NULL
);
"""


@dataclass
class JobRow:
    id: str
    status: str
    created: float
    started: Optional[float]
    finished: Optional[float]
    params: dict[str, Any]
    source: Optional[str]  #: the uploaded source image (relative to the data dir), or None with reference_id
    reference_id: Optional[str]
    driving: str  #: the uploaded driving video (relative to the data dir)
    grid: bool
    error: Optional[str]
    timings: Optional[dict[str, float]]
    progress: Optional[dict[str, Any]]  #: the last progress of a job that ran
    worker: Optional[str]

    @classmethod
    def from_sql(cls, row: sqlite3.Row) -> "JobRow":
        d = dict(row)
        d["params"] = json.loads(d["params"])
        d["timings"] = json.loads(d["timings"]) if d["timings"] else None
        d["progress"] = json.loads(d["progress"]) if d["progress"] else None
        d["grid"] = bool(d["grid"])
        return cls(**d)


class Store:
    """The job store. Thread-safe; every method is one short transaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ jobs
    def add_job(self, job_id: str, params: dict, source: Optional[str], reference_id: Optional[str], driving: str,
                grid: bool, created: Optional[float] = None) -> None:
        self._exec("INSERT INTO jobs (id, status, created, params, source, reference_id, driving, grid) "
                   "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                   (job_id, time.time() if created is None else created, json.dumps(params), source, reference_id,
                    driving, int(grid)))

    def get(self, job_id: str) -> Optional[JobRow]:
        rows = self._exec("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRow.from_sql(rows[0]) if rows else None

    def recent(self, limit: int) -> list[JobRow]:
        return [JobRow.from_sql(r) for r in self._exec("SELECT * FROM jobs ORDER BY created DESC, rowid DESC LIMIT ?",
                                                       (limit,))]

    def with_status(self, status: str) -> list[JobRow]:
        return [JobRow.from_sql(r) for r in self._exec("SELECT * FROM jobs WHERE status = ? ORDER BY created, rowid",
                                                       (status,))]

    def counts(self) -> dict[str, int]:
        got = {s: 0 for s in STATUSES}
        for r in self._exec("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
            got[r["status"]] = r["n"]
        return got

    def start(self, job_id: str, worker: str) -> bool:
        """queued -> running; False if the job is no longer queued (cancelled meanwhile)."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status = 'running', started = ?, worker = ? "
                                   "WHERE id = ? AND status = 'queued'", (time.time(), worker, job_id))
            return cur.rowcount == 1

    def set_worker(self, job_id: str, worker: str) -> None:
        """Name the worker that runs a running job (a Ray replica's id, known once it starts)."""
        self._exec("UPDATE jobs SET worker = ? WHERE id = ? AND status = 'running'", (worker, job_id))

    def finish(self, job_id: str, status: str, error: Optional[str] = None,
               timings: Optional[dict[str, float]] = None, progress: Optional[dict] = None) -> bool:
        """A queued or running job -> ``status`` (final); False if it had already ended."""
        assert status in FINAL, status
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status = ?, finished = ?, error = ?, timings = ?, progress = ? "
                                   "WHERE id = ? AND status IN ('queued', 'running')",
                                   (status, time.time(), error, json.dumps(timings) if timings else None,
                                    json.dumps(progress) if progress else None, job_id))
            return cur.rowcount == 1

    def interrupted(self) -> list[str]:
        """Jobs left running by a previous server process: marked failed. Returns their ids."""
        with self._lock:
            ids = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE status = 'running'")]
            self._db.execute("UPDATE jobs SET status = 'failed', finished = ?, "
                             "error = 'interrupted by a restart' WHERE status = 'running'", (time.time(),))
            return ids

    def expired(self, before: float) -> list[str]:
        """Delete the finished jobs that ended before ``before``; returns their ids."""
        with self._lock:
            ids = [r["id"] for r in self._db.execute(
                "SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished < ?",
                (before,))]
            self._db.execute("DELETE FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished < ?",
                             (before,))
            return ids

    # ------------------------------------------------------------------ references
    def add_reference(self, ref_id: str, path: str) -> None:
        now = time.time()
        self._exec("INSERT INTO refs (id, path, created, used) VALUES (?, ?, ?, ?)", (ref_id, path, now, now))

    def reference(self, ref_id: str, touch: bool = False) -> Optional[str]:
        """The stored image of ``ref_id`` (relative to the data dir), or None."""
        with self._lock:
            row = self._db.execute("SELECT path FROM refs WHERE id = ?", (ref_id,)).fetchone()
            if row is not None and touch:
                self._db.execute("UPDATE refs SET used = ? WHERE id = ?", (time.time(), ref_id))
            return row["path"] if row is not None else None

    def expired_references(self, before: float) -> list[tuple[str, str]]:
        """Delete references unused since ``before`` that no waiting or running job needs;
        returns (id, path) of each."""
        with self._lock:
            rows = [(r["id"], r["path"]) for r in self._db.execute(
                "SELECT id, path FROM refs WHERE used < ? AND id NOT IN "
                "(SELECT reference_id FROM jobs WHERE reference_id IS NOT NULL AND status IN ('queued', 'running'))",
                (before,))]
            self._db.executemany("DELETE FROM refs WHERE id = ?", [(i,) for i, _ in rows])
            return rows
