"""The service-aware broker over real sockets, with stub workers: models, reserved
slots, preemption, affinity and retries elsewhere."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance import protocol as P
from appliance.config import load_settings
from appliance.instances import TINY_ALIAS as TINY
from conftest import wait_until
from test_broker import Peer, Running, query, stats

TWO_MODELS = """
[[instance]]
name = "a-0"
alias = "model-a"
[[instance]]
name = "b-0"
alias = "model-b"
model = "{b}"
"""


@pytest.fixture
def two_models(tmp_path):
    b = tmp_path / "b.gguf"
    b.write_bytes(b"x")
    (tmp_path / "instances.toml").write_text(TWO_MODELS.format(b=b))
    running = Running(load_settings({"APPLIANCE_HOME": str(tmp_path), "WORKER_LIVENESS_S": "5",
                                     "CRITICAL_MAX_WAIT_MS": "0"}))
    yield running
    running.stop()


def submit(c, req, **kw) -> P.Accepted | P.Refused:
    c.send(P.Submit(req, P.CompleteTask(prompt="x", **kw)))
    return c.recv()


def ready(b, name, model, slots, reserved=0):
    w = Peer(b.settings.broker_back, P.broker_to_worker, name.encode())
    b.peers.append(w)
    w.send(P.Ready(name, model, slots, "http://127.0.0.1:1", reserved=reserved))
    w.send(P.Credit(slots))
    return w


def applied(c, t: P.Telemetry) -> bool:
    c.send(P.GetGpu(9))
    reply = c.recv()
    assert isinstance(reply, P.GpuStatus), reply
    return reply.telemetry == t


def dispatched(w, timeout=2.0) -> list[str]:
    got = []
    while (msg := w.recv_not(P.Heartbeat, timeout=timeout)) is not None:
        if isinstance(msg, P.Dispatch):
            got.append(msg.task_id)
        timeout = 0.3
    return got


def test_tasks_reach_only_their_own_models_instances(two_models):
    c = two_models.client()
    a_ids = [submit(c, i, model="model-a").task_id for i in range(2)]
    b_ids = [submit(c, 10 + i, model="model-b").task_id for i in range(2)]
    default = submit(c, 20).task_id  # no model: the first configured one
    wa, wb = ready(two_models, "a-0", "model-a", 4), ready(two_models, "b-0", "model-b", 4)
    assert sorted(dispatched(wa)) == sorted(a_ids + [default])
    assert sorted(dispatched(wb)) == sorted(b_ids)
    assert query(c, b_ids[0]).model == "model-b" and query(c, default).model == "model-a"


def test_an_unknown_model_is_refused_and_an_unserved_one_queues(two_models):
    c = two_models.client()
    refused = submit(c, 1, model="gpt-4")
    assert isinstance(refused, P.Refused) and refused.code == "model_not_found" and "model-a" in refused.message
    queued = submit(c, 2, model="model-b")  # configured, no instance yet: it waits, and health says why
    assert isinstance(queued, P.Accepted)
    ready(two_models, "a-0", "model-a", 2)
    time.sleep(0.2)
    st = stats(c)
    assert st.health == "backing_up" and "model-b" in st.health_reason and st.depth_by_model == {"model-b": 1}


def test_a_critical_task_takes_the_reserved_slot_while_batch_work_fills_the_rest(two_models):
    c = two_models.client()
    batch = [submit(c, i, model="model-a", priority="batch").task_id for i in range(6)]
    w = ready(two_models, "a-0", "model-a", slots=3, reserved=1)
    assert len(dispatched(w)) == 2  # 3 slots, 1 reserved: batch work gets 2
    crit = submit(c, 99, model="model-a", priority="critical").task_id
    assert dispatched(w, timeout=1.0) == [crit]
    assert query(c, batch[-1]).state == "queued"


def test_preemption_frees_a_slot_for_critical_work_that_waited_too_long(tmp_path):
    b = Running(load_settings({"APPLIANCE_HOME": str(tmp_path), "CRITICAL_MAX_WAIT_MS": "200",
                               "WORKER_LIVENESS_S": "5"}))
    try:
        c = b.client()
        low = [submit(c, i, priority="low").task_id for i in range(2)]
        w = ready(b, "w", "appliance-tiny", slots=2, reserved=0)
        assert sorted(dispatched(w)) == sorted(low)
        crit = submit(c, 9, priority="critical").task_id
        abort = w.recv_not(P.Heartbeat, timeout=3)
        assert isinstance(abort, P.Abort) and abort.reason == "preempted" and abort.task_id in low
        victim = abort.task_id
        w.send(P.Done(victim, error=P.TaskError("preempted", "aborted")))  # what a launcher answers
        w.send(P.Credit(1))
        assert dispatched(w, timeout=2) == [crit]
        rec = query(c, victim)
        assert rec.state == "queued" and rec.preempted == 1  # back in line at the head of its level
        w.send(P.Done(crit, result=P.TaskResult(text="urgent")))
        w.send(P.Credit(1))
        assert dispatched(w, timeout=2) == [victim]  # and it runs again, from the start
        assert stats(c).preemptions == 1
    finally:
        b.stop()


def test_a_conversation_sticks_to_its_instance_while_load_allows(two_models, tmp_path):
    """Turns of one conversation go back to the instance holding its prefix, until that
    instance runs more than AFFINITY_SLACK (1) tasks beyond the least busy one."""
    c = two_models.client()
    w0, w1 = ready(two_models, "a-0", "model-a", 4), ready(two_models, "a-1", "model-a", 4)
    chat = [P.ChatMessage("system", "Be brief."), P.ChatMessage("user", "Chest pain since this morning.")]

    def turn(req, *more):
        c.send(P.Submit(req, P.ChatTask(model="model-a", messages=[*chat, *more])))
        return c.recv().task_id

    first = turn(1)
    home, other = (w0, w1) if dispatched(w0, 0.5) == [first] else (w1, w0)
    home.send(P.Done(first, result=P.TaskResult(text="ok")))
    home.send(P.Credit(1))
    time.sleep(0.1)
    reply = P.ChatMessage("assistant", "Where?")
    second = turn(2, reply, P.ChatMessage("user", "Left side."))
    assert dispatched(home, 0.5) == [second]  # home ran nothing: it sticks
    third = turn(3, reply, P.ChatMessage("user", "Sharp."))
    assert dispatched(home, 0.5) == [third]   # home runs 1, the other 0: within the slack, it sticks
    moved = turn(4, reply, P.ChatMessage("user", "Worse now."))  # home runs 2, the other 0: it moves
    assert dispatched(other, 0.5) == [moved] and dispatched(home, 0.3) == []


def test_a_task_lost_with_its_instance_is_retried_elsewhere(two_models):
    c = two_models.client()
    task_id = submit(c, 1, model="model-a").task_id
    w0 = ready(two_models, "a-0", "model-a", 1)
    assert dispatched(w0) == [task_id]
    w1 = ready(two_models, "a-1", "model-a", 1)
    deadline = time.monotonic() + 3
    while len(stats(c).workers) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    w0.send(P.Ready("a-0", "model-a", 1, "http://127.0.0.1:1"))  # restarted: it runs nothing now
    w0.send(P.Credit(1))
    assert dispatched(w1) == [task_id] and dispatched(w0, 0.5) == []
    w1.send(P.Done(task_id, result=P.TaskResult(text="second try")))
    time.sleep(0.2)
    rec = query(c, task_id)
    assert rec.state == "completed" and rec.worker == "a-1" and rec.attempts == 2


def test_a_heat_ramp_on_one_gpu_pauses_its_dispatch_and_resumes_after_the_hysteresis(tmp_path):
    """The recorded H200 heat ramp (tests/data), replayed through the monitor's own
    reader and published on the telemetry socket: while GPU 0 is hot (85 °C and up,
    or NVML's thermal slowdown) and until it is back at 80 °C, its instance gets no
    new work and everything goes to GPU 1's; then both take work again."""
    import zmq

    from appliance.config import ensure_dirs
    from appliance.gpu.monitor import Monitor

    s = load_settings({"APPLIANCE_HOME": str(tmp_path), "CRITICAL_MAX_WAIT_MS": "0",
                       "NVML_SAMPLES": str(Path(__file__).parent / "data" / "h200-heat-ramp.jsonl")})
    ensure_dirs(s)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(s.telemetry_endpoint)
    b = Running(s)
    try:
        w = {}
        for gpu in (0, 1):
            peer = Peer(s.broker_back, P.broker_to_worker, f"g{gpu}".encode())
            b.peers.append(peer)
            peer.send(P.Ready(f"g{gpu}", TINY, 8, "http://127.0.0.1:1", gpu=gpu))
            peer.send(P.Credit(8))
            w[gpu] = peer
        c = b.client()
        monitor = Monitor(s)
        time.sleep(0.3)  # the broker's SUB is connected
        timeline = []
        for step in range(16):  # one line of the recording each
            t = monitor.sample()
            pub.send_multipart([P.TELEMETRY_TOPIC, P.encode(t)])
            # until the broker has applied this sample: it reads clients before telemetry in
            # one loop iteration, so after a fixed sleep a slow commit could leave `hot`
            # one sample behind the state the submit is routed by (failed so, 1 in 8 runs)
            wait_until(lambda: applied(c, t), 5, 0.01, f"telemetry of step {step} applied")
            st = stats(c)
            hot = {x.name: x.throttled for x in st.workers}["g0"]
            c.send(P.Submit(100 + step, P.CompleteTask(prompt=f"note {step}")))  # no affinity between steps
            reply = c.recv()
            got = {gpu: dispatched(w[gpu], timeout=0.15) for gpu in (0, 1)}
            for gpu, ids in got.items():
                for task_id in ids:
                    w[gpu].send(P.Done(task_id, result=P.TaskResult(text="ok")))
                    w[gpu].send(P.Credit(1))
            timeline.append((t.gpus[0].temperature_c, hot, 0 if got[0] else 1 if got[1] else None))
            assert isinstance(reply, P.Accepted)
        temps = [x[0] for x in timeline]
        peak = temps.index(max(temps))
        assert any(hot for _, hot, _ in timeline[:peak + 1]), timeline
        for temp, hot, went in timeline:
            if hot:
                assert went == 1, timeline  # nothing new for the hot GPU
        # hysteresis: still out on the way down between 85 and 80 °C, back at 80 and below
        cooling = [(temp, hot) for temp, hot, _ in timeline[peak:]]
        assert all(hot for temp, hot in cooling if temp > 80.0 and temp < 85.0), cooling
        assert not timeline[-1][1] and timeline[-1][2] is not None
        assert any(went == 0 for _, hot, went in timeline[peak:] if not hot), timeline  # GPU 0 serves again
    finally:
        b.stop()
        pub.close(0)
