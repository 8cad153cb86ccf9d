"""The broker's durable journal: every accepted task, and every final state.

Why a journal and not a database of record: the broker keeps all live state in
memory and only needs the journal to come back after a crash. Writes are buffered
and committed once per broker loop iteration (group commit), before any submit in
that batch is acknowledged, so an acknowledged task is on disk.

The interface is the three methods the broker calls (`load`, `write`, `commit`), so
another backend (PostgreSQL for DATABASE_URL) only has to provide the same three.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator, Protocol

import msgspec

from ..protocol import FINAL_STATES, TaskRecord, TaskSpec

_enc = msgspec.msgpack.Encoder()
_rec = msgspec.msgpack.Decoder(TaskRecord)
_spec = msgspec.msgpack.Decoder(TaskSpec)


class Journal(Protocol):
    def load(self) -> Iterator[tuple[int, TaskRecord, TaskSpec]]: ...
    def write(self, seq: int, record: TaskRecord, spec: TaskSpec | None = None) -> None: ...
    def commit(self) -> None: ...
    def close(self) -> None: ...


class SqliteJournal:
    """SQLite in WAL mode, synchronous=FULL: one fsync per group commit."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS tasks ("
            " task_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL,"
            " final INTEGER NOT NULL, finished_at REAL, record BLOB NOT NULL, spec BLOB NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS tasks_final ON tasks(final, finished_at)")
        self._inserts: list[tuple] = []
        self._updates: list[tuple] = []

    def load(self) -> Iterator[tuple[int, TaskRecord, TaskSpec]]:
        rows = self._db.execute("SELECT seq, record, spec FROM tasks ORDER BY seq")
        for seq, rec, spec in rows:
            yield seq, _rec.decode(rec), _spec.decode(spec)

    def write(self, seq: int, record: TaskRecord, spec: TaskSpec | None = None) -> None:
        """Buffer a new task (with its spec) or a new state of a known one (without)."""
        final = record.state in FINAL_STATES
        if spec is not None:
            self._inserts.append(
                (record.task_id, seq, record.state, final, record.finished_at, _enc.encode(record), _enc.encode(spec))
            )
        else:
            self._updates.append((record.state, final, record.finished_at, _enc.encode(record), record.task_id))

    @property
    def pending(self) -> bool:
        return bool(self._inserts or self._updates)

    def commit(self) -> None:
        if not (self._inserts or self._updates):
            return
        db = self._db
        db.execute("BEGIN")
        try:
            if self._inserts:
                db.executemany("INSERT OR REPLACE INTO tasks VALUES (?,?,?,?,?,?,?)", self._inserts)
            if self._updates:
                db.executemany(
                    "UPDATE tasks SET state=?, final=?, finished_at=?, record=? WHERE task_id=?", self._updates
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            self._inserts.clear()
            self._updates.clear()

    def purge_finished_before(self, when: float) -> int:
        cur = self._db.execute("DELETE FROM tasks WHERE final=1 AND finished_at < ?", (when,))
        return cur.rowcount

    def close(self) -> None:
        self._db.close()
