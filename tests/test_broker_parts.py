"""The broker's parts without sockets: task table, worker pool, health rule."""
from __future__ import annotations

import pytest

from appliance import protocol as P
from appliance.broker._pqueue import PriorityQueue
from appliance.broker.pool import WorkerPool
from appliance.broker.stats import HealthInput, health
from appliance.broker.tasks import TaskTable
from appliance.store.journal import SqliteJournal

SPEC = P.CompleteTask(prompt="x")


@pytest.fixture
def table(tmp_path):
    t = TaskTable(SqliteJournal(tmp_path / "j.sqlite3"), lambda: PriorityQueue(5, 100, 0.0), max_size=100,
                  result_ttl_s=10, tombstone_s=20)
    yield t
    t.journal.close()


def add(table, priority="normal", now=100.0, model="m", **kw):
    return table.add(P.CompleteTask(prompt="x", priority=priority, timeout_s=kw.pop("timeout_s", 60)), model, "t",
                     now, **kw)


def test_queue_order_and_the_oldest_after_a_requeue(table):
    """A task requeued after a lost worker is the oldest queued task (the broker used to
    count it as the newest) and runs next."""
    first, second = add(table, now=1.0), add(table, now=2.0)
    got = table.next_queued("m", 3.0)
    assert got is first
    table.start(got, "w1", 3.0)
    assert table.oldest_queued() is second
    table.requeue(first, lost_on="w1")
    assert table.oldest_queued() is first and first.requeues == 1 and first.record.state == "queued"
    assert first.lost_on == {"w1"} and first.record.attempts == 1
    # back at the head of its level: it waited already
    assert [table.next_queued("m", 4.0) for _ in range(3)] == [first, second, None]


def test_finish_takes_a_task_out_of_every_live_view(table):
    queued, running = add(table), add(table, priority="high")
    table.start(table.next_queued("m", 100.0), "w1", 100.0)
    for task, state in ((queued, "cancelled"), (running, "completed")):
        rec = table.finish(task, state, result=P.TaskResult(text="ok") if state == "completed" else None)
        assert rec.state == state and table.get(task.task_id) is None
    assert table.queued == 0 and table.oldest_queued() is None and table.next_queued("m", 101.0) is None
    table.commit()
    assert table.lookup(running.task_id).result.text == "ok"


def test_lookup_hides_an_expired_result_then_forgets_the_record(table, monkeypatch):
    import appliance.broker.records as records
    monkeypatch.setattr(records, "FINISHED_CACHE", 0)  # read back from the journal
    task = add(table)
    rec = table.finish(table.next_queued("m", 100.0), "completed", result=P.TaskResult(text="phi"))
    table.commit()
    assert task.record is rec and table.lookup(task.task_id, now=rec.finished_at + 5).result.text == "phi"
    late = table.lookup(task.task_id, now=rec.finished_at + 15)
    assert late.result is None and late.result_expired and late.state == "completed"
    assert table.lookup(task.task_id, now=rec.finished_at + 31) is None


def test_deadlines_come_due_in_order(table):
    slow, quick = add(table, timeout_s=50), add(table, timeout_s=5)
    assert [t.task_id for t in table.past_deadline(110.0)] == [quick.task_id]
    table.finish(quick, "expired")
    assert list(table.past_deadline(120.0)) == [] and table.next_deadline() == 150.0
    assert [t.task_id for t in table.past_deadline(151.0)] == [slow.task_id]


def test_idempotency_keys_and_a_failed_commit(table, tmp_path):
    task = add(table, idem="t\0order-1")
    assert table.idempotent("t\0order-1") == task.task_id
    table.forget([task.task_id])  # its commit failed: it never existed for anyone
    assert table.get(task.task_id) is None and table.queued == 0 and table.idempotent("t\0order-1") is None
    again = add(table, idem="t\0order-2")
    table.commit()
    table.finish(again, "cancelled")
    assert table.idem  # released only after the final state is committed ...
    table.commit()
    assert not table.idem and table.idempotent("t\0order-2") == again.task_id  # ... then found in the journal


def test_pool_credit_is_capped_by_free_slots():
    pool = WorkerPool(liveness_s=5)
    w, lost = pool.register(b"w", P.Ready("w", "m", 2, "u"), now=0.0)
    assert lost == set()
    pool.add_credit(w, 5)
    assert w.credit == 2
    pool.assign(w, "a", 2)
    pool.add_credit(w, 1)
    assert w.credit == 1 and set(w.tasks) == {"a"}  # 2 slots, 1 running


def test_pool_re_registration_keeps_what_the_worker_still_runs():
    pool = WorkerPool(liveness_s=5)
    w, _ = pool.register(b"w", P.Ready("w", "m", 3, "u"), now=0.0)
    for t in ("a", "b", "c"):
        pool.assign(w, t, 2)
    again, lost = pool.register(b"w", P.Ready("w", "m", 3, "u", running=["a", "z"]), now=1.0)
    assert set(again.tasks) == {"a"} and lost == {"b", "c"} and len(pool) == 1


def test_pool_silence_and_release():
    pool = WorkerPool(liveness_s=5)
    quiet, _ = pool.register(b"q", P.Ready("q", "m", 1, "u"), now=0.0)
    loud, _ = pool.register(b"l", P.Ready("l", "m", 1, "u"), now=0.0)
    pool.seen(loud, 4.0)
    assert pool.silent(6.0) == [quiet] and pool.dropped == 1
    pool.assign(loud, "t", 2)
    assert pool.release("t") is loud and pool.release("t") is None


BASE = dict(queued=0, workers=1, since_progress_s=0.0, oldest_queued_s=0.0, max_size=100, stall_s=30,
            backlog_wait_s=30)


@pytest.mark.parametrize("change, expected", [
    ({}, "healthy"),
    ({"queued": 5, "workers": 0}, "stalled"),
    ({"queued": 5, "since_progress_s": 31}, "stalled"),
    ({"since_progress_s": 31}, "healthy"),  # nothing queued: idle is not stalled
    ({"queued": 80}, "backing_up"),
    ({"queued": 1, "oldest_queued_s": 31}, "backing_up"),
])
def test_health_rule(change, expected):
    state, reason = health(HealthInput(**{**BASE, **change}))
    assert state == expected and (reason == "") == (expected == "healthy")
