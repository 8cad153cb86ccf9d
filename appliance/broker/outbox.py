"""Replies to the API over the front ROUTER: delivered, or counted and logged, never lost silently.

Why: a ROUTER drops a message without a word when the peer's pipe is at its send
high-water mark. Under a pipelining client on a loaded box that lost acknowledgements
of journaled tasks (37 of 50,000 in `make bench`; 225 of 30,000 with 1,000 in flight).
So the socket runs with ROUTER_MANDATORY: a full pipe answers EAGAIN, and the reply
waits here, in order behind that peer's earlier ones, until the peer reads; a peer
that is gone answers EHOSTUNREACH, and the reply is counted and logged (the task
itself is journaled and runs; the client sees a timeout and can look it up by
idempotency key or id).

A peer that never reads cannot grow the broker without bound: past MAX_PENDING
waiting replies, its oldest are dropped, counted and logged.
"""
from __future__ import annotations

import logging
from collections import deque

import zmq

from . import metrics

log = logging.getLogger("appliance.broker")

SNDHWM = 10_000        # per client connection; deferral is the exception, not the rule
# Plain ints: pyzmq's flag enums cost an enum operation per frame on the hot path.
MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
LAST = int(zmq.NOBLOCK)
MAX_PENDING = 100_000  # replies kept for one client that does not read


class Outbox:
    def __init__(self, sock: zmq.Socket):
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        self.sock = sock
        self.pending: dict[bytes, deque[bytes]] = {}
        self.deferred = 0       # replies that had to wait for their peer to read
        self.undeliverable = 0  # replies whose peer was gone (or never read): counted, logged

    def send(self, identity: bytes, payload: bytes) -> None:
        waiting = self.pending.get(identity)
        if waiting is not None:  # behind this peer's earlier replies: order is kept
            self._hold(identity, waiting, payload)
            return
        try:
            self.sock.send(identity, MORE)  # a full or unknown peer refuses the first frame
            self.sock.send(payload, LAST)
        except zmq.Again:
            self.deferred += 1
            metrics.REPLIES_DEFERRED.inc()
            self.pending[identity] = deque([payload])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._lost(identity, 1, "the client is gone")

    def _hold(self, identity: bytes, waiting: deque[bytes], payload: bytes) -> None:
        self.deferred += 1
        metrics.REPLIES_DEFERRED.inc()
        waiting.append(payload)
        if len(waiting) > MAX_PENDING:
            waiting.popleft()
            self._lost(identity, 1, f"the client has not read its last {MAX_PENDING} replies")

    def flush(self) -> None:
        """Send what waits, as far as each peer reads; once per broker loop iteration."""
        for identity in list(self.pending):
            waiting = self.pending[identity]
            try:
                while waiting:
                    self.sock.send(identity, MORE)
                    self.sock.send(waiting[0], LAST)
                    waiting.popleft()
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                self._lost(identity, len(waiting), "the client is gone")
                waiting.clear()
            del self.pending[identity]

    def backlog(self) -> int:
        return sum(len(w) for w in self.pending.values())

    def _lost(self, identity: bytes, n: int, why: str) -> None:
        self.undeliverable += n
        metrics.REPLIES_UNDELIVERABLE.inc(n)
        log.warning("%d reply(ies) to client %s not delivered: %s (%d undeliverable since start)",
                    n, identity.hex(), why, self.undeliverable)
