"""The broker's durable journal: every accepted task, every state change, every result.

Why a journal: the broker keeps live tasks (queued, running) in memory and nothing
else. Writes are buffered and committed once per broker loop iteration (group
commit) before any submit in that batch is acknowledged, so an acknowledged task is
on disk. Finished tasks live here only (plus a small cache in the broker): the
result endpoint reads them back, and `expire` drops results past their TTL.

The interface is the `Journal` protocol below; another backend (PostgreSQL for
DATABASE_URL) only has to provide the same methods.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator, Protocol

import msgspec

from ..protocol import FINAL_STATES, TaskRecord, TaskResult, TaskSpec

_enc = msgspec.msgpack.Encoder()
_rec = msgspec.msgpack.Decoder(TaskRecord)
_spec = msgspec.msgpack.Decoder(TaskSpec)
_res = msgspec.msgpack.Decoder(TaskResult)

SCHEMA_VERSION = 2
# Each migration takes the schema from version N to N+1.
_MIGRATIONS = {
    1: ["ALTER TABLE tasks ADD COLUMN idem TEXT"],
}


class Journal(Protocol):
    def load_live(self) -> Iterator[tuple[int, TaskRecord, TaskSpec, str | None]]: ...
    def max_seq(self) -> int: ...
    def get(self, task_id: str) -> TaskRecord | None: ...
    def find_idempotent(self, idem: str) -> str | None: ...
    def write(self, seq: int, record: TaskRecord, spec: TaskSpec | None = None, idem: str | None = None) -> None: ...
    def commit(self) -> None: ...
    def expire(self, results_before: float, records_before: float) -> tuple[int, int]: ...
    def close(self) -> None: ...


class SqliteJournal:
    """SQLite in WAL mode, synchronous=FULL: one fsync per group commit."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"journal {path} has schema {version}; this broker knows up to {SCHEMA_VERSION}")
        if version == 0 and self._db.execute("SELECT 1 FROM sqlite_master WHERE name='tasks'").fetchone():
            raise RuntimeError(f"journal {path} predates schema versions (a development build); move it away")
        for v in range(version, SCHEMA_VERSION) if version else ():  # 0: a new file, created below
            for statement in _MIGRATIONS[v]:
                self._db.execute(statement)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS tasks ("
            " task_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL,"
            " final INTEGER NOT NULL, finished_at REAL, record BLOB NOT NULL, result BLOB,"
            " result_expired INTEGER NOT NULL DEFAULT 0, spec BLOB NOT NULL, idem TEXT)"
        )
        self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS tasks_idem ON tasks(idem) WHERE idem IS NOT NULL")
        self._db.execute("CREATE INDEX IF NOT EXISTS tasks_live ON tasks(final, seq)")
        self._db.execute("CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished_at)")
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._inserts: list[tuple] = []
        self._updates: list[tuple] = []

    @staticmethod
    def _split(record: TaskRecord) -> tuple[bytes, bytes | None]:
        """The result goes in its own column so that expiring it is one UPDATE."""
        result = record.result
        record.result = None
        try:
            return _enc.encode(record), (_enc.encode(result) if result is not None else None)
        finally:
            record.result = result

    def load_live(self) -> Iterator[tuple[int, TaskRecord, TaskSpec, str | None]]:
        rows = self._db.execute("SELECT seq, record, spec, idem FROM tasks WHERE final=0 ORDER BY seq")
        for seq, rec, spec, idem in rows.fetchall():
            yield seq, _rec.decode(rec), _spec.decode(spec), idem

    def max_seq(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()[0]

    def get(self, task_id: str) -> TaskRecord | None:
        row = self._db.execute("SELECT record, result, result_expired FROM tasks WHERE task_id=?",
                               (task_id,)).fetchone()
        if row is None:
            return None
        rec = _rec.decode(row[0])
        rec.result = _res.decode(row[1]) if row[1] is not None else None
        rec.result_expired = bool(row[2])
        return rec

    def find_idempotent(self, idem: str) -> str | None:
        row = self._db.execute("SELECT task_id FROM tasks WHERE idem=?", (idem,)).fetchone()
        return row[0] if row else None

    def write(self, seq: int, record: TaskRecord, spec: TaskSpec | None = None, idem: str | None = None) -> None:
        """Buffer a new task (with its spec) or a new state of a known one (without)."""
        final = record.state in FINAL_STATES
        rec, res = self._split(record)
        if spec is not None:
            self._inserts.append((record.task_id, seq, record.state, final, record.finished_at, rec, res,
                                  _enc.encode(spec), idem))
        else:
            self._updates.append((record.state, final, record.finished_at, rec, res, record.task_id))

    def commit(self) -> None:
        if not (self._inserts or self._updates):
            return
        db = self._db
        try:
            db.execute("BEGIN")
            if self._inserts:
                db.executemany("INSERT OR REPLACE INTO tasks (task_id, seq, state, final, finished_at, record,"
                               " result, spec, idem) VALUES (?,?,?,?,?,?,?,?,?)", self._inserts)
            if self._updates:
                db.executemany("UPDATE tasks SET state=?, final=?, finished_at=?, record=?, result=?"
                               " WHERE task_id=?", self._updates)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            self._inserts.clear()
            self._updates.clear()

    def expire(self, results_before: float, records_before: float) -> tuple[int, int]:
        """Drop results finished before the first time, whole records before the second."""
        db = self._db
        cur = db.execute("UPDATE tasks SET result=NULL, result_expired=1"
                         " WHERE final=1 AND result_expired=0 AND finished_at < ?", (results_before,))
        purged = cur.rowcount
        cur = db.execute("DELETE FROM tasks WHERE final=1 AND finished_at < ?", (records_before,))
        return purged, cur.rowcount

    def close(self) -> None:
        self._db.close()
