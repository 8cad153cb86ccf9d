"""The worker loop every back-end process runs: a handler does the work, this does the rest.

The rest is the broker's worker protocol (docs/PROTOCOL.md): Ready with the services
served and the tasks still running, Credit for free slots, heartbeats both ways,
reconnect when the broker goes silent or asks for it, Tokens coalesced about every
TOKEN_FLUSH_S before the task's Done, Abort handed to the handler. A llama launcher
plugs in a handler that talks to its llama.cpp server; the RAG worker plugs in one
that embeds and searches (appliance/rag/handler.py).

Threads: the ZeroMQ socket to the broker belongs to the loop's thread alone. Each
task runs on a pool thread; its Tokens and Done come back to the loop over an inproc
PUSH/PULL pair, so the socket is never shared and a task's messages stay in order.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol

import zmq

from . import protocol as P
from .logs import exception_summary
from .metrics import instance as metrics

log = logging.getLogger("appliance.worker")

# Consecutive failed health checks (one per heartbeat) after which the worker exits,
# so that supervisord restarts it (and whatever it owns, e.g. its llama.cpp server).
HEALTH_FAILURES_FATAL = 3


class Unhealthy(RuntimeError):
    """The handler's own check failed HEALTH_FAILURES_FATAL times in a row."""


class Handler(Protocol):
    """What a worker serves and how it runs one task."""

    name: str           # the worker's identity with the broker (e.g. llama-0)
    model: str          # the service it serves (a model id)
    slots: int          # tasks it runs at once
    reserved: int       # of those, slots only critical and high work may take
    gpu: int            # the GPU it is pinned to; -1: CPU only
    starts: int         # times it has started since the appliance came up
    endpoint: str       # where its engine listens, for operators

    def run(self, task_id: str, spec: P.TaskSpec, deadline: float, on_text: Callable[[str], None],
            tenant: str = "") -> P.Done:
        """Run one task of `tenant` to its end; every failure is a Done with an error, never an exception."""

    def abort(self, task_id: str, reason: str) -> None:
        """Stop a running task now (from the loop's thread); its run() then returns."""

    def healthy(self) -> bool:
        """Checked once per heartbeat."""


