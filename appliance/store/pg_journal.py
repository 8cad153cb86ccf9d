"""The broker's journal in PostgreSQL (DATABASE_URL=postgresql://...), for a site that
wants the journal in the database it already runs, backs up and monitors.

Same contract as `SqliteJournal` (journal.py): `write` buffers, `commit` writes the
batch in one transaction that is durable when it returns (synchronous_commit=on is
set on the session, whatever the server's default), a failed commit drops the
inserts (never acknowledged) and keeps the updates of acknowledged tasks for the next
commit, `expire` walks finished_at's index. Rows are the SQLite journal's: records,
specs and results as msgpack in bytea; idempotency keys as bytea too, since they hold
a NUL (tenant NUL key) and PostgreSQL's text cannot.

Schema versions are SQLite's numbers (journal.SCHEMA_VERSION). PostgreSQL has no
user_version, so the number lives in a one-row table `schema_version`, written in the
same transaction as the DDL (PostgreSQL's DDL is transactional, so a migration is all
or nothing, as in SQLite) under an advisory lock (two brokers starting at once do not
both migrate). A table rather than a key/value `meta` row: there is one fact to keep,
and `SELECT * FROM schema_version` is what a DBA looks for. A PostgreSQL journal starts
at version 2; a new SQLite migration needs its PostgreSQL twin in _MIGRATIONS here
(opening refuses otherwise, and the contract tests check it).

A lost connection (server restarted, connection killed) is reopened when the journal
is next used, and the statement retried once on the new connection: every write here
is idempotent (an insert replaces its own row), so a commit whose COMMIT reached the
server but whose answer did not does no harm when repeated. While the server is down
or refuses (disk full, read-only), operations raise `PostgresFailure`, which the
broker handles like the SQLite journal's disk errors (`Outage`). Not handled: a
server that stops answering without closing the connection blocks the broker until
TCP gives up; the appliance runs PostgreSQL on the same box.

Log texts name the server as user@host:port/db, never the password, and tell errors
by their SQLSTATE name or libpq's fixed text, never task data.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..protocol import FINAL_STATES, TaskRecord, TaskSpec
from .journal import SCHEMA_VERSION, JournalError, Outage, SqliteJournal, _enc, _rec, _res, _spec

log = logging.getLogger("appliance.store")
T = TypeVar("T")

FIRST_VERSION = 2          # the schema a new PostgreSQL journal is created at
_MIGRATIONS: dict[int, list[str]] = {}  # N -> statements taking the schema from N to N+1
_LOCK = 0x6A6F75726E616C   # pg_advisory_xact_lock key for migrations ("journal")
CONNECT_TIMEOUT_S = 5

_SCHEMA = [
    "CREATE TABLE tasks ("
    " task_id text PRIMARY KEY, seq bigint NOT NULL, state text NOT NULL, final boolean NOT NULL,"
    " finished_at double precision, record bytea NOT NULL, result bytea,"
    " result_expired boolean NOT NULL DEFAULT false, spec bytea NOT NULL, idem bytea)",
    "CREATE UNIQUE INDEX tasks_idem ON tasks(idem) WHERE idem IS NOT NULL",
    "CREATE INDEX tasks_live ON tasks(seq) WHERE NOT final",
    "CREATE INDEX tasks_finished ON tasks(finished_at)",
    "CREATE TABLE schema_version (one boolean PRIMARY KEY DEFAULT true CHECK (one), version integer NOT NULL)",
]
_INSERT = ("INSERT INTO tasks (task_id, seq, state, final, finished_at, record, result, spec, idem)"
           " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (task_id) DO UPDATE SET seq=EXCLUDED.seq,"
           " state=EXCLUDED.state, final=EXCLUDED.final, finished_at=EXCLUDED.finished_at,"
           " record=EXCLUDED.record, result=EXCLUDED.result, result_expired=false, spec=EXCLUDED.spec,"
           " idem=EXCLUDED.idem")
_UPDATE = "UPDATE tasks SET state=%s, final=%s, finished_at=%s, record=%s, result=%s WHERE task_id=%s"


class PostgresFailure(OSError):
    """PostgreSQL could not be reached or refused a write. An OSError so that the broker
    and journal.describe tell it as they tell a failing disk: its text is a SQLSTATE
    name or libpq's fixed message, never task data."""


