"""The line to the broker's front socket: the API's, the RAG worker's, the tools'.

The API runs under gunicorn's gevent worker (procs/api.py patches the process
before anything else is imported): one OS thread per worker, a greenlet per
connection. Here that means zmq.green sockets, which park the greenlet instead of
the thread; outside a patched process (tools, tests) the same code uses plain
sockets and threads.

Calls: DEALER sockets come from a free list, one per call in flight (at most
MAX_SOCKETS; more callers wait their turn), so a thousand idle keep-alive
connections do not each hold a socket and a file descriptor. A reply is matched by
request number; a late reply to a call that already gave up is dropped by the next
call that uses the socket.

The DEALER has ZMQ_IMMEDIATE set: with no broker connected a send fails instead of
queueing inside ZeroMQ; the caller retries every 20 ms until BROKER_TIMEOUT_S, then
answers 503, so a request the client saw fail is never delivered late.

Events: one I/O loop per process owns the SUB socket of the broker's events and
hands each task's events to its Watches; callers (un)subscribe through it.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time

from . import protocol as P

try:
    from gevent import Timeout as _GreenTimeout
    from gevent.monkey import is_module_patched
    GREEN = is_module_patched("socket")
except ImportError:  # gevent is a dependency, but the client does not need it
    GREEN = False

if GREEN:
    import zmq.green as zmq
else:
    import zmq

log = logging.getLogger("appliance.client")

MAX_SOCKETS = 64  # calls in flight per worker; a call takes milliseconds


class BrokerUnavailable(Exception):
    """No answer within BROKER_TIMEOUT_S (the API answers 503 broker_unavailable)."""


class BrokerRefused(Exception):
    """The broker will not do it; `code` is the API's stable error code (not_found, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Watch:
    """Events (Tokens, Final) of one task, as the broker publishes them."""

    def __init__(self, client: "BrokerClient", task_id: str):
        self.client = client
        self.task_id = task_id
        self.events: queue.SimpleQueue = queue.SimpleQueue()

    def get(self, timeout: float):
        """The next event, or None after `timeout` seconds."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.client._unwatch(self)

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BrokerClient:
    def __init__(self, endpoint: str, timeout_s: float, events_endpoint: str | None = None):
        self.endpoint = endpoint
        self.events_endpoint = events_endpoint
        self.timeout_s = timeout_s
        self.pid = os.getpid()
        self._ctx = zmq.Context()
        self._free: list = []  # idle DEALER sockets; list.pop/append need no lock
        self._sockets = threading.BoundedSemaphore(MAX_SOCKETS)
        self._reqs = itertools.count(1)
        self._lock = threading.Lock()
        self._push = None  # the control socket into the events loop
        self._push_lock = threading.Lock()  # not _lock: the events loop takes that one
        self._watches: dict[bytes, list[Watch]] = {}
        self.dropped: dict[str, int] = {}  # malformed replies and events
        self._control_addr = f"inproc://broker-events-{id(self)}"
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._events_io, name="broker-events", daemon=True)
        self._thread.start()
        self._started.wait()

    # ------------------------------------------------------------ typed calls
    # Each returns the broker's answer, or raises BrokerRefused / BrokerUnavailable.
    def submit(self, spec: P.TaskSpec, tenant: str, idempotency_key: str | None = None,
               task_id: str | None = None, pin: str | None = None) -> P.Accepted:
        expires = time.time() + self.timeout_s
        return self._expect(P.Accepted, lambda r: P.Submit(r, spec, tenant, task_id, idempotency_key, expires, pin))

    def submit_batch(self, specs: list[P.TaskSpec], tenant: str) -> P.BatchAccepted:
        expires = time.time() + self.timeout_s
        return self._expect(P.BatchAccepted, lambda r: P.SubmitBatch(r, specs, tenant, expires))

    def query(self, task_id: str, tenant: str, all_tenants: bool = False) -> P.TaskInfo:
        return self._expect(P.TaskInfo, lambda r: P.Query(r, task_id, tenant, all_tenants))

    def cancel(self, task_id: str, tenant: str, all_tenants: bool = False) -> P.TaskInfo:
        return self._expect(P.TaskInfo, lambda r: P.Cancel(r, task_id, tenant, all_tenants))

    def ping(self, timeout_s: float | None = None) -> P.Pong:
        return self._expect(P.Pong, lambda r: P.Ping(r), timeout_s)

    def stats(self) -> P.Stats:
        return self._expect(P.Stats, lambda r: P.GetStats(r))

    def gpu(self) -> P.GpuStatus:
        return self._expect(P.GpuStatus, lambda r: P.GetGpu(r))

    def _expect(self, kind, make_msg, timeout_s: float | None = None):
        reply = self.call(make_msg, timeout_s)
        if isinstance(reply, P.Refused):
            raise BrokerRefused(reply.code, reply.message)
        if not isinstance(reply, kind):
            raise BrokerUnavailable(f"the broker answered {type(reply).__name__}, not {kind.__name__}")
        return reply

    # ------------------------------------------------------------------ calls
    def _dealer(self) -> zmq.Socket:
        try:
            return self._free.pop()
        except IndexError:
            pass
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.connect(self.endpoint)
        return sock

    @staticmethod
    def _recv(sock: zmq.Socket, seconds: float) -> bytes | None:
        """One message, or None after `seconds`: a single blocking call either way."""
        if GREEN:  # zmq.green ignores RCVTIMEO
            with _GreenTimeout(seconds, False):
                return sock.recv()
            return None
        sock.setsockopt(zmq.RCVTIMEO, max(1, int(seconds * 1000)))
        try:
            return sock.recv()
        except zmq.Again:
            return None

    def call(self, make_msg, timeout_s: float | None = None):
        """Send `make_msg(req)` and wait for the broker's reply to it."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        req = next(self._reqs)
        payload = P.encode(make_msg(req))
        if not self._sockets.acquire(timeout=limit):
            raise BrokerUnavailable(f"no broker connection free within {limit:g}s")
        sock = self._dealer()
        try:
            return self._call(sock, req, payload, deadline, limit)
        finally:
            self._free.append(sock)
            self._sockets.release()

    def _call(self, sock, req: int, payload: bytes, deadline: float, limit: float):
        while True:
            try:
                sock.send(payload, zmq.NOBLOCK)
                break
            except zmq.Again:  # no broker connected (it may be restarting)
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(f"the broker is not reachable (waited {limit:g}s)") from None
                time.sleep(0.02)
        while True:
            left = deadline - time.monotonic()
            raw = self._recv(sock, left) if left > 0 else None
            if raw is None:
                raise BrokerUnavailable(f"the broker did not answer within {limit:g}s")
            try:
                reply = P.front_reply.decode(raw)
            except Exception:
                self._malformed("reply")
                continue
            if reply.req == req:
                return reply
            # a late reply to an earlier call on this socket that gave up: drop it

    def _malformed(self, where: str) -> None:
        """Not the protocol: dropped and counted (`dropped`), logged at the first and every 1000th."""
        self.dropped[where] = n = self.dropped.get(where, 0) + 1
        if n % 1000 == 1:
            log.warning("dropped a malformed broker %s; %d so far", where, n)

    # ------------------------------------------------------------------ events
    def _events_io(self) -> None:
        control = self._ctx.socket(zmq.PULL)
        control.setsockopt(zmq.RCVHWM, 0)
        control.bind(self._control_addr)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)  # never drop a Final because a stream was slow
        if self.events_endpoint:
            sub.connect(self.events_endpoint)
        self._started.set()
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if control in ready:
                while True:
                    try:
                        op, topic = control.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    sub.setsockopt(zmq.SUBSCRIBE if op == b"S" else zmq.UNSUBSCRIBE, topic)
            if sub in ready:
                while True:
                    try:
                        topic, payload = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ValueError:  # not two frames
                        self._malformed("event")
                        continue
                    with self._lock:
                        watches = list(self._watches.get(topic, ()))
                    if not watches:
                        continue
                    try:
                        event = P.task_event.decode(payload)
                    except Exception:
                        self._malformed("event")
                        continue
                    for w in watches:
                        w.events.put(event)

    def _control(self, op: bytes, topic: bytes) -> None:
        with self._push_lock:
            if self._push is None:
                self._push = self._ctx.socket(zmq.PUSH)
                self._push.setsockopt(zmq.LINGER, 0)
                self._push.setsockopt(zmq.SNDHWM, 0)  # a send never waits on the loop
                self._push.connect(self._control_addr)
            self._push.send_multipart([op, topic])

    def watch(self, task_id: str) -> Watch:
        """Start receiving a task's events; subscribe before asking, so none is missed
        after the subscription is in place (callers still re-query on a gap)."""
        w = Watch(self, task_id)
        topic = task_id.encode()
        with self._lock:
            first = topic not in self._watches
            self._watches.setdefault(topic, []).append(w)
        if first:
            self._control(b"S", topic)
        return w

    def _unwatch(self, w: Watch) -> None:
        topic = w.task_id.encode()
        with self._lock:
            watches = self._watches.get(topic, [])
            if w in watches:
                watches.remove(w)
            last = not watches and topic in self._watches
            if last:
                del self._watches[topic]
        if last:
            self._control(b"U", topic)


_client: BrokerClient | None = None
_client_lock = threading.Lock()


def get_client(endpoint: str, timeout_s: float, events_endpoint: str | None = None) -> BrokerClient:
    """One client per process, made after gunicorn's fork (threads do not survive a fork)."""
    global _client
    client = _client
    if client is not None and client.pid == os.getpid():  # every call: no lock
        return client
    with _client_lock:
        if _client is None or _client.pid != os.getpid():
            _client = BrokerClient(endpoint, timeout_s, events_endpoint)
        return _client
