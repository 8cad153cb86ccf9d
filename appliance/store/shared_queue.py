"""One queue shared by several boxes, in the PostgreSQL journal (QUEUE_SCOPE=shared).

Why PostgreSQL and not a protocol between brokers: the database already gives
atomic claims (`FOR UPDATE SKIP LOCKED`), wake-ups (LISTEN/NOTIFY) and a clock every
box agrees on (the server's); a hospital's DBA backs it up and watches it. Each box's
broker stays the hot path for its own instances; the table is where boxes meet.

The rows are the journal's (pg_journal.py) plus the columns of the shared queue:
- `box`: the box that holds the task (NULL: anyone may claim it). Every write of a
  task's state is made `WHERE box = <this box>`: a box that lost a task (its lease
  expired, another box cancelled it) can no longer write it. This is the fencing that
  makes a late result of a partitioned box harmless.
- `lease_until` (server time): a box renews its leases every LEASE_S/3; a row whose
  lease ran out goes back to the queue (any box's sweep), and `attempts` in its record
  tells that it ran before. Leases compare the server's clock with itself: the boxes'
  clocks may disagree without harm.
- `model`, `level`, `tenant`, `enq` (server time), `deadline`: what a claim orders and
  filters by; `origin`: the box whose API accepted the task (told when it ends);
  `partial`, `partial_seq`: the text generated so far, written by the running box at
  most every PARTIAL_EVERY_S so that a stream on another box can follow it.

Claim order: priority aged by waiting time (level - waited/QUEUE_AGING_S, rounded
down), then the tenants' turns: within one claim each tenant's first task, then each
one's second...; between claims, the tenant served longest ago first (`tenant_turns`
remembers when each tenant was last served, by any box), then arrival. Arrival is
`enq`, the server's time of the insert, never `seq`: sequence numbers come in blocks
per box (SEQ_BLOCK), so by `seq` one box's tasks would always go first (measured: a
task accepted by the second of two boxes waited up to 31 s behind newer ones). Notifications: `appliance_queue` (payload: model, level) when unclaimed
work appears; a box's own channel `appliance_box_<name>` for `cancel <id>` (another box
took its task over to cancel it) and `final <id>` (a task it accepted ended elsewhere).
A notification is a hint: a box also claims every CLAIM_POLL_S when it has room, so a
lost one (listening connection down) costs latency, never a task.

The columns are added to an existing journal in place (ADD COLUMN IF NOT EXISTS,
under the migration lock); a one-box journal keeps working without them.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Iterator

import psycopg

from ..protocol import FINAL_STATES, LEVEL, TaskRecord, TaskSpec
from .journal import SqliteJournal, _enc, _rec, _spec
from .pg_journal import _LOCK, PostgresFailure, PostgresJournal, cause

log = logging.getLogger("appliance.store")

QUEUE_CHANNEL = "appliance_queue"
SEQ_BLOCK = 1024           # sequence numbers a box takes at a time (one round trip per block)
CANDIDATES = 256           # per priority level, the oldest unclaimed rows a claim ranks
BOX_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")

_SETUP = [
    "ALTER TABLE tasks ADD COLUMN IF NOT EXISTS box text, ADD COLUMN IF NOT EXISTS lease_until timestamptz,"
    " ADD COLUMN IF NOT EXISTS model text, ADD COLUMN IF NOT EXISTS level smallint,"
    " ADD COLUMN IF NOT EXISTS tenant text, ADD COLUMN IF NOT EXISTS enq timestamptz DEFAULT now(),"
    " ADD COLUMN IF NOT EXISTS deadline double precision, ADD COLUMN IF NOT EXISTS origin text,"
    " ADD COLUMN IF NOT EXISTS partial text, ADD COLUMN IF NOT EXISTS partial_seq integer",
    "CREATE INDEX IF NOT EXISTS tasks_claimable ON tasks(model, level, enq) WHERE box IS NULL AND NOT final",
    "CREATE INDEX IF NOT EXISTS tasks_held ON tasks(box) WHERE box IS NOT NULL AND NOT final",
    "CREATE INDEX IF NOT EXISTS tasks_deadline ON tasks(deadline) WHERE box IS NULL AND NOT final",
    "CREATE TABLE IF NOT EXISTS tenant_turns (tenant text PRIMARY KEY, served_at timestamptz NOT NULL)",
    "CREATE TABLE IF NOT EXISTS boxes (name text PRIMARY KEY, models text[] NOT NULL, seen timestamptz NOT NULL)",
]
_INSERT = ("INSERT INTO tasks (task_id, seq, state, final, finished_at, record, result, spec, idem, model, level,"
           " tenant, deadline, origin, box, lease_until) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,"
           " now() + make_interval(secs => %s)) ON CONFLICT (task_id) DO NOTHING")
_UPDATE = ("UPDATE tasks SET state=%s, final=%s, finished_at=%s, record=%s, result=%s, partial=NULL"
           " WHERE task_id=%s AND box=%s")
_HAND_BACK = ("UPDATE tasks SET state=%s, record=%s, box=NULL, lease_until=NULL, partial=NULL"
              " WHERE task_id=%s AND box=%s")
_PARTIAL = "UPDATE tasks SET partial=%s, partial_seq=%s WHERE task_id=%s AND box=%s AND NOT final"
# Ranks the head of each level (CANDIDATES oldest) and locks what it takes, skipping rows
# another box is locking at this moment: two boxes claiming at once take different tasks.
# The lock is taken row by row down the ranked list (a nested loop over the materialized,
# ordered CTE stops at the LIMIT): only the rows taken are locked. A join of `tasks` with
# the ranking, locked after sorting, was planned as a nested loop with a join filter on a
# young table's statistics: 66 ms a claim with 600 tasks waiting (EXPLAIN ANALYZE), ~2 ms now.
_CLAIM = """
WITH cand AS (
  SELECT c.task_id, c.level, c.tenant, c.seq, c.enq
  FROM generate_series(0, %(max_level)s) AS l(level),
  LATERAL (SELECT task_id, level, tenant, seq, enq FROM tasks
           WHERE box IS NULL AND NOT final AND model = %(model)s AND level = l.level
             AND (%(origin)s::text IS NULL OR origin = %(origin)s)
           ORDER BY enq LIMIT %(candidates)s) c
), ranked AS (
  SELECT task_id, seq, enq, served_at,
         floor(level - CASE WHEN %(aging)s > 0 THEN extract(epoch FROM now() - enq) / %(aging)s ELSE 0 END) AS eff,
         row_number() OVER (PARTITION BY level, tenant ORDER BY enq, seq) AS turn
  FROM cand LEFT JOIN tenant_turns USING (tenant)
), ordered AS MATERIALIZED (
  SELECT task_id FROM ranked ORDER BY eff, turn, served_at NULLS FIRST, enq, seq
), pick AS (
  SELECT l.task_id FROM ordered o CROSS JOIN LATERAL (
    SELECT task_id FROM tasks t WHERE t.task_id = o.task_id AND t.box IS NULL AND NOT t.final
    FOR UPDATE SKIP LOCKED) l
  LIMIT %(n)s
), claimed AS (
  UPDATE tasks SET box = %(box)s, lease_until = now() + make_interval(secs => %(lease)s)
  FROM pick WHERE tasks.task_id = pick.task_id
  RETURNING tasks.seq, tasks.record, tasks.spec, tasks.idem, tasks.origin, tasks.tenant
), turns AS (
  INSERT INTO tenant_turns (tenant, served_at) SELECT tenant, now() FROM (SELECT DISTINCT tenant FROM claimed) d
  ON CONFLICT (tenant) DO UPDATE SET served_at = EXCLUDED.served_at
)
SELECT seq, record, spec, idem, origin FROM claimed
"""
_OVERDUE = """
WITH pick AS (SELECT task_id FROM tasks WHERE box IS NULL AND NOT final AND deadline < %(now)s
              ORDER BY deadline LIMIT %(n)s FOR UPDATE SKIP LOCKED)
