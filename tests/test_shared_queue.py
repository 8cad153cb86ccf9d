"""Several brokers on one PostgreSQL queue (QUEUE_SCOPE=shared), each with stub workers.

Each box here is a real broker (in a thread, on its own sockets) and the queue is a
real PostgreSQL server: claims, notifications, leases and fencing are the server's
behaviour. The whole appliance on several boxes is in test_e2e_boxes.py.
"""
from __future__ import annotations

import pytest

from appliance import protocol as P
from appliance.config import ConfigError, load_settings
from appliance.instances import TINY_ALIAS
from conftest import wait_until
from support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from test_broker import Peer, Running, query, submit

LEASE_S = "2"


def box_settings(tmp_path, url: str, name: str, **extra: str):
    home = tmp_path / name
    home.mkdir()
    return load_settings({"APPLIANCE_HOME": str(home), "DATABASE_URL": url, "QUEUE_SCOPE": "shared",
                          "BOX_NAME": name, "LEASE_S": LEASE_S, "QUEUE_AGING_S": "0", "WORKER_LIVENESS_S": "5",
                          **extra})


@pytest.fixture
def boxes(tmp_path, postgres_url):
    started: list[Running] = []

    def start(name: str, **extra: str) -> Running:
        running = Running(box_settings(tmp_path, postgres_url, name, **extra))
        started.append(running)
        return running
    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def registered(*running: Running) -> None:
    """Until each box has its workers (Ready is asynchronous: a submit may overtake it)."""
    for r in running:
        c = r.client()

        def workers():
            c.send(P.GetStats(1))
            st = c.recv()
            return st is not None and len(st.workers) == sum(1 for p in r.peers if p.decoder is P.broker_to_worker)
        wait_until(workers, 5, what="workers registered")


def dispatched(worker: Peer, timeout: float = 5.0) -> P.Dispatch:
    msg = worker.recv_not(P.Heartbeat, timeout)
    assert isinstance(msg, P.Dispatch), msg
    return msg


def row(postgres_server, url: str, task_id: str, columns: str = "box, state"):
    return postgres_server.sql(f"SELECT {columns} FROM tasks WHERE task_id='{task_id}'", url.rsplit("/", 1)[1])[0]


def test_shared_queue_needs_postgres_and_a_valid_box_name(tmp_path):
    with pytest.raises(ConfigError, match="QUEUE_SCOPE=shared needs DATABASE_URL=postgresql"):
        load_settings({"APPLIANCE_HOME": str(tmp_path), "QUEUE_SCOPE": "shared"})
    with pytest.raises(ConfigError, match="BOX_NAME"):
        load_settings({"APPLIANCE_HOME": str(tmp_path), "QUEUE_SCOPE": "shared", "BOX_NAME": "Box A!",
                       "DATABASE_URL": "postgresql://u@localhost/db"})


def test_a_box_with_room_runs_its_submits_and_a_busy_box_leaves_them_to_another(boxes, postgres_server,
                                                                                  postgres_url):
    a, b = boxes("a"), boxes("b")
    wa, wb = a.worker("wa", slots=1), b.worker("wb", slots=1)
    registered(a, b)
    ca = a.client()
    first = submit(ca, 1)
    assert dispatched(wa).task_id == first  # room here: held and run by the box that accepted it
    second = submit(ca, 2)                  # none left here: the other box claims it
    assert dispatched(wb).task_id == second
    assert wa.recv_not(P.Heartbeat, timeout=0.3) is None
    wb.send(P.Done(second, result=P.TaskResult(text="from b")))
    wait_until(lambda: query(ca, second).state == "completed", 5, what="the result seen through box a")
    rec = query(ca, second)
    assert rec.box == "b" and rec.attempts == 1 and rec.worker == "wb"
    got = ca.send(P.Query(7, second)) or ca.recv()
    assert got.task.result.text == "from b"
    assert row(postgres_server, postgres_url, first) == ("a", "running")