class WorkerLoop:
    def __init__(self, handler: Handler, broker_endpoint: str, liveness_s: float, grace_s: float = 0.0):
        self.h = handler
        self.grace_s = grace_s
        self.endpoint = broker_endpoint
        self.liveness_s = liveness_s
        self.ctx = zmq.Context.instance()
        self.results = self.ctx.socket(zmq.PULL)
        self.results_addr = f"inproc://worker-results-{id(self)}"
        self.results.bind(self.results_addr)
        self.sock: zmq.Socket | None = None
        self.running: set[str] = set()
        self.pool = ThreadPoolExecutor(max_workers=handler.slots, thread_name_prefix="task")
        self._push = threading.local()
        self._stop = False
        self._stopping_since: float | None = None
        self.broker_seen = 0.0
        self.dropped = 0  # malformed messages from the broker's side
        self.withheld = 0  # credit held back while the handler's check fails

    def stop(self, *_: object) -> None:
        """First SIGTERM: take nothing new, let running tasks finish within `grace_s`
        (a stop is not a reason to run a task twice). A second one: stop now."""
        if self._stopping_since is None and self.grace_s > 0 and self.running:
            self._stopping_since = time.monotonic()
        else:
            self._stop = True

    def _done_stopping(self) -> bool:
        if self._stop:
            return True
        if self._stopping_since is None:
            return False
        if not self.running:
            return True
        if time.monotonic() - self._stopping_since >= self.grace_s:
            log.warning("%s: stop grace over; %d running tasks are aborted (the broker runs them again)",
                        self.h.name, len(self.running))
            return True
        return False

    # ------------------------------------------------------------ broker side
    def _connect(self) -> None:
        """A fresh socket, then Ready (with what still runs) and Credit for the free slots."""
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self.h.name.encode())
        self.sock.connect(self.endpoint)
        h = self.h
        self._send(P.Ready(h.name, h.model, h.slots, h.endpoint, running=sorted(self.running), reserved=h.reserved,
                           gpu=h.gpu, starts=h.starts))
        free = h.slots - len(self.running)
        self.withheld = 0  # Credit below covers every free slot
        if self._stopping_since is not None:
            self._send(P.Stopping())
        elif free:
            self._send(P.Credit(free))
        self.broker_seen = time.monotonic()

    def _send(self, msg) -> None:
        self.sock.send(P.encode(msg))

    def serve(self) -> None:
        """Until stop(): raises Unhealthy when the handler's check keeps failing."""
        self._connect()
        metrics.serving(self.h.name, self.h.slots)  # the handler started its engine before serving
        poller = zmq.Poller()
        poller.register(self.results, zmq.POLLIN)
        poller.register(self.sock, zmq.POLLIN)
        next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL_S
        failures = 0
        told_stopping = False
        while not self._done_stopping():
            if self._stopping_since is not None and not told_stopping:
                told_stopping = True
                log.info("%s: stopping; %d running tasks get %gs to finish", self.h.name, len(self.running),
                         self.grace_s)
                self._send(P.Stopping())
            wait = next_beat - time.monotonic()
            if self._stopping_since is not None:
                wait = min(wait, 0.1)
            ready = dict(poller.poll(max(0, int(wait * 1000))))
            if self.results in ready:
                self._forward_results()
            if self.sock in ready:
                self.broker_seen = time.monotonic()
                if self._from_broker():
                    poller.unregister(self.sock)
                    self._connect()
                    poller.register(self.sock, zmq.POLLIN)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + P.HEARTBEAT_INTERVAL_S
                if now - self.broker_seen > self.liveness_s:
                    log.warning("%s: broker silent for %.0fs; reconnecting", self.h.name, now - self.broker_seen)
                    poller.unregister(self.sock)
                    self._connect()
                    poller.register(self.sock, zmq.POLLIN)
                else:
                    self._send(P.Heartbeat())
                failures = 0 if self.h.healthy() else failures + 1
                metrics.up(self.h.name, not failures)
                if not failures and self.withheld and self._stopping_since is None:
                    self._send(P.Credit(self.withheld))
                    self.withheld = 0
                if failures:
                    log.warning("%s: health check failed (%d in a row)", self.h.name, failures)
                if failures >= HEALTH_FAILURES_FATAL:
                    raise Unhealthy(f"{self.h.name}: health check failed {failures} times in a row")
        self._send(P.Disconnect())

    def _forward_results(self) -> None:
        while True:
            try:
                payload = self.results.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = P.worker_to_broker.decode(payload)
            self.sock.send(payload)
            if isinstance(msg, P.Done):
                self.running.discard(msg.task_id)
                metrics.busy(self.h.name, len(self.running))
                metrics.done(self.h.name, msg)
                if self._stopping_since is not None:
                    continue
                # A failure may be the engine's (a crashed model server): check now, not at
                # the next heartbeat, so that no more tasks are taken only to fail. Unhealthy
                # propagates (the process exits and supervisord restarts it).
                if msg.error is not None and not self.h.healthy():
                    self.withheld += 1  # given back once the check passes again
                else:
                    self._send(P.Credit(1))

    def _from_broker(self) -> bool:
        """Handle what the broker sent; True when it asks us to register again."""
        while True:
            try:
                payload = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            try:
                msg = P.broker_to_worker.decode(payload)
            except Exception as exc:  # not the protocol: dropped and counted, never fatal
                self.dropped += 1
                if self.dropped % 1000 == 1:
                    log.warning("%s: dropped a malformed broker message (%s); %d so far", self.h.name,
                                type(exc).__name__, self.dropped)
                continue
            if isinstance(msg, P.Dispatch):
                self.running.add(msg.task_id)
                metrics.busy(self.h.name, len(self.running))
                self.pool.submit(self._run, msg.task_id, msg.spec, msg.deadline, msg.tenant)
            elif isinstance(msg, P.Abort):
                if msg.task_id in self.running:
                    self.h.abort(msg.task_id, msg.reason)
            elif isinstance(msg, P.Disconnect):
                log.info("%s: broker asked us to register again", self.h.name)
                return True

    # ------------------------------------------------------------ task side
    def _push_sock(self) -> zmq.Socket:
        """This task thread's socket into the loop. Sends give up after a second: only a
        loop that is gone stops reading, and then a task thread must not hang the
        process's exit (the broker requeues what this worker was running)."""
        push = getattr(self._push, "sock", None)
        if push is None:
            push = self._push.sock = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.SNDTIMEO, 1000)
            push.connect(self.results_addr)
        return push

    def _run(self, task_id: str, spec: P.TaskSpec, deadline: float, tenant: str) -> None:
        push = self._push_sock()
        buffered: list[str] = []
        seq = 0
        last_flush = time.monotonic()

        def send(msg) -> None:
            try:
                push.send(P.encode(msg))
            except zmq.ZMQError:  # the loop is closing: nobody will forward it
                log.debug("task %s: %s not forwarded, the worker is stopping", task_id, type(msg).__name__)

        def flush() -> None:
            nonlocal seq, last_flush
            if buffered:
                seq += 1
                send(P.Tokens(task_id, seq, "".join(buffered)))
                buffered.clear()
            last_flush = time.monotonic()

        def on_text(piece: str) -> None:
            buffered.append(piece)
            if time.monotonic() - last_flush >= P.TOKEN_FLUSH_S:
                flush()

        try:
            done = self.h.run(task_id, spec, deadline, on_text, tenant)
        except Exception as exc:  # never lose a task to a bug in a handler
            log.error("task %s failed unexpectedly: %s", task_id, exception_summary(exc))
            done = P.Done(task_id, error=P.TaskError("worker_error", type(exc).__name__))
        flush()  # the last tokens go before the Done, on the same socket: in order
        send(done)

    def close(self) -> None:
        """Stop every running task (the broker, told by our Disconnect, requeues them), so
        that no task thread holds the process past supervisord's stop timeout."""
        for task_id in list(self.running):
            try:
                self.h.abort(task_id, "cancelled")
            except Exception as exc:  # closing anyway
                log.warning("%s: abort of %s on close failed: %s", self.h.name, task_id, type(exc).__name__)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.sock is not None:
            self.sock.close(0)
        self.results.close(0)
