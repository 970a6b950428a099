"""Background job records in a SQLite file that every API worker process shares.

Each thread has its own connection (WAL journal, busy timeout), so any thread of any process
may call any method. Every state change is one conditional UPDATE: a job cancelled while it
runs is never finished afterwards, and a finished or failed job is never cancelled. Records
expire ``ttl_s`` after they finish (done, failed or cancelled); queued and running jobs never do.
The file must be on a local disk: SQLite's WAL mode does not work over network filesystems.

A job records its source (``api``, or ``listener`` for the DICOM listener's), and the results
of the webhooks it called. Beside the jobs, ``listener_series`` records which content of a
series each listener route made a job of, so that a series sent again unchanged makes none.
"""

import base64
import binascii
import fcntl
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

JobKind = Literal["infer", "upload"]
JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
JobSource = Literal["api", "listener"]
BUSY_TIMEOUT_S = 60.0
_ACTIVE = ("queued", "running")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('infer', 'upload')),
    status TEXT NOT NULL
        CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    stage INTEGER,
    n_stages INTEGER,
    step TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    status_code INTEGER,
    result_json TEXT,
    result_file TEXT,
    input_folder TEXT,
    source TEXT NOT NULL DEFAULT 'api',
    notifications TEXT
)
"""
_SERIES_SCHEMA = """
CREATE TABLE IF NOT EXISTS listener_series (
    route TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (route, series_uid)
)
"""
#: Columns added after the first release, with their type: added to older files at open.
_ADDED_COLUMNS = {
    "input_folder": "TEXT",
    "source": "TEXT NOT NULL DEFAULT 'api'",
    "notifications": "TEXT",
}
_JSON_COLUMNS = ("result_json", "notifications")
INTERRUPTED = "interrupted by a restart of the server; nothing was committed: submit the job again"


@dataclass(frozen=True)
class JobRecord:
    """One job: its state, its progress, and its outcome."""

    job_id: str
    kind: JobKind
    status: JobStatus
    stage: int | None
    n_stages: int | None
    step: str | None
    created: float
    started: float | None
    finished: float | None
    error: str | None
    status_code: int | None
    result_json: dict[str, Any] | None
    result_file: str | None
    input_folder: str | None = None
    source: JobSource = "api"
    notifications: list[dict[str, Any]] | None = None

    def to_public(self) -> dict[str, Any]:
        """What GET /jobs/{job_id} answers; stage is {index (0-based, as stage_N), count}.

        It holds no result and never a server path (``result_file``, ``input_folder``).
        """
        stage = None if self.stage is None else {"index": self.stage, "count": self.n_stages}
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "source": self.source,
            "status": self.status,
            "stage": stage,
            "step": self.step,
            "created": _iso(self.created),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "error": self.error,
            "status_code": self.status_code,
            "notifications": self.notifications,
        }


@dataclass(frozen=True)
class JobPage:
    """One page of a listing, newest first, and the cursor of the next page (None at the end)."""

    records: list[JobRecord]
    next: str | None


_COLUMNS = ", ".join(field.name for field in fields(JobRecord))


def _iso(timestamp: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC timestamp."""
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()


def _record(row: sqlite3.Row) -> JobRecord:
    """A table row as a record, its JSON columns parsed."""
    values = dict(row)
    for column in _JSON_COLUMNS:
        values[column] = None if values[column] is None else json.loads(values[column])
    return JobRecord(**values)


def _cursor(record: JobRecord) -> str:
    """The opaque cursor of the listing's position after ``record``."""
    return base64.urlsafe_b64encode(json.dumps([record.created, record.job_id]).encode()).decode()


def _position(cursor: str) -> tuple[float, str]:
    """The (created, job_id) that a cursor of ``_cursor`` stands for; ValueError otherwise."""
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (binascii.Error, UnicodeError, ValueError, TypeError):
        raise ValueError("not a cursor of this listing") from None
    if not isinstance(created, int | float) or not isinstance(job_id, str):
        raise ValueError("not a cursor of this listing")
    return float(created), job_id