def test_claims_follow_priority_then_tenant_turns(boxes):
    a, b = boxes("a"), boxes("b")
    ca = a.client()  # box a serves nothing: every task it accepts waits in the shared queue
    order = []
    for req, (tenant, priority) in enumerate([("t1", "normal"), ("t1", "normal"), ("t1", "normal"),
                                              ("t2", "normal"), ("t1", "low"), ("t2", "critical")]):
        ca.send(P.Submit(req, P.CompleteTask(prompt="x", priority=priority), tenant=tenant))
        reply = ca.recv()
        assert isinstance(reply, P.Accepted), reply
        order.append((tenant, priority, reply.task_id))
    wb = b.worker("wb", slots=1)  # one slot: it claims one task at a time
    ran = []
    for _ in order:
        d = dispatched(wb)
        ran.append(next((t, p) for t, p, i in order if i == d.task_id))
        wb.send(P.Done(d.task_id, result=P.TaskResult(text="ok")))
        wb.send(P.Credit(1))
    assert ran == [("t2", "critical"), ("t1", "normal"), ("t2", "normal"), ("t1", "normal"), ("t1", "normal"),
                   ("t1", "low")]


def test_a_dead_box_s_running_task_runs_again_on_another_after_its_lease(boxes, postgres_server, postgres_url):
    a, b = boxes("a"), boxes("b")
    wa = a.worker("wa", slots=1)
    registered(a)
    ca = a.client()
    task_id = submit(ca, 1)
    assert dispatched(wa).task_id == task_id
    queued_id = submit(ca, 2)  # held by nobody yet: no box has room
    assert row(postgres_server, postgres_url, queued_id) == (None, "queued")
    a.stop()  # box a is gone; its instance never answers again
    wb = b.worker("wb", slots=1)
    d = dispatched(wb, timeout=10)
    assert d.task_id == queued_id  # the queued one was never a's: it runs at once
    wb.send(P.Done(queued_id, result=P.TaskResult(text="q")))
    wb.send(P.Credit(1))
    d = dispatched(wb, timeout=10)  # a's lease ran out (2 s): its running task comes back
    assert d.task_id == task_id
    wb.send(P.Done(task_id, result=P.TaskResult(text="again")))
    cb = b.client()
    wait_until(lambda: query(cb, task_id).state == "completed", 5, what="completed on box b")
    rec = query(cb, task_id)
    assert rec.attempts == 2 and rec.box == "b"        # it ran twice, and says so
    assert query(cb, queued_id).attempts == 1           # the queued one ran once


def test_a_box_cut_off_past_its_lease_cannot_overwrite_the_task(boxes, postgres_server, postgres_url):
    """A partition, made in the database: box a's lease is over while it still runs the task."""
    a, b = boxes("a"), boxes("b")
    wa, wb = a.worker("wa", slots=1), b.worker("wb", slots=1)
    registered(a, b)
    ca = a.client()
    task_id = submit(ca, 1)
    assert dispatched(wa).task_id == task_id
    db = postgres_url.rsplit("/", 1)[1]
    postgres_server.sql("UPDATE tasks SET lease_until = now() - interval '1 second' WHERE box = 'a'", db)
    assert dispatched(wb, timeout=10).task_id == task_id  # b's sweep returned it, b claimed it
    abort = wa.recv_not(P.Heartbeat, timeout=5)  # a's next renewal: not its task any more
    assert isinstance(abort, P.Abort) and abort.task_id == task_id
    wa.send(P.Done(task_id, result=P.TaskResult(text="late, from a")))
    wb.send(P.Done(task_id, result=P.TaskResult(text="from b")))
    cb = b.client()
    wait_until(lambda: query(cb, task_id).state == "completed", 5, what="completed")
    cb.send(P.Query(5, task_id))
    assert cb.recv().task.result.text == "from b"
    assert row(postgres_server, postgres_url, task_id, "box, state, result IS NOT NULL") == ("b", "completed", True)
    ca.send(P.Query(6, task_id))
    assert ca.recv().task.result.text == "from b"


