"""The broker's durable journal: every accepted task, every state change, every result.

Why a journal: the broker keeps live tasks (queued, running) in memory and nothing
else. Writes are buffered and committed once per broker loop iteration (group
commit) before any submit in that batch is acknowledged, so an acknowledged task is
on disk. Finished tasks live here only (plus a small cache in the broker): the
result endpoint reads them back, and `expire` drops results past their TTL.

A journal that cannot be written (disk full, read-only or failing filesystem) makes
`commit` raise: the broker then refuses the submits of that batch (storage_unavailable)
and the inserts are dropped, since they were never acknowledged. The state changes of
tasks already acknowledged (running, completed with their result...) are kept and
written by the next commit that succeeds; the broker needs no restart when space
returns. A journal that is damaged at start is refused (`JournalDamaged`), never
half-loaded.

The interface is the `Journal` protocol below; another backend (PostgreSQL for
DATABASE_URL) only has to provide the same methods.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
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


class JournalError(RuntimeError):
    """The journal cannot be used at start; the message says why and what to do."""


class JournalDamaged(JournalError):
    """The journal file is corrupt or truncated: refused rather than half-loaded, since
    a broker running on it would lose or resurrect tasks without saying so."""

    def __init__(self, path: str | Path, said: str):
        super().__init__(
            f"journal {path} is damaged (SQLite: {said}); the broker will not start on it. "
            f"Stop the appliance and move it aside with its -wal and -shm files "
            f"(mv {path} {path}.damaged); the appliance then starts with an empty journal, "
            f"and the tasks and results it held are lost unless you restore the file from a backup.")
        self.path, self.said = str(path), said


def describe(exc: BaseException) -> str:
    """What went wrong, for the log: SQLite's and the OS's messages are fixed texts
    (never task data); any other exception is told by its type only (logs.py)."""
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", None)
        return f"{exc} ({name})" if name else str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


@dataclass
class Outage:
    """Write failures of the journal, kept so that the broker tells each cause once per
    episode: while the disk is full every loop iteration fails again (thousands a
    second), and a log line for each would be noise, or fill the log's own disk."""

    errors: int = 0              # failed writes since the journal was opened (Stats.journal_errors)
    since: float | None = None   # when the current episode began (monotonic); None: writable
    refused: int = 0             # submits refused in the current episode (the broker counts them)
    told: set[tuple[str, str]] = field(default_factory=set)  # (operation, cause) logged in this episode

    def failed(self, exc: BaseException, refused: int = 0, what: str = "commit") -> str | None:
        """Count a failure of `what` (commit, expire); its cause when that is news in this
        episode (each operation and cause is told once), else None."""
        self.errors += 1
        if self.since is None:
            self.since, self.refused, self.told = time.monotonic(), 0, set()
        self.refused += refused
        cause = describe(exc)
        if (what, cause) in self.told:
            return None
        self.told.add((what, cause))
        return cause

    def ended(self) -> tuple[int, float] | None:
        """After a write that succeeded: (refused submits, seconds) of the episode it ends, if any."""
        if self.since is None:
            return None
        over = (self.refused, time.monotonic() - self.since)
        self.since, self.refused, self.told = None, 0, set()
        return over