class JobStore:
    """Job records in a SQLite file shared by every API worker process."""

    def __init__(self, path: Path, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        """Open or create the file and its table, in WAL mode; ``clock`` gives epoch seconds."""
        self.path = path
        self.ttl_s = ttl_s
        self._clock = clock
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".init-lock"), "a") as lock:
            # One process at a time: four workers opening a new file at once saw SQLite's
            # switch to WAL fail with "database is locked" despite the busy timeout.
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._db().execute("PRAGMA journal_mode=WAL")
            self._db().execute(_SCHEMA)
            self._db().execute(_SERIES_SCHEMA)
            present = {row["name"] for row in self._db().execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in present:
                    self._db().execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use and again in a forked child.

        Autocommit mode: each statement is its own transaction. WAL with synchronous=NORMAL
        never corrupts the file; a power cut may lose the last updates.
        """
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            local.db.row_factory = sqlite3.Row
            local.db.execute("PRAGMA synchronous=NORMAL")
            local.pid = os.getpid()
        return local.db

    def create(
        self, kind: JobKind, input_folder: Path | None = None, source: JobSource = "api"
    ) -> JobRecord:
        """A new queued job with a random, unguessable id; ``input_folder`` holds its inputs
        (an upload's) in the work folder while the job needs them."""
        (record,) = self._records(
            "INSERT INTO jobs (job_id, kind, status, created, input_folder, source) "
            f"VALUES (?, ?, 'queued', ?, ?, ?) RETURNING {_COLUMNS}",
            (
                secrets.token_urlsafe(16),
                kind,
                self._clock(),
                input_folder and str(input_folder),
                source,
            ),
        )
        return record

    def page(
        self,
        status: JobStatus | None = None,
        source: JobSource | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> JobPage:
        """Unexpired jobs, newest first, of one status and source when given: ``limit`` of
        them after the cursor ``after`` (ValueError for a cursor this listing did not give)."""
        conditions = ["(finished IS NULL OR finished >= ?)"]
        parameters: list[Any] = [self._clock() - self.ttl_s]
        for column, value in (("status", status), ("source", source)):
            if value is not None:
                conditions.append(f"{column} = ?")
                parameters.append(value)
        if after is not None:
            conditions.append("(created, job_id) < (?, ?)")
            parameters += _position(after)
        records = self._records(
            f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(conditions)} "
            "ORDER BY created DESC, job_id DESC LIMIT ?",
            (*parameters, limit + 1),
        )
        more = len(records) > limit
        return JobPage(records[:limit], _cursor(records[limit - 1]) if more else None)

    def get(self, job_id: str) -> JobRecord | None:
        """The job's record; None for an unknown or expired job."""
        records = self._records(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        if not records or self._expired(records[0], self._clock()):
            return None
        return records[0]

    def start(self, job_id: str) -> bool:
        """queued -> running; False when the job is no longer queued (cancelled meanwhile)."""
        return self._update(job_id, ("queued",), status="running", started=self._clock())

    def progress(self, job_id: str, stage: int, n_stages: int, step: str) -> None:
        """Record a running job's stage (0-based, as ``stage_N``), stage count and step."""
        self._update(job_id, ("running",), stage=stage, n_stages=n_stages, step=step)

    def finish(
        self, job_id: str, result_json: dict[str, Any] | None, result_file: str | None = None
    ) -> bool:
        """running -> done with its result; False, and nothing stored, when it was cancelled."""
        return self._update(
            job_id,
            ("running",),
            status="done",
            finished=self._clock(),
            result_json=json.dumps(result_json),
            result_file=result_file,
        )

    def fail(self, job_id: str, error: str, status_code: int) -> None:
        """queued or running -> failed, with the error and its HTTP status; a cancel stays."""
        self._update(
            job_id,
            _ACTIVE,
            status="failed",
            finished=self._clock(),
            error=error,
            status_code=status_code,
        )

    def notified(self, job_id: str, results: list[dict[str, Any]]) -> None:
        """Record the results of the webhooks that the job called when it ended."""
        self._db().execute(
            "UPDATE jobs SET notifications = ? WHERE job_id = ?", (json.dumps(results), job_id)
        )

    def series_job(self, route: str, series_uid: str, content_hash: str) -> str | None:
        """The queued, running or done job that ``route`` made of this content of the series
        (its first channel's, for a multi-series route); None when there is none."""
        row = (
            self._db()
            .execute(
                "SELECT jobs.job_id FROM listener_series JOIN jobs USING (job_id) "
                "WHERE route = ? AND series_uid = ? AND content_hash = ? "
                "AND status IN ('queued', 'running', 'done')",
                (route, series_uid, content_hash),
            )
            .fetchone()
        )
        return None if row is None else row["job_id"]

    def record_series(self, route: str, series_uid: str, content_hash: str, job_id: str) -> None:
        """Record that ``route`` made job ``job_id`` of this content of the series."""
        self._db().execute(
            "INSERT OR REPLACE INTO listener_series (route, series_uid, content_hash, job_id) "
            "VALUES (?, ?, ?, ?)",
            (route, series_uid, content_hash, job_id),
        )

    def cancel(self, job_id: str) -> JobRecord | None:
        """queued or running -> cancelled; done and failed jobs stay. The record after it."""
        self._update(job_id, _ACTIVE, status="cancelled", finished=self._clock())
        return self.get(job_id)

    def delete(self, job_id: str) -> JobRecord | None:
        """Delete a done, failed or cancelled job's record; the record deleted, None when the
        job is unknown or still queued or running."""
        marks = ", ".join("?" for _ in _ACTIVE)
        records = self._records(
            f"DELETE FROM jobs WHERE job_id = ? AND status NOT IN ({marks}) RETURNING {_COLUMNS}",
            (job_id, *_ACTIVE),
        )
        return records[0] if records else None

    def is_cancelled(self, job_id: str) -> bool:
        """Whether the worker should stop: the job was cancelled, or its record is gone."""
        record = self.get(job_id)
        return record is None or record.status == "cancelled"

    def fail_interrupted(self) -> list[JobRecord]:
        """running -> failed for the jobs a stopped server left running (call it at start-up,
        before this server runs any job); the records after it."""
        return self._records(
            "UPDATE jobs SET status = 'failed', finished = ?, error = ?, status_code = 503 "
            f"WHERE status = 'running' RETURNING {_COLUMNS}",
            (self._clock(), INTERRUPTED),
        )

    def folders_in_use(self) -> set[Path]:
        """The work folders that job records still hold: queued jobs' inputs, results."""
        rows = self._db().execute(
            "SELECT input_folder, result_file, status FROM jobs "
            "WHERE input_folder IS NOT NULL OR result_file IS NOT NULL"
        )
        held = set()
        for row in rows:
            if row["status"] == "queued" and row["input_folder"]:
                held.add(Path(row["input_folder"]))
            if row["result_file"]:
                held.add(Path(row["result_file"]).parent)
        return held

    def expire(self, now: float | None = None) -> list[JobRecord]:
        """Delete the records finished more than ttl_s ago; returns them (to delete results)."""
        cutoff = (self._clock() if now is None else now) - self.ttl_s
        records = self._records(
            f"DELETE FROM jobs WHERE finished < ? RETURNING {_COLUMNS}", (cutoff,)
        )
        if records:
            self._db().execute(
                "DELETE FROM listener_series WHERE job_id NOT IN (SELECT job_id FROM jobs)"
            )
        return sorted(records, key=lambda record: record.created)

    def _expired(self, record: JobRecord, now: float) -> bool:
        """Whether the record finished more than ttl_s before now."""
        return record.finished is not None and record.finished < now - self.ttl_s

    def _records(self, sql: str, parameters: tuple[Any, ...]) -> list[JobRecord]:
        """Run one statement that gives job rows (SELECT, or RETURNING) to its end."""
        return [_record(row) for row in self._db().execute(sql, parameters).fetchall()]

    def _update(self, job_id: str, statuses: tuple[str, ...], **values: Any) -> bool:
        """Set columns of the job if its status is one of ``statuses``; whether it was."""
        assignments = ", ".join(f"{column} = ?" for column in values)
        marks = ", ".join("?" for _ in statuses)
        cursor = self._db().execute(
            f"UPDATE jobs SET {assignments} WHERE job_id = ? AND status IN ({marks})",
            (*values.values(), job_id, *statuses),
        )
        return cursor.rowcount == 1
