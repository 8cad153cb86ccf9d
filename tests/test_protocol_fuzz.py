"""Protocol fuzz: what is not the protocol is dropped and counted, never fatal.

Every ZeroMQ socket a process reads gets garbage, truncated messages, unknown tags,
the wrong number of frames and a peer of another protocol version; afterwards the
process still does its job with well-formed messages, and says how many it dropped.
"""
from __future__ import annotations

import threading
import time

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import strategies as st

from appliance import protocol as P
from appliance.broker_client import BrokerClient
from appliance.config import ensure_dirs, load_settings
from appliance.worker import WorkerLoop
from test_broker import SPEC, Peer, Running, query, stats, submit

VALID = P.encode(P.Submit(1, SPEC))


def nasty_payloads() -> list[bytes]:
    """Hand-picked cases; hypothesis adds random ones below."""
    return [
        b"", b"\x00", b"\xff" * 64, b"not msgpack at all",
        VALID[: len(VALID) // 2],                      # truncated
        VALID + b"\x00",                                # trailing garbage
        msgspec.msgpack.encode(["NoSuchMessage", 1]),   # unknown tag
        msgspec.msgpack.encode(["Submit", "one", {}]),  # known tag, wrong types
        msgspec.msgpack.encode({"Submit": 1}),          # a map, not an array
        msgspec.msgpack.encode(["Ready", "w", "m", -5, "e", 99]),
    ]


def test_the_broker_drops_and_counts_what_is_not_the_protocol_on_every_socket(tmp_path):
    s = load_settings({"APPLIANCE_HOME": str(tmp_path)})
    ensure_dirs(s)
    ctx = zmq.Context.instance()
    gpumon = ctx.socket(zmq.PUB)  # the broker's telemetry SUB connects to gpumon's endpoint
    gpumon.setsockopt(zmq.LINGER, 0)
    gpumon.bind(s.telemetry_endpoint)
    b = Running(s)
    try:
        front = Peer(s.broker_front, P.front_reply)
        back = Peer(s.broker_back, P.broker_to_worker, b"fuzzer")
        bad = nasty_payloads()
        for payload in bad:
            front.sock.send(payload)
            back.sock.send(payload)
        front.sock.send_multipart([b"two", b"frames"])
        back.sock.send_multipart([b"a", b"b", b"c"])
        back.send(P.Ready("old", "m", 1, "http://x", version=P.PROTOCOL_VERSION + 1))  # another version
        time.sleep(0.3)  # the SUB's connection is up by now: telemetry is fire-and-forget
        for payload in bad:
            gpumon.send_multipart([P.TELEMETRY_TOPIC, payload])
        gpumon.send_multipart([P.TELEMETRY_TOPIC])
        c = b.client()

        def counted():
            d = stats(c).frames_dropped
            return d.get("front", 0) >= len(bad) + 1 and d.get("back", 0) >= len(bad) + 2 \
                and d.get("telemetry", 0) >= len(bad) + 1
        deadline = time.monotonic() + 5
        while not counted() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert counted(), stats(c).frames_dropped
        assert not [w for w in stats(c).workers if w.name == "old"]  # the other version was not registered
        # ... and the broker still works.
        task_id = submit(c, 7)
        w = b.worker("w1", slots=1)
        assert w.recv_not(P.Heartbeat).task_id == task_id
        w.send(P.Done(task_id, result=P.TaskResult(text="fine")))
        time.sleep(0.2)
        assert query(c, task_id).state == "completed"
        front.close()
        back.close()
    finally:
        b.stop()
        gpumon.close(0)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=300) | st.builds(lambda n, junk: VALID[:n] + junk,
                                                   st.integers(0, len(VALID)), st.binary(max_size=8)))
def test_random_bytes_never_crash_the_broker_loop(fuzz_broker, payload):
    """Random payloads straight into the front and back handlers (the loop's own entry
    points, no sockets): each is dropped or answered, never an exception."""
    fuzz_broker._on_front(b"fuzz", payload)
    fuzz_broker._on_back(b"fuzz", payload)


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory):
    from appliance.broker.server import Broker

    broker = Broker(load_settings({"APPLIANCE_HOME": str(tmp_path_factory.mktemp("fuzz"))}))
    yield broker
    broker.close()


class EchoHandler:
    """The smallest worker handler: a task's text is its prompt."""

    name, model, slots, reserved, gpu, starts, endpoint = "w-fuzz", "m", 1, 0, -1, 1, "none"

    def run(self, task_id, spec, deadline, on_text, tenant=""):
        return P.Done(task_id, result=P.TaskResult(text=spec.prompt))

    def abort(self, task_id, reason):
        pass

    def healthy(self):
        return True


def test_a_worker_drops_and_counts_garbage_from_the_broker_side_and_keeps_working(tmp_path):
    endpoint = f"ipc://{tmp_path}/back.ipc"
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    loop = WorkerLoop(EchoHandler(), endpoint, liveness_s=30)
    thread = threading.Thread(target=loop.serve, daemon=True)
    thread.start()
    try:
        assert router.poll(5000)
        identity, ready = router.recv_multipart()
        assert isinstance(P.worker_to_broker.decode(ready), P.Ready)
        for payload in nasty_payloads():
            router.send_multipart([identity, payload])
        router.send_multipart([identity, P.encode(P.Dispatch("t1", P.CompleteTask(prompt="still here"), 0.0))])
        deadline = time.monotonic() + 5
        done = None
        while done is None and time.monotonic() < deadline:
            if router.poll(100):
                msg = P.worker_to_broker.decode(router.recv_multipart()[1])
                done = msg if isinstance(msg, P.Done) else None
        assert done is not None and done.result.text == "still here"
        assert loop.dropped == len(nasty_payloads())
        assert thread.is_alive()
    finally:
        loop.stop()
        loop.stop()
        thread.join(5)
        loop.close()
        router.close(0)


def test_the_api_client_drops_and_counts_garbage_replies_and_events(tmp_path):
    front, events = f"ipc://{tmp_path}/front.ipc", f"ipc://{tmp_path}/events.ipc"
    ctx = zmq.Context.instance()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for sock in (router, pub):
        sock.setsockopt(zmq.LINGER, 0)
    router.bind(front)
    pub.bind(events)
    client = BrokerClient(front, 3.0, events)

    def fake_broker():  # answers each Ping with garbage first, then the Pong
        identity, payload = router.recv_multipart()
        req = P.front_request.decode(payload).req
        for junk in nasty_payloads():
            router.send_multipart([identity, junk])
        router.send_multipart([identity, P.encode(P.Pong(req, 1, 0, 0, "cpu_only"))])
    t = threading.Thread(target=fake_broker, daemon=True)
    t.start()
    try:
        assert isinstance(client.ping(), P.Pong)
        assert client.dropped["reply"] == len(nasty_payloads())
        watch = client.watch("t1")
        time.sleep(0.3)  # the subscription reaches the PUB
        for junk in nasty_payloads():
            pub.send_multipart([b"t1", junk])
        pub.send_multipart([b"t1"])
        pub.send_multipart([b"t1", P.encode(P.Tokens("t1", 1, "ok"))])
        event = watch.get(5)
        assert isinstance(event, P.Tokens) and event.text == "ok"
        assert client.dropped["event"] == len(nasty_payloads()) + 1
        watch.close()
    finally:
        t.join(5)
        router.close(0)
        pub.close(0)
