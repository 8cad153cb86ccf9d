"""The broker over real ZeroMQ sockets, with stub workers speaking the protocol."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import zmq

from appliance import protocol as P
from appliance.broker.server import Broker
from appliance.config import load_settings
from appliance.instances import TINY_ALIAS

SPEC = P.CompleteTask(prompt="x", max_tokens=1)


class Peer:
    """A DEALER speaking the protocol, as the API or a launcher would."""

    def __init__(self, endpoint: str, decoder, identity: bytes | None = None):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(endpoint)
        self.decoder = decoder

    def send(self, msg) -> None:
        self.sock.send(P.encode(msg))

    def recv(self, timeout: float = 3.0):
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return self.decoder.decode(self.sock.recv())

    def recv_not(self, kind, timeout: float = 3.0):
        """Next message that is not a `kind` (skips heartbeats)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is not None and not isinstance(msg, kind):
                return msg
        return None

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def settings(tmp_path):
    return load_settings({"APPLIANCE_HOME": str(tmp_path), "QUEUE_MAX_SIZE": "5", "QUEUE_AGING_S": "0",
                          "WORKER_LIVENESS_S": "2"})


class Running:
    def __init__(self, settings):
        self.settings = settings
        self.broker = Broker(settings)
        self.thread = threading.Thread(target=self.broker.run, daemon=True)
        self.thread.start()
        self.peers: list[Peer] = []

    def client(self) -> Peer:
        p = Peer(self.settings.broker_front, P.front_reply)
        self.peers.append(p)
        return p

    def worker(self, name: str, slots: int, credit: int | None = None, model: str = TINY_ALIAS) -> Peer:
        p = Peer(self.settings.broker_back, P.broker_to_worker, name.encode())
        p.send(P.Ready(name, model, slots, "http://127.0.0.1:1"))
        p.send(P.Credit(slots if credit is None else credit))
        self.peers.append(p)
        return p

    def stop(self, drain: bool = False) -> None:
        """Stop now (a second SIGTERM), or `drain` (the first one) and wait for the loop to end."""
        self.broker.stop()
        if not drain:
            self.broker.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()
        for p in self.peers:
            p.close()


@pytest.fixture
def broker(settings):
    running = Running(settings)
    yield running
    running.stop()


def submit(client: Peer, req: int, priority: str = "normal") -> str:
    client.send(P.Submit(req, P.CompleteTask(prompt="x", priority=priority)))
    reply = client.recv()
    assert isinstance(reply, P.Accepted) and reply.req == req, reply
    return reply.task_id


def query(client: Peer, task_id: str) -> P.TaskRecord:
    client.send(P.Query(99, task_id))
    reply = client.recv()
    assert isinstance(reply, P.TaskInfo), reply
    return reply.task


def test_dispatch_respects_credit(broker):
    c = broker.client()
    ids = [submit(c, i) for i in range(3)]
    w = broker.worker("w1", slots=2, credit=1)
    first = w.recv_not(P.Heartbeat)
    assert isinstance(first, P.Dispatch) and first.task_id == ids[0]
    assert w.recv_not(P.Heartbeat, timeout=0.5) is None  # one credit, one task
    w.send(P.Done(first.task_id, result=P.TaskResult(text="ok")))
    w.send(P.Credit(1))
    second = w.recv_not(P.Heartbeat)
    assert second.task_id == ids[1]
    rec = query(c, ids[0])
    assert rec.state == "completed" and rec.result.text == "ok" and rec.worker == "w1"
    assert query(c, ids[1]).state == "running"
    assert query(c, ids[2]).state == "queued"


def test_most_urgent_first(broker):
    c = broker.client()
    low = submit(c, 1, "low")
    normal = submit(c, 2, "normal")
    crit = submit(c, 3, "critical")
    w = broker.worker("w1", slots=3)
    got = [w.recv_not(P.Heartbeat).task_id for _ in range(3)]
    assert got == [crit, normal, low]


def test_unknown_task_and_full_queue_are_refused(broker):
    c = broker.client()
    c.send(P.Query(1, "f" * 32))
    reply = c.recv()
    assert isinstance(reply, P.Refused) and reply.code == "not_found"
    for i in range(5):
        submit(c, i)
    c.send(P.Submit(9, SPEC))
    reply = c.recv()
    assert isinstance(reply, P.Refused) and reply.code == "queue_full" and reply.req == 9