def cause(exc: BaseException) -> str:
    """What went wrong, without data: a server error by its SQLSTATE (its message may
    quote values), a client or connection error by the first line of libpq's text."""
    if isinstance(exc, psycopg.Error) and exc.sqlstate:
        return f"{type(exc).__name__} (SQLSTATE {exc.sqlstate})"
    if isinstance(exc, psycopg.Error):
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return type(exc).__name__


class PostgresJournal:
    """One connection, autocommit outside the explicit transaction of each commit."""

    def __init__(self, url: str):
        self.outage = Outage()
        self._inserts: list[tuple] = []          # new tasks: dropped when their commit fails
        self._updates: dict[str, tuple] = {}     # task id -> its latest state: kept until written
        self._expired_upto = 0.0
        try:
            self._params = conninfo_to_dict(url)
        except psycopg.Error:
            raise JournalError("DATABASE_URL is not a valid PostgreSQL URL (postgresql://USER:PASSWORD@HOST:PORT/DB"
                               " or postgresql://USER@/DB?host=/SOCKET/DIR)") from None
        self._params.setdefault("connect_timeout", str(CONNECT_TIMEOUT_S))
        self._params.setdefault("application_name", "appliance-broker")
        p = self._params
        self.path = (f"postgresql://{p.get('user', '')}@{p.get('host', 'localhost')}:{p.get('port', 5432)}"
                     f"/{p.get('dbname', '')}")  # what logs name: never the password
        self._db: psycopg.Connection | None = None
        try:
            self._db = self._connect()
            self._migrate(self._db)
        except (psycopg.Error, PostgresFailure) as exc:
            self._close_quietly()
            raise JournalError(f"journal {self.path} cannot be opened ({self._scrub(exc)}): check that "
                               "PostgreSQL runs there, that the database exists and that DATABASE_URL's user "
                               "may connect to it and create tables in it") from None
        except BaseException:
            self._close_quietly()
            raise

    # ------------------------------------------------------------- connection
    def _scrub(self, exc: BaseException) -> str:
        text = str(exc.strerror) if isinstance(exc, PostgresFailure) else cause(exc)
        password = self._params.get("password")
        return text.replace(password, "***") if password else text

    def _connect(self) -> psycopg.Connection:
        conn = None
        try:
            conn = psycopg.connect(**self._params, autocommit=True)
            conn.execute("SET synchronous_commit = on")  # an acknowledged task is on disk
            return conn
        except psycopg.Error as exc:
            if conn is not None:
                conn.close()
            raise PostgresFailure(None, self._scrub(exc)) from None

    def _close_quietly(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except psycopg.Error:
                pass
            self._db = None

    def _use(self, work: Callable[[psycopg.Connection], T]) -> T:
        """work(connection); on a lost connection, once more on a new one."""
        for attempt in (1, 2):
            if self._db is None:
                self._db = self._connect()  # PostgresFailure while the server is away
            conn = self._db
            try:
                return work(conn)
            except psycopg.Error as exc:
                lost = conn.broken or conn.closed
                if lost:
                    self._close_quietly()
                if attempt == 2 or not lost:
                    raise PostgresFailure(None, self._scrub(exc)) from None  # its message may quote data
        raise AssertionError("unreachable")

    # ------------------------------------------------------------- schema
    def _migrate(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            has_version, has_tasks = conn.execute(
                "SELECT to_regclass('schema_version') IS NOT NULL, to_regclass('tasks') IS NOT NULL").fetchone()
            if not has_version:
                if has_tasks:
                    raise JournalError(f"journal {self.path} has a `tasks` table but no schema_version: "
                                       "not the appliance's journal, or a development build's; use a database "
                                       "of its own")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (FIRST_VERSION,))
            version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(f"journal {self.path} has schema {version}; this broker knows up to "
                                   f"{SCHEMA_VERSION}")
            for v in range(version, SCHEMA_VERSION):  # none when current: nothing is written then
                if v not in _MIGRATIONS:
                    raise JournalError(f"journal {self.path}: this build has no PostgreSQL migration from "
                                       f"schema {v} (pg_journal._MIGRATIONS)")
                for statement in _MIGRATIONS[v]:
                    conn.execute(statement)
                conn.execute("UPDATE schema_version SET version=%s", (v + 1,))
        self._check_fsync(conn)

    def _check_fsync(self, conn: psycopg.Connection) -> None:
        fsync = conn.execute("SHOW fsync").fetchone()[0]  # a server setting: a session cannot change it
        if fsync != "on":
            log.warning("journal %s: the server runs with fsync=%s; acknowledged tasks may be lost in a crash",
                        self.path, fsync)

    # ------------------------------------------------------------- reads
    def load_live(self) -> Iterator[tuple[int, TaskRecord, TaskSpec, str | None]]:
        rows = self._use(lambda c: c.execute(
            "SELECT seq, record, spec, idem FROM tasks WHERE NOT final ORDER BY seq").fetchall())
        for seq, rec, spec, idem in rows:
            yield seq, _rec.decode(rec), _spec.decode(spec), bytes(idem).decode() if idem is not None else None

    def max_seq(self) -> int:
        return self._use(lambda c: c.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()[0])

    def get(self, task_id: str) -> TaskRecord | None:
        if "\0" in task_id:  # never a task id, and PostgreSQL's text cannot hold it
            return None
        row = self._use(lambda c: c.execute("SELECT record, result, result_expired FROM tasks WHERE task_id=%s",
                                            (task_id,)).fetchone())
        if row is None:
            return None
        rec = _rec.decode(row[0])
        rec.result = _res.decode(row[1]) if row[1] is not None else None
        rec.result_expired = row[2]
        return rec

    def find_idempotent(self, idem: str) -> str | None:
        row = self._use(lambda c: c.execute("SELECT task_id FROM tasks WHERE idem=%s", (idem.encode(),)).fetchone())
        return row[0] if row else None

    # ------------------------------------------------------------- writes
    def write(self, seq: int, record: TaskRecord, spec: TaskSpec | None = None, idem: str | None = None) -> None:
        """Buffer a new task (with its spec) or a new state of a known one (without)."""
        final = record.state in FINAL_STATES
        rec, res = SqliteJournal._split(record)
        if spec is not None:
            self._inserts.append((record.task_id, seq, record.state, final, record.finished_at, rec, res,
                                  _enc.encode(spec), idem.encode() if idem is not None else None))
        else:
            self._updates[record.task_id] = (record.state, final, record.finished_at, rec, res, record.task_id)

    @property
    def pending(self) -> bool:
        return bool(self._inserts or self._updates)

    def commit(self) -> None:
        """One transaction for the whole batch, its rows pipelined by executemany: three
        round trips (BEGIN, rows, COMMIT) and one WAL flush at any batch size. Measured
        against a statement per row and one INSERT ... SELECT unnest(arrays) (2 cores,
        tasks/s at 64 and 512 a batch): 44k/55k, 7k/5k, 30k/17k. On failure: inserts
        dropped, updates kept."""
        if not self.pending:
            return

        def batch(conn: psycopg.Connection) -> None:
            with conn.transaction(), conn.cursor() as cur:
                self._write_batch(cur)
        try:
            self._use(batch)
        except BaseException:
            self._dropped()
            raise
        self._written()

    # the parts of a commit that the shared queue's journal extends (shared_queue.py)
    _insert_sql, _update_sql = _INSERT, _UPDATE

    def _write_batch(self, cur: psycopg.Cursor) -> None:
        if self._inserts:
            cur.executemany(self._insert_sql, self._inserts)
        if self._updates:
            cur.executemany(self._update_sql, list(self._updates.values()))

    def _dropped(self) -> None:
        self._inserts.clear()

    def _written(self) -> None:
        self._inserts.clear()
        self._updates.clear()

    def expire(self, results_before: float, records_before: float) -> tuple[int, int]:
        """As SqliteJournal.expire: results, then records; a failure is raised once per
        episode and cause, then only counted (the broker calls this every second)."""
        def run(conn: psycopg.Connection) -> tuple[int, int]:
            purged = conn.execute("UPDATE tasks SET result=NULL, result_expired=true WHERE finished_at >= %s"
                                  " AND finished_at < %s AND final AND NOT result_expired",
                                  (self._expired_upto, results_before)).rowcount
            self._expired_upto = max(self._expired_upto, results_before)
            dropped = conn.execute("DELETE FROM tasks WHERE finished_at < %s AND final", (records_before,)).rowcount
            return purged, dropped
        try:
            return self._use(run)
        except PostgresFailure as exc:
            if self.outage.failed(exc, what="expire") is not None:
                raise
            return 0, 0

    def close(self) -> None:
        self._close_quietly()
