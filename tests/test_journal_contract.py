"""The journal's whole contract, once, over both backends: SQLite on a temporary file
and PostgreSQL on a throwaway server (tests/support/postgres.py).

One suite rather than one per backend, so that the backends cannot drift: whatever
the broker relies on (round trips, group commit, what a failed commit keeps, expiry,
idempotency keys, reopening, schema versions) is asserted here for both. The outage
is each backend's real one: a full filesystem under SQLite (a tmpfs, so root, as in
test_storage_faults.py), the server stopped (fast shutdown) under PostgreSQL.
"""
from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
from msgspec.structs import replace

from appliance import protocol as P
from appliance.config import ConfigError, load_settings
from appliance.store import open_journal
from appliance.store import pg_journal
from appliance.store.journal import SCHEMA_VERSION, JournalError, SqliteJournal, describe
from support.postgres import Postgres, postgres_server, postgres_url  # noqa: F401 (fixtures)
from test_storage_faults import fill, tmpfs  # noqa: F401 (fixture)

CHAT = P.ChatTask(messages=[P.ChatMessage("system", "Be brief."), P.ChatMessage("user", "Summarise the note.")],
                  max_tokens=64, priority="high")
COMPLETE = P.CompleteTask(prompt="the patient", max_tokens=8)
EMBED = P.EmbedTask(texts=["fever", "cough"])


def record(n: int, state: str = "queued", spec: P.TaskSpec = COMPLETE, **kw) -> P.TaskRecord:
    return P.TaskRecord(task_id=f"{n:032x}", state=state, type=type(spec).__struct_config__.tag,
                        priority=spec.priority, created_at=1000.0 + n, tenant="t", model="m", **kw)


def finished(rec: P.TaskRecord, at: float, text: str = "done") -> P.TaskRecord:
    return replace(rec, state="completed", started_at=at - 1, finished_at=at, worker="w1", attempts=1,
                   result=P.TaskResult(text=text, prompt_tokens=3, completion_tokens=2))


class SqliteStore:
    name = "sqlite"

    def __init__(self, directory: Path):
        self.path = directory / "journal.sqlite3"
        self.url = f"sqlite:///{self.path}"

    def version(self) -> int:
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            return db.execute("PRAGMA user_version").fetchone()[0]

    def set_version(self, v: int) -> None:
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            db.execute(f"PRAGMA user_version={v}")

    @contextlib.contextmanager
    def outage(self):
        filler = fill(self.path.parent)
        yield sqlite3.OperationalError
        filler.unlink()


class PostgresStore:
    name = "postgres"

    def __init__(self, server: Postgres, url: str):
        self.server, self.url, self.db = server, url, url.rsplit("/", 1)[1]

    def version(self) -> int:
        return self.server.sql("SELECT version FROM schema_version", self.db)[0][0]

    def set_version(self, v: int) -> None:
        self.server.sql(f"UPDATE schema_version SET version={v}", self.db)

    @contextlib.contextmanager
    def outage(self):
        self.server.stop()
        try:
            yield pg_journal.PostgresFailure
        finally:
            self.server.start()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SqliteStore(tmp_path)
    return PostgresStore(request.getfixturevalue("postgres_server"), request.getfixturevalue("postgres_url"))


@pytest.fixture(params=["sqlite", "postgres"])
def fragile_store(request):
    """A store whose outage the test can cause: SQLite's on a 4 MiB tmpfs."""
    if request.param == "sqlite":
        return SqliteStore(request.getfixturevalue("tmpfs"))
    return PostgresStore(request.getfixturevalue("postgres_server"), request.getfixturevalue("postgres_url"))


@pytest.fixture
def journal(store):
    j = open_journal(store.url)
    yield j
    j.close()


def reopened(store):
    """What a restarted broker would see."""
    return contextlib.closing(open_journal(store.url))