class Journal(Protocol):
    path: Path
    outage: Outage

    @property
    def pending(self) -> bool: ...
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
        self.path = Path(path)
        self.outage = Outage()
        self._inserts: list[tuple] = []          # new tasks: dropped when their commit fails
        self._updates: dict[str, tuple] = {}     # task id -> its latest state: kept until written
        self._expired_upto = 0.0                 # results finished before this are expired already
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"journal {path}: its directory cannot be created ({describe(exc)})") from None
        self._db: sqlite3.Connection | None = None
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._open()
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            if isinstance(exc, sqlite3.OperationalError) and not _damage(exc):
                raise JournalError(
                    f"journal {path} cannot be opened ({describe(exc)}): check that its filesystem is "
                    f"mounted read-write, has free space, and that the appliance's user may write "
                    f"{self.path.parent}") from None
            raise JournalDamaged(path, describe(exc)) from None
        except BaseException:
            self._close_quietly()
            raise

    def _open(self) -> None:
        """Check the file, then create or migrate the schema. Nothing is written when the
        schema is current: a broker restarted on a full disk then starts (and refuses
        submits until there is room, like one that was running) whenever SQLite's -shm
        file is still there; otherwise it says the disk is full (JournalError)."""
        db, path = self._db, self.path
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        # quick_check reads every page and checks its structure (integrity_check also
        # cross-checks indexes: 4x the time). Measured once per start on 100,000 finished
        # tasks (90 MB): 65 ms with the file in the page cache, 1.3 s from a cold disk.
        problems = [line for row in db.execute("PRAGMA quick_check(3)").fetchall()
                    for line in row[0].splitlines() if not line.startswith("***")]
        if problems != ["ok"]:
            raise JournalDamaged(path, "; ".join(problems[:3]))  # one log line
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise JournalError(f"journal {path} has schema {version}; this broker knows up to {SCHEMA_VERSION}")
        if version == SCHEMA_VERSION:
            return
        if version == 0 and db.execute("SELECT 1 FROM sqlite_master WHERE name='tasks'").fetchone():
            raise JournalError(f"journal {path} predates schema versions (a development build); move it away")
        db.execute("BEGIN")  # a migration is all or nothing
        try:
            for v in range(version, SCHEMA_VERSION) if version else ():  # 0: a new file, created below
                for statement in _MIGRATIONS[v]:
                    db.execute(statement)
            db.execute(
                "CREATE TABLE IF NOT EXISTS tasks ("
                " task_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL,"
                " final INTEGER NOT NULL, finished_at REAL, record BLOB NOT NULL, result BLOB,"
                " result_expired INTEGER NOT NULL DEFAULT 0, spec BLOB NOT NULL, idem TEXT)"
            )
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS tasks_idem ON tasks(idem) WHERE idem IS NOT NULL")
            db.execute("CREATE INDEX IF NOT EXISTS tasks_live ON tasks(final, seq)")
            db.execute("CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished_at)")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _close_quietly(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass

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
        else:  # a record is its task's whole state: the latest one wins
            self._updates[record.task_id] = (record.state, final, record.finished_at, rec, res, record.task_id)

    @property
    def pending(self) -> bool:
        """Whether the next commit has anything to write."""
        return bool(self._inserts or self._updates)

    def commit(self) -> None:
        """Write the buffered inserts and updates in one transaction. On failure it
        raises with the inserts dropped (their submits are refused, never acknowledged)
        and the updates kept for the next commit: they are state changes of tasks
        already acknowledged, and each is idempotent."""
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
                               " WHERE task_id=?", self._updates.values())
            db.execute("COMMIT")
        except BaseException:
            self._inserts.clear()
            self._rollback()
            raise
        self._inserts.clear()
        self._updates.clear()

    def _rollback(self) -> None:
        """SQLite may have rolled back already (SQLITE_FULL does); a failing ROLLBACK
        must not hide the error that made it necessary."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def expire(self, results_before: float, records_before: float) -> tuple[int, int]:
        """Drop results finished before the first time, whole records before the second.
        While the journal cannot be written a failure is counted and raised once (the
        broker logs it), then counted only: the broker calls this every second."""
        db = self._db
        # By finished_at's index, from where the last call got to: `final=1` alone made
        # SQLite walk every finished row twice a second (23 ms at 56,000 rows, growing).
        # `+final` keeps it off the (final, seq) index.
        try:
            cur = db.execute("UPDATE tasks SET result=NULL, result_expired=1 WHERE finished_at >= ?"
                             " AND finished_at < ? AND +final=1 AND result_expired=0",
                             (self._expired_upto, results_before))
            purged = cur.rowcount
            self._expired_upto = max(self._expired_upto, results_before)
            cur = db.execute("DELETE FROM tasks WHERE finished_at < ? AND +final=1", (records_before,))
            return purged, cur.rowcount
        except sqlite3.Error as exc:
            self._rollback()
            if self.outage.failed(exc, what="expire") is not None:
                raise
            return 0, 0

    def close(self) -> None:
        self._db.close()


def _damage(exc: sqlite3.Error) -> bool:
    """An error that says the file itself is bad (not the disk under it)."""
    return getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
