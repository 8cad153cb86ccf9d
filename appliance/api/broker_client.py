"""The API worker's line to the broker: one I/O thread owns the DEALER socket.

Why an I/O thread: ZeroMQ sockets are not thread-safe, and gunicorn's gthread worker
serves requests on several threads. Request threads hand an encoded message to the
I/O thread over inproc PUSH (one per thread) and wait on an Event for the reply,
matched by request number.

The DEALER has ZMQ_IMMEDIATE set: with no broker connected a send fails instead of
queueing inside ZeroMQ. The I/O thread keeps such a message and retries it every
20 ms while its caller still waits (the broker may be just reconnecting); once the
caller gives up (BROKER_TIMEOUT_S, 503) the message is dropped, so a request the
client saw fail is never delivered late.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from collections import deque

import zmq

from .. import protocol as P

log = logging.getLogger("appliance.api")


class BrokerUnavailable(Exception):
    pass


class _Waiter:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply = None


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
        self._watches: dict[bytes, list[Watch]] = {}
        self.pid = os.getpid()
        self._ctx = zmq.Context()
        self._inbox_addr = f"inproc://broker-client-{id(self)}"
        self._pending: dict[int, _Waiter] = {}
        self._lock = threading.Lock()
        self._reqs = itertools.count(1)
        self._local = threading.local()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._io, name="broker-io", daemon=True)
        self._thread.start()
        self._started.wait()

    def _io(self) -> None:
        inbox = self._ctx.socket(zmq.PULL)
        inbox.bind(self._inbox_addr)
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        dealer.connect(self.endpoint)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)  # never drop a Final because a stream was slow
        if self.events_endpoint:
            sub.connect(self.events_endpoint)
        self._started.set()
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        unsent: deque[tuple[int, bytes]] = deque()
        while True:
            ready = dict(poller.poll(20 if unsent else None))
            if unsent:
                for _ in range(len(unsent)):
                    req, payload = unsent.popleft()
                    if req in self._pending:  # its caller still waits
                        self._send(dealer, req, payload, unsent)
            if inbox in ready:
                while True:
                    try:
                        req_b, payload = inbox.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if req_b == b"S":    # subscribe to a task's events
                        sub.setsockopt(zmq.SUBSCRIBE, payload)
                    elif req_b == b"U":
                        sub.setsockopt(zmq.UNSUBSCRIBE, payload)
                    else:
                        self._send(dealer, int.from_bytes(req_b, "little"), payload, unsent)
            if sub in ready:
                while True:
                    try:
                        topic, payload = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ValueError:
                        continue
                    with self._lock:
                        watches = list(self._watches.get(topic, ()))
                    if watches:
                        try:
                            event = P.task_event.decode(payload)
                        except Exception:
                            continue
                        for w in watches:
                            w.events.put(event)
            if dealer in ready:
                while True:
                    try:
                        payload = dealer.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        reply = P.front_reply.decode(payload)
                    except Exception:
                        log.warning("undecodable broker reply dropped")
                        continue
                    self._resolve(reply.req, reply)

    @staticmethod
    def _send(dealer: zmq.Socket, req: int, payload: bytes, unsent: deque) -> None:
        try:
            dealer.send(payload, zmq.NOBLOCK)
        except zmq.Again:  # no broker connected (IMMEDIATE) or high-water mark
            unsent.append((req, payload))

    def _resolve(self, req: int, reply) -> None:
        with self._lock:
            waiter = self._pending.pop(req, None)
        if waiter is not None:
            waiter.reply = reply
            waiter.event.set()

    def _push_sock(self) -> zmq.Socket:
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self._ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._inbox_addr)
        return push

    def watch(self, task_id: str) -> Watch:
        """Start receiving a task's events; subscribe before asking, so none is missed
        after the subscription is in place (callers still re-query on a gap)."""
        w = Watch(self, task_id)
        topic = task_id.encode()
        with self._lock:
            first = topic not in self._watches
            self._watches.setdefault(topic, []).append(w)
        if first:
            self._push_sock().send_multipart([b"S", topic])
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
            self._push_sock().send_multipart([b"U", topic])

    def call(self, make_msg, timeout_s: float | None = None):
        """Send `make_msg(req)` and wait for the broker's reply to it."""
        req = next(self._reqs)
        waiter = _Waiter()
        with self._lock:
            self._pending[req] = waiter
        self._push_sock().send_multipart([req.to_bytes(8, "little"), P.encode(make_msg(req))])
        limit = self.timeout_s if timeout_s is None else timeout_s
        if not waiter.event.wait(limit):
            with self._lock:
                self._pending.pop(req, None)
            raise BrokerUnavailable(f"the broker did not answer within {limit:g}s")
        return waiter.reply


_client: BrokerClient | None = None
_client_lock = threading.Lock()


def get_client(endpoint: str, timeout_s: float, events_endpoint: str | None = None) -> BrokerClient:
    """One client per process, made after gunicorn's fork (threads do not survive a fork)."""
    global _client
    with _client_lock:
        if _client is None or _client.pid != os.getpid():
            _client = BrokerClient(endpoint, timeout_s, events_endpoint)
        return _client