def test_failure_from_worker_is_recorded(broker):
    c = broker.client()
    task_id = submit(c, 1)
    w = broker.worker("w1", slots=1)
    d = w.recv_not(P.Heartbeat)
    w.send(P.Done(d.task_id, error=P.TaskError("llama_rejected", "exceed_context_size_error")))
    time.sleep(0.2)
    rec = query(c, task_id)
    assert rec.state == "failed" and rec.error.code == "llama_rejected" and rec.finished_at


def test_acknowledged_tasks_survive_a_broker_restart(settings):
    first = Running(settings)
    c = first.client()
    ids = [submit(c, i, p) for i, p in enumerate(["low", "critical"])]
    done_id = submit(c, 5)
    w = first.worker("w1", slots=1)
    d = w.recv_not(P.Heartbeat)
    assert d.task_id == ids[1]  # critical first
    w.send(P.Done(d.task_id, result=P.TaskResult(text="kept")))
    time.sleep(0.2)
    first.stop()

    second = Running(settings)
    try:
        c2 = second.client()
        assert query(c2, ids[1]).result.text == "kept"
        assert query(c2, ids[0]).state == "queued"
        assert query(c2, done_id).state == "queued"
        w2 = second.worker("w2", slots=2)
        got = {w2.recv_not(P.Heartbeat).task_id for _ in range(2)}
        assert got == {ids[0], done_id}
    finally:
        second.stop()


def test_silent_worker_is_dropped_and_its_task_requeued(broker):
    c = broker.client()
    task_id = submit(c, 1)
    silent = broker.worker("silent", slots=1)
    assert silent.recv_not(P.Heartbeat).task_id == task_id
    silent.close()  # no more heartbeats from it
    healthy = broker.worker("healthy", slots=1)
    deadline = time.monotonic() + broker.settings.worker_liveness_s + 3
    got = None
    while got is None and time.monotonic() < deadline:
        healthy.send(P.Heartbeat())
        got = healthy.recv_not(P.Heartbeat, timeout=0.5)
    assert isinstance(got, P.Dispatch) and got.task_id == task_id
    assert query(c, task_id).worker == "healthy"
    assert stats(c).workers_dropped == 1


def beat_for(peer: Peer, seconds: float) -> list:
    """Heartbeat like a live worker for `seconds`; what the broker sent meanwhile (not heartbeats)."""
    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        peer.send(P.Heartbeat())
        msg = peer.recv_not(P.Heartbeat, timeout=min(0.3, max(0.01, end - time.monotonic())))
        if msg is not None:
            got.append(msg)
    return got


def test_a_worker_paused_less_than_the_liveness_window_keeps_its_task(tmp_path):
    """A launcher starved of CPU for a while is not dead: its task is not run twice."""
    b = Running(load_settings({"APPLIANCE_HOME": str(tmp_path), "WORKER_LIVENESS_S": "4"}))
    try:
        c = b.client()
        task_id = submit(c, 1)
        paused = b.worker("paused", slots=1)
        assert paused.recv_not(P.Heartbeat).task_id == task_id
        spare = b.worker("spare", slots=1)
        assert beat_for(spare, 2.5) == []  # `paused` says nothing for 2.5 s; nothing moves to `spare`
        paused.send(P.Done(task_id, result=P.TaskResult(text="late but fine")))
        time.sleep(0.2)
        rec = query(c, task_id)
        assert rec.state == "completed" and rec.worker == "paused" and rec.result.text == "late but fine"
        assert stats(c).workers_dropped == 0
    finally:
        b.stop()


def test_a_worker_that_reconnects_keeps_the_tasks_it_still_runs(broker):
    c = broker.client()
    ids = [submit(c, i) for i in range(2)]
    w = broker.worker("w1", slots=2)
    got = {w.recv_not(P.Heartbeat).task_id for _ in range(2)}
    assert got == set(ids)
    # it reconnects (it found the broker silent) and says it still runs only the first one
    w.send(P.Ready("w1", TINY_ALIAS, 2, "http://127.0.0.1:1", running=[ids[0]]))
    w.send(P.Credit(1))
    requeued = w.recv_not(P.Heartbeat)
    assert isinstance(requeued, P.Dispatch) and requeued.task_id == ids[1]  # the one it lost comes back
    assert query(c, ids[0]).state == "running" and query(c, ids[0]).worker == "w1"
    w.send(P.Done(ids[0], result=P.TaskResult(text="once")))
    time.sleep(0.2)
    assert query(c, ids[0]).state == "completed"


