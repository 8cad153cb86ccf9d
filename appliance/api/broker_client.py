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


class BrokerClient:
    def __init__(self, endpoint: str, timeout_s: float):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
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
        self._started.set()
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
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
                    self._send(dealer, int.from_bytes(req_b, "little"), payload, unsent)
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

    def call(self, make_msg, timeout_s: float | None = None):
        """Send `make_msg(req)` and wait for the broker's reply to it."""
        req = next(self._reqs)
        waiter = _Waiter()
        with self._lock:
            self._pending[req] = waiter
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self._ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._inbox_addr)
        push.send_multipart([req.to_bytes(8, "little"), P.encode(make_msg(req))])
        limit = self.timeout_s if timeout_s is None else timeout_s
        if not waiter.event.wait(limit):
            with self._lock:
                self._pending.pop(req, None)
            raise BrokerUnavailable(f"the broker did not answer within {limit:g}s")
        return waiter.reply


_client: BrokerClient | None = None
_client_lock = threading.Lock()


def get_client(endpoint: str, timeout_s: float) -> BrokerClient:
    """One client per process, made after gunicorn's fork (threads do not survive a fork)."""
    global _client
    with _client_lock:
        if _client is None or _client.pid != os.getpid():
            _client = BrokerClient(endpoint, timeout_s)
        return _client