def test_cancel_through_another_box_stops_the_task_where_it_runs(boxes):
    a, b = boxes("a"), boxes("b")
    wb = b.worker("wb", slots=1)
    registered(b)
    cb = b.client()
    task_id = submit(cb, 1)
    assert dispatched(wb).task_id == task_id
    ca = a.client()
    ca.send(P.Cancel(2, task_id))
    reply = ca.recv()
    assert isinstance(reply, P.TaskInfo) and reply.task.state == "cancelled", reply
    abort = wb.recv_not(P.Heartbeat, timeout=3)  # told by NOTIFY, well before its lease's renewal
    assert isinstance(abort, P.Abort) and abort.task_id == task_id
    assert query(cb, task_id).state == "cancelled"
    ca.send(P.Cancel(3, task_id))
    again = ca.recv()
    assert isinstance(again, P.Refused) and again.code == "already_final"


def test_status_on_another_box_shows_the_text_so_far(boxes):
    a, b = boxes("a"), boxes("b")
    wb = b.worker("wb", slots=1)
    registered(b)
    task_id = submit(b.client(), 1)
    assert dispatched(wb).task_id == task_id
    wb.send(P.Tokens(task_id, 1, "The pat"))
    wb.send(P.Tokens(task_id, 2, "ient"))
    ca = a.client()

    def so_far():
        ca.send(P.Query(9, task_id))
        info = ca.recv()
        return info.text_so_far == "The patient" and info.tokens_seq == 2 and info.task.state == "running"
    wait_until(so_far, 5, what="the text so far through box a")


def test_a_model_only_another_box_serves_is_accepted_and_left_for_it(boxes):
    a, b = boxes("a"), boxes("b")
    wa = a.worker("wa", slots=2)                 # the tiny model
    wb = b.worker("wb", slots=1, model="other")  # a model box a has no instance of
    ca = a.client()

    def accepted():
        ca.send(P.Submit(1, P.CompleteTask(prompt="x", model="other")))
        reply = ca.recv()
        return reply if isinstance(reply, P.Accepted) else None
    reply = wait_until(accepted, 5, interval=0.2, what="box a knows box b's model (its lease renewal)")
    assert dispatched(wb).task_id == reply.task_id
    assert wa.recv_not(P.Heartbeat, timeout=0.5) is None
    assert query(ca, submit(ca, 2)).model == TINY_ALIAS


def test_an_idempotency_key_holds_across_boxes(boxes):
    a, b = boxes("a"), boxes("b")
    ca, cb = a.client(), b.client()
    ca.send(P.Submit(1, P.CompleteTask(prompt="x"), idempotency_key="order-17"))
    first = ca.recv()
    cb.send(P.Submit(2, P.CompleteTask(prompt="x"), idempotency_key="order-17"))
    second = cb.recv()
    assert isinstance(first, P.Accepted) and isinstance(second, P.Accepted)
    assert first.task_id == second.task_id


def test_a_box_claims_as_many_tasks_as_it_has_free_slots_in_one_go(boxes):
    a, b = boxes("a"), boxes("b")
    ca = a.client()  # box a serves nothing
    ids = {submit(ca, i) for i in range(5)}
    wb = b.worker("wb", slots=3)
    got = {dispatched(wb).task_id for _ in range(3)}  # one tenant, three tasks: one claim
    assert got <= ids and len(got) == 3
    assert wb.recv_not(P.Heartbeat, timeout=0.5) is None  # no more than its slots


def test_claims_take_tasks_in_arrival_order_whichever_box_accepted_them(boxes):
    """Sequence numbers come in blocks per box (b's are all above a's): arrival is the
    server's time of the insert, or a's later tasks would overtake b's earlier ones."""
    a, b = boxes("a"), boxes("b")
    ca, cb = a.client(), b.client()
    order = [submit(cb, 1), submit(ca, 2), submit(cb, 3), submit(ca, 4)]
    c = boxes("c")
    wc = c.worker("wc", slots=1)
    ran = []
    for _ in order:
        d = dispatched(wc)
        ran.append(d.task_id)
        wc.send(P.Done(d.task_id, result=P.TaskResult(text="ok")))
        wc.send(P.Credit(1))
    assert ran == order