def test_after_a_broker_restart_the_worker_claims_its_running_task_back(settings):
    first = Running(settings)
    c = first.client()
    task_id = submit(c, 1)
    w = first.worker("w1", slots=1)
    assert w.recv_not(P.Heartbeat).task_id == task_id
    first.peers.remove(w)  # the worker outlives the broker
    first.stop()
    second = Running(settings)
    second.peers.append(w)
    try:
        c2 = second.client()
        assert query(c2, task_id).state == "queued"  # the journal had it running: back in line ...
        w.send(P.Ready("w1", TINY_ALIAS, 1, "http://127.0.0.1:1", running=[task_id]))  # ... until its worker speaks
        time.sleep(0.2)
        other = second.worker("w2", slots=1)
        assert beat_for(other, 0.5) == []  # not dispatched a second time
        rec = query(c2, task_id)
        assert rec.state == "running" and rec.worker == "w1"
        w.send(P.Done(task_id, result=P.TaskResult(text="ran once")))
        time.sleep(0.2)
        assert query(c2, task_id).result.text == "ran once"
    finally:
        second.stop()


def test_unknown_worker_is_asked_to_register(broker):
    stranger = Peer(broker.settings.broker_back, P.broker_to_worker, b"stranger")
    broker.peers.append(stranger)
    stranger.send(P.Credit(1))
    assert isinstance(stranger.recv_not(P.Heartbeat), P.Disconnect)


def cancel(client: Peer, task_id: str):
    client.send(P.Cancel(7, task_id))
    return client.recv()


def stats(client: Peer) -> P.Stats:
    client.send(P.GetStats(8))
    reply = client.recv()
    assert isinstance(reply, P.Stats), reply
    return reply


def test_cancel_a_queued_task(broker):
    c = broker.client()
    keep, drop = submit(c, 1), submit(c, 2)
    reply = cancel(c, drop)
    assert isinstance(reply, P.TaskInfo) and reply.task.state == "cancelled"
    again = cancel(c, drop)
    assert isinstance(again, P.Refused) and again.code == "already_final"
    unknown = cancel(c, "e" * 32)
    assert isinstance(unknown, P.Refused) and unknown.code == "not_found"
    w = broker.worker("w1", slots=2)
    assert w.recv_not(P.Heartbeat).task_id == keep
    assert w.recv_not(P.Heartbeat, timeout=0.5) is None  # the cancelled one never runs
    assert stats(c).finished == {"cancelled": 1}


def test_cancel_a_running_task_aborts_it_on_its_worker(broker):
    c = broker.client()
    task_id = submit(c, 1)
    w = broker.worker("w1", slots=1)
    assert w.recv_not(P.Heartbeat).task_id == task_id
    assert cancel(c, task_id).task.state == "cancelled"
    abort = w.recv_not(P.Heartbeat)
    assert abort == P.Abort(task_id, "cancelled")
    # the worker's late answer does not resurrect it
    w.send(P.Done(task_id, error=P.TaskError("cancelled", "aborted")))
    w.send(P.Credit(1))
    time.sleep(0.2)
    assert query(c, task_id).state == "cancelled"


def test_queued_task_past_its_deadline_expires(broker):
    c = broker.client()
    c.send(P.Submit(1, P.CompleteTask(prompt="x", timeout_s=0.3)))
    task_id = c.recv().task_id
    time.sleep(0.6)
    rec = query(c, task_id)
    assert rec.state == "expired" and rec.error.code == "deadline"


def test_running_task_past_its_deadline_is_aborted_and_failed(broker):
    c = broker.client()
    c.send(P.Submit(1, P.CompleteTask(prompt="x", timeout_s=0.5)))
    task_id = c.recv().task_id
    w = broker.worker("w1", slots=1)
    assert w.recv_not(P.Heartbeat).task_id == task_id
    assert w.recv_not(P.Heartbeat, timeout=2) == P.Abort(task_id, "timeout")
    rec = query(c, task_id)
    assert rec.state == "failed" and rec.error.code == "timeout"


def test_timeout_over_the_configured_bound_is_refused(broker):
    c = broker.client()
    c.send(P.Submit(1, P.CompleteTask(prompt="x", timeout_s=10_000)))
    reply = c.recv()
    assert isinstance(reply, P.Refused) and reply.code == "invalid_field" and "timeout_s" in reply.message