# ------------------------------------------------------------------ round trips
def test_records_and_specs_round_trip_and_live_ones_come_back_in_order(store, journal):
    specs = {1: CHAT, 2: COMPLETE, 3: EMBED, 4: COMPLETE}
    for seq, spec in specs.items():
        journal.write(seq, record(seq, spec=spec), spec, idem=f"t\0key-{seq}" if seq == 2 else None)
    journal.write(3, replace(record(3, spec=EMBED), state="running", started_at=1004.0, worker="w1", attempts=1))
    journal.write(4, finished(record(4), 1010.0))  # finished in the same batch it arrived in
    assert journal.pending
    journal.commit()
    assert not journal.pending
    with reopened(store) as j:
        live = list(j.load_live())
        assert [(seq, spec) for seq, _, spec, _ in live] == [(1, CHAT), (2, COMPLETE), (3, EMBED)]
        assert [idem for *_, idem in live] == [None, "t\0key-2", None]
        assert live[0][1] == record(1, spec=CHAT)
        assert live[2][1].state == "running" and live[2][1].worker == "w1" and live[2][1].attempts == 1
        assert j.max_seq() == 4


def test_get_returns_live_and_final_records_with_their_result(journal):
    assert journal.max_seq() == 0 and journal.get("0" * 32) is None
    journal.write(7, record(7), COMPLETE)
    journal.write(8, record(8), COMPLETE)
    journal.commit()
    journal.write(8, replace(record(8), state="failed", finished_at=1020.0,
                             error=P.TaskError("timeout", "did not finish within 60s")))
    journal.write(7, finished(record(7), 1030.0, text="é 中文 \0 bytes"))
    journal.commit()
    got = journal.get(record(7).task_id)
    assert got == finished(record(7), 1030.0, text="é 中文 \0 bytes") and not got.result_expired
    assert journal.get(record(8).task_id).error == P.TaskError("timeout", "did not finish within 60s")
    assert journal.max_seq() == 8 and list(journal.load_live()) == []


def test_the_latest_state_of_a_task_wins_within_a_batch(journal):
    rec = record(1)
    journal.write(1, rec, COMPLETE)
    journal.commit()
    journal.write(1, replace(rec, state="running", worker="w1"))
    journal.write(1, finished(rec, 1050.0, "second"))
    journal.write(1, replace(rec, state="running", worker="w2"))  # as the broker never would: the order counts
    journal.commit()
    assert journal.get(rec.task_id).worker == "w2" and journal.get(rec.task_id).result is None


def test_idempotency_keys_are_found_until_the_record_is_dropped(store, journal):
    journal.write(1, record(1), COMPLETE, idem="tenant-a\0order-1")
    journal.write(2, record(2), COMPLETE, idem="tenant-b\0order-1")  # same key, another tenant
    journal.commit()
    assert journal.find_idempotent("tenant-a\0order-1") == record(1).task_id
    assert journal.find_idempotent("tenant-b\0order-1") == record(2).task_id
    assert journal.find_idempotent("tenant-a\0order-2") is None
    journal.write(1, finished(record(1), 100.0))
    journal.commit()
    with reopened(store) as j:
        assert j.find_idempotent("tenant-a\0order-1") == record(1).task_id  # final: still answers
    journal.expire(results_before=200.0, records_before=150.0)
    assert journal.find_idempotent("tenant-a\0order-1") is None  # past the tombstone: a new task
    assert journal.find_idempotent("tenant-b\0order-1") == record(2).task_id


def test_expire_drops_results_past_ttl_then_records_past_the_tombstone(journal):
    for n, at in ((1, 100.0), (2, 200.0), (3, 300.0)):
        journal.write(n, record(n), COMPLETE)
        journal.write(n, finished(record(n), at))
    journal.write(4, record(4), COMPLETE)  # live: never expires
    journal.commit()
    assert journal.expire(results_before=250.0, records_before=150.0) == (2, 1)
    assert journal.get(record(1).task_id) is None  # past the tombstone: unknown
    rec = journal.get(record(2).task_id)
    assert rec.state == "completed" and rec.result is None and rec.result_expired
    assert journal.get(record(3).task_id).result.text == "done"
    assert journal.expire(results_before=250.0, records_before=150.0) == (0, 0)  # nothing twice
    assert journal.expire(results_before=400.0, records_before=400.0) == (1, 2)
    assert [seq for seq, *_ in journal.load_live()] == [4] and journal.get(record(4).task_id) is not None