UPDATE tasks SET box = %(box)s, lease_until = now() + make_interval(secs => %(lease)s)
FROM pick WHERE tasks.task_id = pick.task_id
RETURNING tasks.seq, tasks.record, tasks.spec, tasks.idem, tasks.origin
"""
_SWEEP = """
WITH gone AS (SELECT task_id, box FROM tasks WHERE box IS NOT NULL AND NOT final AND lease_until < now()
              FOR UPDATE SKIP LOCKED)
UPDATE tasks t SET box = NULL, lease_until = NULL, partial = NULL FROM gone
WHERE t.task_id = gone.task_id RETURNING gone.box, t.model, t.level
"""


def box_channel(box: str) -> str:
    return f"appliance_box_{box}"


@dataclass
class Claimed:
    """A task this box now holds: put it in its own queue."""
    seq: int
    record: TaskRecord
    spec: TaskSpec
    idem: str | None
    origin: str | None


@dataclass
class Tick:
    """What a lease renewal learnt about the cluster."""
    held: set[str]                                  # tasks this box still holds
    expired: dict[str, int] = field(default_factory=dict)  # box -> its tasks whose lease this sweep ended
    backlog: int = 0                                # unclaimed live tasks, all models
    models: set[str] = field(default_factory=set)   # models some box serves (or served)
    boxes: list[str] = field(default_factory=list)  # boxes seen within three leases


class SharedJournal(PostgresJournal):
    """The PostgreSQL journal with the shared queue's columns, claims and leases."""

    def __init__(self, url: str, box: str, lease_s: float, aging_s: float):
        if not BOX_NAME.match(box):
            raise ValueError(f"box name {box!r}")
        self.box, self.lease_s, self.aging_s = box, lease_s, aging_s
        self._partials: dict[str, tuple] = {}
        self._hand_backs: dict[str, tuple] = {}       # held tasks going back to the queue (kept until written)
        self._notices: set[tuple[str, str]] = set()   # (channel, payload), sent with the next commit
        self._origin: dict[str, str] = {}             # held task -> the box that accepted it
        self._seq_next = self._seq_end = 0
        self.listener: psycopg.Connection | None = None
        super().__init__(url)

    def _migrate(self, conn: psycopg.Connection) -> None:
        super()._migrate(conn)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            for statement in _SETUP:
                conn.execute(statement)
            if conn.execute("SELECT to_regclass('task_seq') IS NULL").fetchone()[0]:
                start = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM tasks").fetchone()[0]
                conn.execute(f"CREATE SEQUENCE task_seq INCREMENT BY {SEQ_BLOCK} START WITH {int(start)}")
            # live tasks of a one-box journal: give them the columns a claim reads
            for task_id, rec, spec in conn.execute(
                    "SELECT task_id, record, spec FROM tasks WHERE NOT final AND model IS NULL").fetchall():
                r, s = _rec.decode(rec), _spec.decode(spec)
                conn.execute("UPDATE tasks SET model=%s, level=%s, tenant=%s, deadline=%s, box=NULL WHERE task_id=%s",
                             (r.model or s.model or "", LEVEL[r.priority], r.tenant, r.created_at + s.timeout_s,
                              task_id))

    # ------------------------------------------------------------- sequence numbers
    def next_seq(self) -> int:
        """A sequence number no other box uses: blocks of SEQ_BLOCK from a PostgreSQL sequence."""
        if self._seq_next >= self._seq_end:
            start = self._use(lambda c: c.execute("SELECT nextval('task_seq')").fetchone()[0])
            self._seq_next, self._seq_end = start, start + SEQ_BLOCK
        self._seq_next += 1
        return self._seq_next - 1

    def max_seq(self) -> int:
        return 0  # not read: sequence numbers come from next_seq

    # ------------------------------------------------------------- reads
    def load_live(self) -> Iterator[tuple[int, TaskRecord, TaskSpec, str | None]]:
        """The tasks this box holds (after a restart): the rest is the other boxes' or the queue's."""
        rows = self._use(lambda c: c.execute(
            "SELECT seq, record, spec, idem, origin FROM tasks WHERE NOT final AND box=%s ORDER BY seq",
            (self.box,)).fetchall())
        for seq, rec, spec, idem, origin in rows:
            record = _rec.decode(rec)
            if origin is not None:
                self._origin[record.task_id] = origin
            yield seq, record, _spec.decode(spec), bytes(idem).decode() if idem is not None else None

    def progress(self, task_id: str) -> tuple[str, int]:
        """(text generated so far, its token sequence) of a task running on another box."""
        row = self._use(lambda c: c.execute("SELECT partial, partial_seq FROM tasks WHERE task_id=%s",
                                            (task_id,)).fetchone())
        return (row[0] or "", row[1] or 0) if row else ("", 0)

    # ------------------------------------------------------------- writes
    def write(self, seq: int, record: TaskRecord, spec: TaskSpec | None = None, idem: str | None = None,
              claimed: bool = True) -> None:
        """A new task (with its spec: held by this box when `claimed`, else left for any
        box to claim) or a new state of one this box holds."""
        final = record.state in FINAL_STATES
        rec, res = SqliteJournal._split(record)
        if spec is not None:
            self._inserts.append((
                record.task_id, seq, record.state, final, record.finished_at, rec, res, _enc.encode(spec),
                idem.encode() if idem is not None else None, record.model, LEVEL[record.priority], record.tenant,
                record.created_at + spec.timeout_s, self.box, self.box if claimed else None,
                self.lease_s if claimed else None))
            if not claimed:
                self._notices.add((QUEUE_CHANNEL, f"{record.model} {LEVEL[record.priority]}"))
            return
        self._updates[record.task_id] = (record.state, final, record.finished_at, rec, res, record.task_id, self.box)
        if final:
            self._partials.pop(record.task_id, None)
            origin = self._origin.pop(record.task_id, None)
            if origin is not None and origin != self.box:
                self._notices.add((box_channel(origin), f"final {record.task_id}"))

    def hand_back(self, record: TaskRecord) -> None:
        """A queued task this box holds goes back to the shared queue (with the next commit)."""
        rec, _ = SqliteJournal._split(record)
        self._updates.pop(record.task_id, None)
        self._hand_backs[record.task_id] = (record.state, rec, record.task_id, self.box)
        self._origin.pop(record.task_id, None)
        self._notices.add((QUEUE_CHANNEL, f"{record.model} {LEVEL[record.priority]}"))

    def write_partial(self, task_id: str, text: str, seq: int) -> None:
        self._partials[task_id] = (text, seq, task_id, self.box)

    @property
    def pending(self) -> bool:
        return bool(self._inserts or self._updates or self._partials or self._notices or self._hand_backs)

    # The group commit (PostgresJournal.commit) carries the text so far and the
    # notifications its rows cause: delivered at COMMIT, so no box hears of a task
    # before it can claim it.
    _insert_sql, _update_sql = _INSERT, _UPDATE

    def _write_batch(self, cur: psycopg.Cursor) -> None:
        super()._write_batch(cur)
        if self._partials:
            cur.executemany(_PARTIAL, list(self._partials.values()))
        if self._hand_backs:
            cur.executemany(_HAND_BACK, list(self._hand_backs.values()))
        if self._notices:
            cur.executemany("SELECT pg_notify(%s, %s)", sorted(self._notices))

    def _dropped(self) -> None:
        """The inserts are gone (never acknowledged), and with them their announcements;
        `final` notices stay with the updates they go with."""
        super()._dropped()
        self._partials.clear()
        self._notices = {n for n in self._notices if n[0] != QUEUE_CHANNEL}

    def _written(self) -> None:
        super()._written()
        self._partials.clear()
        self._hand_backs.clear()
        self._notices.clear()

    # ------------------------------------------------------------- claims and leases
    def _claimed(self, rows) -> list[Claimed]:
        out = []
        for seq, rec, spec, idem, origin in rows:
            r = _rec.decode(rec)
            if origin is not None:
                self._origin[r.task_id] = origin
            out.append(Claimed(seq, r, _spec.decode(spec), bytes(idem).decode() if idem is not None else None,
                               origin))
        return out

    def claim(self, model: str, n: int, max_level: int, own: bool = False) -> list[Claimed]:
        """Up to `n` unclaimed tasks of `model` at levels 0..max_level, in claim order;
        `own`: only tasks this box accepted (the RAG service: each box has its own index)."""
        params = {"model": model, "n": n, "max_level": max_level, "candidates": CANDIDATES,
                  "aging": self.aging_s, "box": self.box, "lease": self.lease_s, "origin": self.box if own else None}
        return self._claimed(self._use(lambda c: c.execute(_CLAIM, params).fetchall()))

    def claim_overdue(self, now: float, n: int = 256) -> list[Claimed]:
        """Unclaimed tasks past their deadline, of any model: this box ends them (expired)."""
        params = {"now": now, "n": n, "box": self.box, "lease": self.lease_s}
        return self._claimed(self._use(lambda c: c.execute(_OVERDUE, params).fetchall()))

    def take_over(self, task_id: str) -> Claimed | None:
        """Hold a task wherever it is (to cancel it here); the box that held it is told.
        None when it is final already or unknown."""
        def run(conn: psycopg.Connection):
            with conn.transaction():
                row = conn.execute("SELECT seq, record, spec, idem, origin, box, final FROM tasks WHERE task_id=%s"
                                   " FOR UPDATE", (task_id,)).fetchone()
                if row is None or row[6]:
                    return None
                conn.execute("UPDATE tasks SET box=%s, lease_until=now() + make_interval(secs => %s) "
                             "WHERE task_id=%s", (self.box, self.lease_s, task_id))
                if row[5] is not None and row[5] != self.box:
                    conn.execute("SELECT pg_notify(%s, %s)", (box_channel(row[5]), f"cancel {task_id}"))
                return row[:5]
        if "\0" in task_id:
            return None
        row = self._use(run)
        return self._claimed([row])[0] if row is not None else None

    def tick(self, models: list[str], holding: list[str]) -> Tick:
        """Renew the leases of the tasks this box `holding` in memory (one that ran out is
        lost, swept or not: a box cut off for longer than LEASE_S may not carry on as if
        nothing happened; a row this box took but does not hold in memory, after a failure
        between the two, is left to expire and return to the queue), say which models it serves, end the leases of boxes
        that stopped renewing (their tasks go back to the queue), count the backlog."""
        def run(conn: psycopg.Connection) -> Tick:
            with conn.transaction():
                held = {r[0] for r in conn.execute(
                    "UPDATE tasks SET lease_until = now() + make_interval(secs => %s) WHERE box=%s AND NOT final"
                    " AND lease_until >= now() AND task_id = ANY(%s) RETURNING task_id",
                    (self.lease_s, self.box, holding)).fetchall()}
                conn.execute("INSERT INTO boxes (name, models, seen) VALUES (%s, %s, now()) ON CONFLICT (name)"
                             " DO UPDATE SET models=EXCLUDED.models, seen=EXCLUDED.seen", (self.box, models))
                tick = Tick(held)
                woken = set()
                for box, model, level in conn.execute(_SWEEP).fetchall():
                    tick.expired[box] = tick.expired.get(box, 0) + 1
                    woken.add((model, level))
                for model, level in woken:
                    conn.execute("SELECT pg_notify(%s, %s)", (QUEUE_CHANNEL, f"{model} {level}"))
                tick.backlog = conn.execute("SELECT count(*) FROM tasks WHERE box IS NULL AND NOT final").fetchone()[0]
                for name, served, recent in conn.execute(
                        "SELECT name, models, seen > now() - make_interval(secs => %s) FROM boxes",
                        (3 * self.lease_s,)).fetchall():
                    tick.models.update(served)
                    if recent:
                        tick.boxes.append(name)
                return tick
        return self._use(run)

    def release(self) -> int:
        """At a stop: the queued tasks this box holds go back to the queue at once (its
        running ones keep their lease: a quick restart claims them back from its workers)."""
        def run(conn: psycopg.Connection) -> int:
            with conn.transaction():
                rows = conn.execute("UPDATE tasks SET box=NULL, lease_until=NULL WHERE box=%s AND NOT final AND"
                                    " state='queued' RETURNING model, level", (self.box,)).fetchall()
                for model, level in set(rows):
                    conn.execute("SELECT pg_notify(%s, %s)", (QUEUE_CHANNEL, f"{model} {level}"))
                return len(rows)
        return self._use(run)

    def forget(self, task_id: str) -> None:
        """This box no longer holds the task (another one took it over)."""
        self._updates.pop(task_id, None)
        self._partials.pop(task_id, None)
        self._origin.pop(task_id, None)

    # ------------------------------------------------------------- notifications
    def listen(self) -> int:
        """Open the listening connection; its socket, for the broker's poller."""
        self.close_listener()
        conn = self._connect()  # PostgresFailure while the server is away
        try:
            conn.execute(f"LISTEN {QUEUE_CHANNEL}")
            conn.execute(f'LISTEN "{box_channel(self.box)}"')
        except psycopg.Error as exc:
            conn.close()
            raise PostgresFailure(None, cause(exc)) from None
        self.listener = conn
        return conn.fileno()

    def notifications(self) -> list[tuple[str, str]]:
        """(channel, payload) received so far, without waiting. Raises PostgresFailure when
        the listening connection is lost (the caller listens again later)."""
        if self.listener is None:
            return []
        pgconn = self.listener.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            self.close_listener()
            raise PostgresFailure(None, cause(exc)) from None
        out = []
        while (n := pgconn.notifies()) is not None:
            out.append((n.relname.decode(), n.extra.decode()))
        return out

    def close_listener(self) -> None:
        if self.listener is not None:
            try:
                self.listener.close()
            except psycopg.Error:
                pass
            self.listener = None

    def close(self) -> None:
        self.close_listener()
        super().close()