def test_batch_is_all_or_nothing(broker):
    c = broker.client()
    specs = [P.CompleteTask(prompt=str(i)) for i in range(3)]
    c.send(P.SubmitBatch(1, specs))
    ok = c.recv()
    assert isinstance(ok, P.BatchAccepted) and len(set(ok.task_ids)) == 3
    c.send(P.SubmitBatch(2, specs))  # 3 more do not fit in 5
    full = c.recv()
    assert isinstance(full, P.Refused) and full.code == "queue_full"
    c.send(P.SubmitBatch(3, [specs[0], P.CompleteTask(prompt="x", timeout_s=10_000)]))
    bad = c.recv()
    assert isinstance(bad, P.Refused) and bad.code == "invalid_field" and bad.message.startswith("tasks[1].timeout_s")
    assert stats(c).queued == 3  # neither refused batch left anything behind


def test_status_shows_queue_position(broker):
    c = broker.client()
    ids = [submit(c, i, p) for i, p in enumerate(["low", "normal", "normal", "critical"])]
    for task_id, expected in zip(ids, [3, 1, 2, 0]):
        c.send(P.Query(1, task_id))
        assert c.recv().position == expected


def test_stats_and_health(broker):
    c = broker.client()
    for i, p in enumerate(["low", "low", "critical"]):
        submit(c, i, p)
    st = stats(c)
    assert st.depth == {"critical": 1, "high": 0, "normal": 0, "low": 2, "batch": 0}
    assert st.queued == 3 and st.max_size == 5
    assert st.health == "stalled" and "no model instance" in st.health_reason  # queued, nobody to run it
    w = broker.worker("w1", slots=3)
    got = [w.recv_not(P.Heartbeat) for _ in range(3)]
    for d in got:
        w.send(P.Done(d.task_id, result=P.TaskResult(text="")))
    time.sleep(0.2)
    st = stats(c)
    assert st.health == "healthy" and st.finished == {"completed": 3} and st.completed_per_min == 3
    assert [(x.name, x.slots, x.running) for x in st.workers] == [("w1", 3, 0)]
    assert st.dispatch_p50_ms > 0


def test_a_task_lost_twice_fails_worker_lost(broker):
    c = broker.client()
    task_id = submit(c, 1)
    for name in ("a", "b"):
        w = broker.worker(name, slots=1)
        assert w.recv_not(P.Heartbeat).task_id == task_id
        w.send(P.Disconnect())
        time.sleep(0.1)
    rec = query(c, task_id)
    assert rec.state == "failed" and rec.error.code == "worker_lost"


@pytest.fixture
def short_ttl(tmp_path):
    return load_settings({"APPLIANCE_HOME": str(tmp_path), "RESULT_TTL_S": "0.5", "RESULT_TOMBSTONE_S": "1"})


def test_results_expire_then_are_forgotten(short_ttl, monkeypatch):
    import appliance.broker.server as server
    import appliance.broker.records as records
    monkeypatch.setattr(records, "FINISHED_CACHE", 1)  # older records come from the journal
    monkeypatch.setattr(server, "EXPIRE_EVERY_S", 0.1)
    b = Running(short_ttl)
    try:
        c = b.client()
        ids = [submit(c, i) for i in range(2)]
        w = b.worker("w1", slots=2)
        for _ in range(2):
            d = w.recv_not(P.Heartbeat)
            w.send(P.Done(d.task_id, result=P.TaskResult(text="phi")))
        time.sleep(0.2)
        assert [query(c, t).result.text for t in ids] == ["phi", "phi"]  # one from cache, one from SQLite
        time.sleep(0.6)
        for t in ids:
            rec = query(c, t)
            assert rec.state == "completed" and rec.result_expired and rec.result is None
        time.sleep(1.2)
        c.send(P.Query(1, ids[0]))
        assert c.recv().code == "not_found"
    finally:
        b.stop()