# ------------------------------------------------------------------ durability
def test_a_reopened_journal_sees_what_was_committed_and_nothing_else(store, journal):
    journal.write(1, record(1), COMPLETE)
    journal.commit()
    journal.write(1, finished(record(1), 100.0))  # buffered only
    journal.write(2, record(2), COMPLETE)
    with reopened(store) as j:
        assert j.get(record(1).task_id).state == "queued" and j.get(record(2).task_id) is None
        assert j.max_seq() == 1 and not j.pending


def test_a_failed_commit_drops_new_tasks_and_keeps_acknowledged_updates(fragile_store):
    """The broker's rule (journal.py): a commit that fails refuses its new tasks and keeps
    the state changes of acknowledged ones, latest wins, until a commit succeeds, with
    no restart. PostgreSQL: stopped and started again under the open journal."""
    journal = open_journal(fragile_store.url)
    try:
        old = record(1)
        journal.write(1, old, CHAT)
        journal.write(2, record(2), COMPLETE)
        journal.write(2, finished(record(2), 110.0))
        journal.commit()
        with fragile_store.outage() as error:
            journal.write(1, replace(old, state="running", worker="w1"))
            journal.write(1, finished(old, 100.0, "kept"))
            journal.write(3, record(3), COMPLETE, idem="t\0refused")
            for _ in range(2):  # still failing: the updates stay buffered
                with pytest.raises(error) as failure:
                    journal.commit()
                assert journal.pending
            assert journal.outage.failed(failure.value) == describe(failure.value)  # what the broker logs
            with pytest.raises(error):
                journal.expire(results_before=1e12, records_before=0.0)  # told once per episode ...
            assert journal.expire(results_before=1e12, records_before=0.0) == (0, 0)  # ... then counted
        journal.commit()  # back: no restart, no new journal object
        assert not journal.pending
        with reopened(fragile_store) as j:
            rec = j.get(old.task_id)
            assert rec.state == "completed" and rec.result.text == "kept"
            assert j.get(record(2).task_id).result.text == "done"  # the failed expiry changed nothing
            assert j.get(record(3).task_id) is None and j.find_idempotent("t\0refused") is None
            assert j.max_seq() == 2
        assert journal.expire(results_before=1e12, records_before=0.0) == (2, 0)  # expiry works again
    finally:
        journal.close()


# ------------------------------------------------------------------ schema versions
def test_the_schema_version_is_recorded_and_a_newer_one_refused(store, journal):
    journal.close()
    assert store.version() == SCHEMA_VERSION
    with reopened(store) as j:  # opening a current journal again changes nothing
        assert j.max_seq() == 0
    store.set_version(SCHEMA_VERSION + 1)
    with pytest.raises(JournalError, match=f"has schema {SCHEMA_VERSION + 1}; this broker knows up to "
                                           f"{SCHEMA_VERSION}"):
        open_journal(store.url)


def test_postgres_has_a_migration_for_every_schema_sqlite_knows():
    """A new SQLite migration (journal._MIGRATIONS) needs its PostgreSQL twin."""
    assert set(pg_journal._MIGRATIONS) == set(range(pg_journal.FIRST_VERSION, SCHEMA_VERSION))