def test_a_row_a_box_took_but_does_not_hold_in_memory_returns_to_the_queue(boxes, postgres_server, postgres_url):
    """As after a failure between taking a row and holding its task: the box renews only
    what it holds, so the row's lease runs out and another box runs the task."""
    a, b = boxes("a"), boxes("b")
    task_id = submit(a.client(), 1)  # no box has an instance: unclaimed
    db = postgres_url.rsplit("/", 1)[1]
    postgres_server.sql(f"UPDATE tasks SET box='a', lease_until=now() + interval '2 seconds' "
                        f"WHERE task_id='{task_id}'", db)
    wb = b.worker("wb", slots=1)
    assert dispatched(wb, timeout=10).task_id == task_id


def lost_on_a(boxes) -> tuple[Running, Peer, str]:
    """A task running on box a's only instance, which goes away mid-task: (b, b's worker, the task)."""
    a, b = boxes("a"), boxes("b")
    wa = a.worker("wa", slots=1)
    registered(a)
    task_id = submit(a.client(), 1)
    assert dispatched(wa).task_id == task_id
    wb = b.worker("wb", slots=1)
    registered(b)
    wa.send(P.Disconnect())
    return b, wb, task_id


def test_a_task_whose_box_has_no_instance_left_goes_to_another_box(boxes):
    b, wb, task_id = lost_on_a(boxes)
    d = dispatched(wb)        # handed back at once: no lease to wait for
    assert d.task_id == task_id
    wb.send(P.Done(task_id, result=P.TaskResult(text="ok")))
    cb = b.client()
    wait_until(lambda: query(cb, task_id).state == "completed", 5, what="completed on b")
    rec = query(cb, task_id)
    assert rec.attempts == 2 and rec.box == "b"


def test_a_task_that_lost_its_instance_on_two_boxes_fails_worker_lost(boxes):
    b, wb, task_id = lost_on_a(boxes)
    assert dispatched(wb).task_id == task_id
    wb.send(P.Disconnect())  # lost again, on the other box: not a third run
    cb = b.client()
    wait_until(lambda: query(cb, task_id).state == "failed", 5, what="failed")
    rec = query(cb, task_id)
    assert rec.error.code == "worker_lost" and rec.attempts == 2


def test_a_rag_task_let_go_by_its_box_is_claimed_back_by_that_box_only(boxes, postgres_server, postgres_url):
    """Each box has its own document index: a RAG task runs on the box that accepted it,
    also after that box lost its lease (it was down longer than LEASE_S)."""
    a, b = boxes("a"), boxes("b")
    ca = a.client()
    ca.send(P.Submit(1, P.RagSearchTask(query="chest pain")))
    reply = ca.recv()
    assert isinstance(reply, P.Accepted), reply
    db = postgres_url.rsplit("/", 1)[1]
    assert row(postgres_server, postgres_url, reply.task_id) == ("a", "queued")  # held here: no RAG worker yet
    postgres_server.sql("UPDATE tasks SET lease_until = now() - interval '1 second' WHERE box = 'a'", db)
    wait_until(lambda: row(postgres_server, postgres_url, reply.task_id)[0] is None, 10, what="swept")
    rb = b.worker("rag-b", slots=2, model=P.RAG_SERVICE)
    assert rb.recv_not(P.Heartbeat, timeout=3) is None  # not box b's to run
    ra = a.worker("rag-a", slots=2, model=P.RAG_SERVICE)
    assert dispatched(ra, timeout=5).task_id == reply.task_id


def test_a_pinned_task_its_box_let_go_fails_rather_than_running_elsewhere(boxes, postgres_server, postgres_url):
    a, b = boxes("a"), boxes("b")
    ca = a.client()
    ca.send(P.Submit(1, P.CompleteTask(prompt="x"), pin="llama-0"))  # a GPU benchmark pins an instance of a
    reply = ca.recv()
    assert isinstance(reply, P.Accepted), reply
    db = postgres_url.rsplit("/", 1)[1]
    postgres_server.sql("UPDATE tasks SET lease_until = now() - interval '1 second' WHERE box = 'a'", db)
    wb = b.worker("wb", slots=1)
    cb = b.client()
    wait_until(lambda: query(cb, reply.task_id).state == "failed", 10, what="failed on b")
    assert query(cb, reply.task_id).error.code == "worker_lost"
    assert wb.recv_not(P.Heartbeat, timeout=0.3) is None