@pytest.fixture
def cpu_hogs():
    """Two busy processes: the 'loaded machine' under which acknowledgements were lost."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for h in hogs:
        h.kill()
        h.wait()


def test_every_pipelined_submit_is_acknowledged_on_a_loaded_machine(tmp_path, cpu_hogs, monkeypatch):
    """One connection sends 20,000 submits before reading a single reply: far past the
    high-water marks (made small here, so that kernel buffers cannot hide the point),
    where the front ROUTER used to drop replies silently."""
    import appliance.broker.outbox as outbox
    monkeypatch.setattr(outbox, "SNDHWM", 100)
    n = 20_000
    s = load_settings({"APPLIANCE_HOME": str(tmp_path), "QUEUE_MAX_SIZE": str(n)})
    b = Running(s)
    try:
        c = b.client()
        c.sock.setsockopt(zmq.RCVHWM, 100)
        c.sock.disconnect(s.broker_front)  # RCVHWM applies to connections made after it is set
        c.sock.connect(s.broker_front)
        payloads = [P.encode(P.Submit(i, SPEC)) for i in range(n)]
        for payload in payloads:
            c.sock.send(payload)  # blocks only while the broker is behind on reading
        got = set()
        while len(got) < n:
            reply = c.recv(timeout=30)
            assert reply is not None, f"{n - len(got)} of {n} submits never acknowledged"
            assert isinstance(reply, P.Accepted), reply
            got.add(reply.req)
        assert got == set(range(n))
        st = stats(c)
        assert st.queued == n and st.replies_undeliverable == 0
        assert st.replies_deferred > 0  # the test did reach the point where replies had to wait
    finally:
        b.stop()


def test_outbox_keeps_order_for_a_slow_reader_and_counts_the_undeliverable(monkeypatch):
    """The front socket's outbox, alone: a reader slower than the high-water mark gets
    every reply in order; a peer that is gone is counted, not silently skipped."""
    import appliance.broker.outbox as outbox
    monkeypatch.setattr(outbox, "SNDHWM", 10)
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    box = outbox.Outbox(router)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    reader = ctx.socket(zmq.DEALER)
    reader.setsockopt(zmq.IDENTITY, b"slow")
    reader.setsockopt(zmq.RCVHWM, 10)
    reader.connect(f"tcp://127.0.0.1:{port}")
    try:
        reader.send(b"hello")
        assert router.poll(2000) and router.recv_multipart() == [b"slow", b"hello"]
        for i in range(2000):
            box.send(b"slow", str(i).encode())
        assert box.deferred > 0 and box.backlog() > 0
        got = []
        while len(got) < 2000:
            box.flush()
            if reader.poll(50):
                got.append(int(reader.recv()))
        assert got == list(range(2000)) and box.backlog() == 0 and box.undeliverable == 0
        box.send(b"never-connected", b"x")
        reader.close(0)
        time.sleep(0.3)  # the router notices the peer left
        box.send(b"slow", b"y")
        assert box.undeliverable == 2
    finally:
        reader.close(0)
        router.close(0)


def test_a_draining_broker_refuses_new_work_lets_running_tasks_finish_and_keeps_the_queue(settings):
    """The first SIGTERM drains: submits are refused `shutting_down` (the API's 503),
    nothing queued is dispatched any more, the running task's result is still taken,
    and the loop ends once nothing runs. The next start has the queued task, and the
    finished one is not run again."""
    first = Running(settings)
    c = first.client()
    running_id, queued_id = submit(c, 1), submit(c, 2)
    w = first.worker("w1", slots=1)
    d = w.recv_not(P.Heartbeat)
    assert d.task_id == running_id
    first.broker.stop()  # SIGTERM
    c.send(P.Submit(3, SPEC))
    refused = c.recv()
    assert isinstance(refused, P.Refused) and refused.code == "shutting_down"
    c.send(P.Ping(4))
    assert c.recv().draining is True
    w.send(P.Done(running_id, result=P.TaskResult(text="finished in the drain")))
    w.send(P.Credit(1))
    assert w.recv_not(P.Heartbeat, timeout=0.5) in (None, P.Disconnect())  # the queued task stays queued
    first.thread.join(5)
    assert not first.thread.is_alive()  # nothing ran any more: the drain ended by itself
    first.stop()

    second = Running(settings)
    try:
        c2 = second.client()
        assert query(c2, running_id).result.text == "finished in the drain"
        assert query(c2, queued_id).state == "queued"
        w2 = second.worker("w2", slots=2)
        assert w2.recv_not(P.Heartbeat).task_id == queued_id  # and only that one
        assert w2.recv_not(P.Heartbeat, timeout=0.5) is None
    finally:
        second.stop()


def test_a_drain_ends_after_its_grace_and_the_unfinished_task_runs_again_next_time(tmp_path):
    s = load_settings({"APPLIANCE_HOME": str(tmp_path), "DRAIN_GRACE_S": "0.5"})
    first = Running(s)
    c = first.client()
    task_id = submit(c, 1)
    w = first.worker("w1", slots=1)
    assert w.recv_not(P.Heartbeat).task_id == task_id
    t0 = time.monotonic()
    first.broker.stop()
    first.thread.join(5)
    assert not first.thread.is_alive() and 0.4 < time.monotonic() - t0 < 3
    first.stop()
    second = Running(s)
    try:
        c2 = second.client()
        assert query(c2, task_id).state == "queued"  # not lost: it runs again
        w2 = second.worker("w2", slots=1)
        assert w2.recv_not(P.Heartbeat).task_id == task_id
    finally:
        second.stop()


def test_a_stopping_worker_gets_no_new_work_but_its_result_counts(broker):
    c = broker.client()
    first = submit(c, 1)
    w = broker.worker("w1", slots=2)
    assert w.recv_not(P.Heartbeat).task_id == first
    w.send(P.Stopping())
    second = submit(c, 2)
    w.send(P.Credit(1))  # a stopping worker's credit is void
    assert w.recv_not(P.Heartbeat, timeout=0.5) is None
    st = stats(c)
    assert st.workers[0].stopping and st.workers[0].credit == 0
    w.send(P.Done(first, result=P.TaskResult(text="ok")))
    time.sleep(0.2)
    assert query(c, first).state == "completed" and query(c, second).state == "queued"
    other = broker.worker("w2", slots=1)
    assert other.recv_not(P.Heartbeat).task_id == second


def test_a_task_whose_model_server_went_away_runs_again_on_another_instance(broker):
    """llama.cpp killed under a running task is the instance's failure, not the task's:
    the task is requeued (avoiding that instance) and says so with `attempts: 2`."""
    c = broker.client()
    task_id = submit(c, 1)
    w1 = broker.worker("w1", slots=1)
    assert w1.recv_not(P.Heartbeat).task_id == task_id
    w2 = broker.worker("w2", slots=1)
    w1.send(P.Done(task_id, error=P.TaskError("llama_unavailable", "ConnectionRefusedError")))
    assert w2.recv_not(P.Heartbeat).task_id == task_id
    w2.send(P.Done(task_id, result=P.TaskResult(text="second time")))
    time.sleep(0.2)
    rec = query(c, task_id)
    assert (rec.state, rec.attempts, rec.worker, rec.result.text) == ("completed", 2, "w2", "second time")


def test_a_task_lost_by_the_only_instance_waits_for_it_to_come_back(broker):
    """The instance's llama.cpp died under a task and it has a free slot still: the task is
    not sent straight back to it (where it would be lost a second time when the launcher
    exits, and fail worker_lost); it goes back once the launcher offers a slot again
    (health checked) or registers anew (restarted), and says attempts: 2."""
    c = broker.client()
    task_id = submit(c, 1)
    w1 = broker.worker("w1", slots=2)
    assert w1.recv_not(P.Heartbeat).task_id == task_id
    w1.send(P.Done(task_id, error=P.TaskError("llama_unavailable", "ConnectionRefusedError")))
    assert w1.recv_not(P.Heartbeat, timeout=1.0) is None  # its other slot is free, but it is suspect
    assert query(c, task_id).state == "queued"
    other = submit(c, 2)  # nor does new work go to it
    assert w1.recv_not(P.Heartbeat, timeout=0.5) is None
    w1.send(P.Ready("w1", TINY_ALIAS, 2, "http://127.0.0.1:1", starts=2))  # restarted
    w1.send(P.Credit(2))
    got = {w1.recv_not(P.Heartbeat).task_id, w1.recv_not(P.Heartbeat).task_id}
    assert got == {task_id, other}
    w1.send(P.Done(task_id, result=P.TaskResult(text="second time")))
    time.sleep(0.2)
    rec = query(c, task_id)
    assert (rec.state, rec.attempts, rec.result.text) == ("completed", 2, "second time")


def test_an_instance_whose_launcher_found_it_healthy_gets_work_again(broker):
    """A single failed request on a live llama.cpp: the launcher checks its health and
    returns the slot (Credit); the instance is no longer suspect."""
    c = broker.client()
    task_id = submit(c, 1)
    w1 = broker.worker("w1", slots=1)
    assert w1.recv_not(P.Heartbeat).task_id == task_id
    w1.send(P.Done(task_id, error=P.TaskError("llama_unavailable", "RemoteDisconnected")))
    w1.send(P.Credit(1))
    again = w1.recv_not(P.Heartbeat)
    assert isinstance(again, P.Dispatch) and again.task_id == task_id