# ------------------------------------------------------------------ PostgreSQL only
def test_an_older_postgres_schema_is_migrated_all_or_nothing(postgres_server, postgres_url, monkeypatch):
    open_journal(postgres_url).close()
    db = postgres_url.rsplit("/", 1)[1]

    def state() -> tuple[int, bool]:
        (version,), = postgres_server.sql("SELECT version FROM schema_version", db)
        (extra,), = postgres_server.sql("SELECT count(*) FROM information_schema.columns WHERE table_name='tasks'"
                                        " AND column_name='extra'", db)
        return version, extra == 1

    monkeypatch.setattr(pg_journal, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(pg_journal, "_MIGRATIONS", {SCHEMA_VERSION: ["ALTER TABLE tasks ADD COLUMN extra int",
                                                                     "SELECT 1/0"]})
    with pytest.raises(JournalError, match=r"DivisionByZero \(SQLSTATE 22012\)"):
        open_journal(postgres_url)
    assert state() == (SCHEMA_VERSION, False)  # the failed migration left nothing behind
    monkeypatch.setattr(pg_journal, "_MIGRATIONS", {SCHEMA_VERSION: ["ALTER TABLE tasks ADD COLUMN extra int"]})
    open_journal(postgres_url).close()
    assert state() == (SCHEMA_VERSION + 1, True)
    monkeypatch.setattr(pg_journal, "SCHEMA_VERSION", SCHEMA_VERSION + 2)
    with pytest.raises(JournalError, match=f"no PostgreSQL migration from schema {SCHEMA_VERSION + 1}"):
        open_journal(postgres_url)


def test_a_lost_connection_is_reopened_without_a_failed_commit(postgres_server, postgres_url):
    journal = open_journal(postgres_url)
    try:
        journal.write(1, record(1), COMPLETE)
        journal.commit()
        db = postgres_url.rsplit("/", 1)[1]
        killed = postgres_server.sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname='{db}'"
                                     " AND application_name='appliance-broker'")
        assert killed == [(True,)]
        journal.write(1, finished(record(1), 100.0))
        journal.commit()
        assert journal.outage.errors == 0 and journal.get(record(1).task_id).state == "completed"
    finally:
        journal.close()


def test_a_server_that_cannot_be_reached_at_start_is_named_without_its_password(postgres_server):
    secret = "s3cret-Pa55word"
    with pytest.raises(JournalError) as refused:
        open_journal(f"postgresql://appliance:{secret}@127.0.0.1:1/journaldb")
    said = str(refused.value)
    assert "127.0.0.1:1/journaldb" in said and "Connection refused" in said and secret not in said
    url = postgres_server.url("missing").replace("postgres@", f"postgres:{secret}@")
    with pytest.raises(JournalError, match='database "missing" does not exist') as refused:
        open_journal(url)
    assert secret not in str(refused.value)


def test_a_unix_socket_url_and_the_postgres_scheme_work(postgres_server, postgres_url):
    db = postgres_url.rsplit("/", 1)[1]
    for url in (postgres_server.url(db, socket_dir=True), postgres_url.replace("postgresql://", "postgres://")):
        j = open_journal(url)
        assert isinstance(j, pg_journal.PostgresJournal)
        j.close()


def test_a_database_holding_another_tasks_table_is_refused(postgres_server, postgres_url):
    postgres_server.sql("CREATE TABLE tasks (id int)", postgres_url.rsplit("/", 1)[1])
    with pytest.raises(JournalError, match="no schema_version"):
        open_journal(postgres_url)


# ------------------------------------------------------------------ choosing the backend
def test_the_backend_follows_database_url(tmp_path, postgres_url):
    s = load_settings({"APPLIANCE_HOME": str(tmp_path)})
    default = open_journal(s)
    assert isinstance(default, SqliteJournal) and str(default.path) == s.journal_path
    default.close()
    pg = open_journal(load_settings({"APPLIANCE_HOME": str(tmp_path), "DATABASE_URL": postgres_url}))
    assert isinstance(pg, pg_journal.PostgresJournal)
    pg.close()
    with pytest.raises(ConfigError, match="use sqlite:///PATH or postgresql://") as refused:
        load_settings({"APPLIANCE_HOME": str(tmp_path), "DATABASE_URL": "mysql://u:hunter2@db/appliance"})
    assert "hunter2" not in str(refused.value)
