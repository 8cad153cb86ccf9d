"""The broker: sole owner of queue and task state, one mediate loop.

Shape (after the ZeroMQ guide's Majordomo): a ROUTER for clients (the API workers),
a ROUTER for workers (the launchers), a SUB for GPU telemetry, a PUB for task events.
Each loop iteration drains every ready message without blocking, handing each to the
handler of its kind (clients.py, workers.py); then fires due timers (deadlines,
result expiry), dispatches to workers with free slots, commits the journal once for
the whole batch (group commit), and only then acknowledges the submits and cancels
of that batch. Nothing here waits except the poll and the commit's fsync; an
iteration that took 0.25 s or more is counted and logged with where its time went
(stalls.py): on a busy disk the fsync is what stalls (seen here: 0.25-0.8 s commits
while two llama.cpp servers kept both cores busy).

The state lives in parts with no sockets: the task table (tasks.py), the worker pool
with its routing (pool.py, routing.py), and the figures with the health rule
(stats.py).
"""
from __future__ import annotations

import logging
import signal
import sqlite3
import time

import zmq

from .. import protocol as P
from ..config import Settings, ensure_dirs
from ..logs import exception_summary
from ..store import open_journal
from . import metrics
from ._pqueue import PriorityQueue
from .clients import ClientSide
from .cluster import ClusterSide
from .models import ModelCatalog
from .outbox import Outbox
from . import routing
from .pool import WorkerPool
from .stalls import LoopClock
from .stats import StatsBook
from .tasks import Task, TaskTable
from .workers import WorkerSide

log = logging.getLogger("appliance.broker")

EXPIRE_EVERY_S = 1.0       # how often results past their TTL are dropped from the journal
INSTANCES_EVERY_S = 2.0    # how often the instances file is checked for changes (appliance reload)


class Broker(ClientSide, WorkerSide, ClusterSide):
    def __init__(self, settings: Settings, journal_path: str | None = None):
        self.s = settings
        ensure_dirs(settings)
        self.ctx = zmq.Context.instance()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.back = self.ctx.socket(zmq.ROUTER)
        self.telemetry = self.ctx.socket(zmq.SUB)
        self.events = self.ctx.socket(zmq.PUB)
        for sock in (self.front, self.back, self.telemetry, self.events):
            sock.setsockopt(zmq.LINGER, 0)
        # A restarted launcher reuses its identity; let the new connection take it over.
        self.back.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.outbox = Outbox(self.front)  # ROUTER_MANDATORY: no reply is dropped silently
        self.front.bind(settings.broker_front)
        self.back.bind(settings.broker_back)
        self.events.bind(settings.broker_events)
        self.telemetry.setsockopt(zmq.SUBSCRIBE, P.TELEMETRY_TOPIC)
        self.telemetry.connect(settings.telemetry_endpoint)

        s = settings
        self.table = TaskTable(open_journal(journal_path or s),
                               lambda: PriorityQueue(len(P.PRIORITIES), s.queue_max_size, s.queue_aging_s),
                               s.queue_max_size, s.result_ttl_s, s.result_tombstone_s)
        self.pool = WorkerPool(s.worker_liveness_s, s.affinity_slack,
                               routing.Limits(s.thermal_limit_c, s.thermal_resume_c, s.memory_pressure_pct))
        self.book = StatsBook()
        self.gpu_state = "unknown"
        self.last_telemetry: P.Telemetry | None = None
        self.catalog = ModelCatalog(settings)
        self._acks: list[tuple[bytes, bytes]] = []             # replies that wait for the commit
        self._unacked: list[tuple[bytes, int, list[str]]] = []  # submits in this batch
        self._freeing: dict[str, tuple[str, float]] = {}        # preempted task -> (model, when)
        self._next_expire = self._next_instances = self._next_heartbeat = 0.0
        self._running = True
        self._metrics = metrics.Sync()
        self.clock = LoopClock()
        self._draining_since: float | None = None  # monotonic time of the first SIGTERM
        self._front_handlers = {P.Submit: self.on_submit, P.SubmitBatch: self.on_submit_batch,
                                P.Query: self.on_query, P.Cancel: self.on_cancel, P.Ping: self.on_ping,
                                P.GetStats: self.on_stats, P.GetGpu: self.on_gpu}
        self._cluster_setup()
        live, was_running, refused = self.table.recover(self.catalog.default())
        for task in refused:
            self._finish(task, "failed", error=P.TaskError("queue_full", "queue bound reached on recovery"))
        self.table.commit()
        if live:
            log.info("recovered %d live tasks from the journal (%d were running)", live, was_running)

    # ------------------------------------------------------------- main loop
    def run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.front, self.back, self.telemetry):
            poller.register(sock, zmq.POLLIN)
        log.info("broker up: front=%s back=%s%s", self.s.broker_front, self.s.broker_back,
                 f" box={self.s.box_name} (shared queue)" if self.shared else "")
        clock, now = self.clock, time.perf_counter
        while self._running and not self._drained():
            self._cluster_listen(poller)
            timeout_ms = self._poll_timeout_ms()
            polled = now()
            ready = dict(poller.poll(timeout_ms))
            clock.woke(now(), timeout_ms / 1000, polled)
            if self._listen_fd is not None and self._listen_fd in ready:
                self._cluster_notices()
            if self.front in ready:
                self._drain(self.front, self._on_front, "front")
            if self.back in ready:
                self._drain(self.back, self._on_back, "back")
            if self.telemetry in ready:
                self._drain(self.telemetry, self._on_telemetry, "telemetry")
            clock.lap("messages", now())
            self._cluster_claim()
            clock.lap("claims", now())
            self._fire_timers()
            clock.lap("timers", now())
            # Dispatch first: the worker starts while the journal fsyncs. Acks still wait
            # for the commit, so a crash here loses no acknowledged task; at worst a task
            # whose submit was never answered runs once for nothing.
            if self._draining_since is None:  # draining: queued tasks stay for the next start
                self._dispatch()
                self._preempt()
            clock.lap("dispatch", now())
            self._commit_and_ack()
            if time.monotonic() >= self._next_heartbeat:
                self._heartbeat()
                self._commit_and_ack()
            clock.lap("journal commit", now())
            self._cluster_tick()
            clock.lap("leases", now())
            self.outbox.flush()
            self._metrics(self)
            clock.lap("replies", now())
            if (stall := clock.done(now())) is not None:
                self._stalled(stall)
        self.close()

    def _stalled(self, stall) -> None:
        """An iteration past stalls.SLOW_S: counted by where its time went, logged at most every
        10 s; replies waiting meanwhile may have come after the API gave up (BROKER_TIMEOUT_S)."""
        metrics.LOOP_STALLS.labels(stall.phase).inc()
        if stall.tell:
            log.warning("broker loop stalled %s; the API answers 503 broker_unavailable to calls that wait "
                        "longer than BROKER_TIMEOUT_S (%gs)", stall.describe(), self.s.broker_timeout_s)

    def _poll_timeout_ms(self) -> int:
        if self.outbox.pending:
            return 1  # replies wait for a slow reader: try again soon
        wait = self._next_heartbeat - time.monotonic()
        deadline = self.table.next_deadline()
        if deadline is not None:
            wait = min(wait, deadline - time.time())
        if self._draining_since is not None:
            wait = min(wait, 0.1)  # look again soon whether the last running task is done
        if self.shared:
            wait = min(wait, self._next_tick - time.monotonic(), self._next_poll - time.monotonic() + 0.001)
            if self.table.journal.listener is None:
                wait = min(wait, max(0.0, self._retry_listen - time.monotonic()))
        if self.table.urgent and self.s.critical_max_wait_ms > 0:
            wait = min(wait, 0.05)  # critical work waits: look again soon (preemption)
        return max(0, int(wait * 1000) + 1)

    def stop(self, *_: object) -> None:
        """First SIGTERM: drain (refuse new work, let running tasks finish within
        DRAIN_GRACE_S, keep queued ones in the journal). A second one: stop now."""
        if self._draining_since is None and self.s.drain_grace_s > 0:
            self._draining_since = time.monotonic()
            log.info("draining: new work refused; %d running tasks get %gs to finish; %d queued stay journaled",
                     self.pool.running_total(), self.s.drain_grace_s, self.table.queued)
        else:
            self._running = False

    @property
    def draining(self) -> bool:
        return self._draining_since is not None

    def _drained(self) -> bool:
        if self._draining_since is None:
            return False
        running = self.pool.running_total()
        if running and time.monotonic() - self._draining_since < self.s.drain_grace_s:
            return False
        if running:
            log.warning("drain grace over: %d tasks still running stay journaled and run again at the next start",
                        running)
        log.info("drained: %d queued tasks kept in the journal", self.table.queued)
        return True

    def close(self) -> None:
        for w in self.pool:
            self._send_worker(w.identity, P.Disconnect())
        try:
            self.table.commit()
        except Exception as exc:  # the last state changes are lost: their tasks run again at the next start
            log.error("journal commit at exit failed: %s", exception_summary(exc))
        self._cluster_release()
        self.table.journal.close()
        for sock in (self.front, self.back, self.telemetry, self.events):
            sock.close(0)

    def _drain(self, sock: zmq.Socket, handler, name: str) -> None:
        """Every ready message, without blocking: batching is where the speed is."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._malformed(name, f"{len(frames)} frames")
                continue
            try:
                handler(frames[0], frames[1])
            except Exception as exc:  # a bug must cost one message, not the broker
                log.error("message handling failed; message dropped: %s", exception_summary(exc))

    def _malformed(self, name: str, what: str) -> None:
        """A message that is not the protocol (garbage, truncated, another version):
        dropped and counted (Stats.frames_dropped); logged at the first and every 1000th."""
        book = self.book.frames_dropped
        book[name] += 1
        metrics.FRAMES_DROPPED.labels(name).inc()
        if book[name] % 1000 == 1:
            log.warning("%s socket: dropped a malformed message (%s); %d so far", name, what, book[name])

    def _on_front(self, identity: bytes, payload: bytes) -> None:
        try:
            msg = P.front_request.decode(payload)
        except Exception as exc:
            self._malformed("front", type(exc).__name__)
            return
        try:
            self._front_handlers[type(msg)](identity, msg)
        except (OSError, sqlite3.Error) as exc:
            # a read of the journal failed (a finished task's record, an idempotency key)
            # while the storage is away: the caller hears why at once, not after its timeout
            if (news := self.table.journal.outage.failed(exc, what="read")) is not None:
                log.error("journal read failed: %s; the caller is answered storage_unavailable", news)
            self._reply(identity, P.Refused(msg.req, "storage_unavailable",
                                            "the journal cannot be read now; retry shortly"))

    def _on_back(self, identity: bytes, payload: bytes) -> None:
        try:
            msg = P.worker_to_broker.decode(payload)
        except Exception as exc:
            self._malformed("back", type(exc).__name__)
            return
        now = time.monotonic()
        worker = self.pool.get(identity)
        if isinstance(msg, P.Ready):
            self.on_ready(identity, msg, now)
            return
        if isinstance(msg, P.Tokens):
            self.on_tokens(msg, payload)
        elif isinstance(msg, P.Done):
            self.on_done(worker, msg)  # a result is kept even from an unknown worker
        if worker is None:
            self._send_worker(identity, P.Disconnect())  # we restarted (or dropped it): register again
            return
        self.pool.seen(worker, now)
        if isinstance(msg, P.Credit):
            self.pool.add_credit(worker, msg.n)
        elif isinstance(msg, P.Disconnect):
            self._drop(worker, "disconnected")
        elif isinstance(msg, P.Stopping):
            self.pool.stopping(worker)
            log.info("worker %s is stopping; %d running tasks may finish", worker.name, worker.running)

    def _on_telemetry(self, topic: bytes, payload: bytes) -> None:
        try:
            t = P.telemetry.decode(payload)
        except Exception as exc:
            self._malformed("telemetry", type(exc).__name__)
            return
        self.gpu_state = "cpu_only" if t.cpu_only else "gpu"
        self.last_telemetry = t
        self.pool.telemetry(t)

    # ------------------------------------------------------------- timers
    def _fire_timers(self) -> None:
        """Deadlines: a queued task past its own expires, a running one is aborted."""
        now = time.time()
        for task in list(self.table.past_deadline(now)):
            if task.record.state == "queued":
                self._finish(task, "expired", error=P.TaskError("deadline", "expired before it could run"))
            else:
                self._abort_running(task, "timeout")
                self._finish(task, "failed",
                             error=P.TaskError("timeout", f"did not finish within {task.spec.timeout_s:g}s"))
        if now >= self._next_expire:
            self._next_expire = now + EXPIRE_EVERY_S
            try:
                self.table.expire(now)
            except Exception as exc:  # a full disk must not stop the queue
                log.error("expiring old results failed: %s", exc)
        if now >= self._next_instances:
            self._next_instances = now + INSTANCES_EVERY_S
            self.catalog.refresh()

    def _heartbeat(self) -> None:
        now = time.monotonic()
        self._next_heartbeat = now + P.HEARTBEAT_INTERVAL_S
        for worker in self.pool.silent(now):
            self._drop(worker, f"silent for {now - worker.last_seen:.1f}s")
        for worker in self.pool:
            self._send_worker(worker.identity, P.Heartbeat())

    # ------------------------------------------------------------- replies and final states
    def _reply(self, identity: bytes, msg) -> None:
        self.outbox.send(identity, P.encode(msg))

    def _reply_after_commit(self, identity: bytes, msg) -> None:
        self._acks.append((identity, P.encode(msg)))

    def _commit_and_ack(self) -> None:
        """Commit, then acknowledge. A journal that cannot be written (disk full, read-only)
        refuses this batch's submits and forgets their tasks; the state changes of tasks
        acknowledged earlier stay buffered in the journal and go in with the next commit
        that succeeds: the broker recovers by itself when space returns. Each cause is
        logged once per episode (this runs thousands of times a second), recovery once."""
        journal = self.table.journal
        outage, writing = journal.outage, journal.pending
        t0 = time.perf_counter()
        try:
            self.table.commit()
        except Exception as exc:
            cause = outage.failed(exc, refused=len(self._unacked))
            if cause is not None:
                log.error("journal %s cannot be written (%s): submits are refused with storage_unavailable until "
                          "it can; state changes of accepted tasks are kept and written then", journal.path, cause)
            for _, _, ids in self._unacked:
                self.table.forget(ids)
            # Every reply that waited for this commit is refused, not dropped: the client
            # learns at once (a cancel took effect in memory; retried, it says already_final).
            for identity, payload in self._acks:
                req = P.front_reply.decode(payload).req
                self._reply(identity, P.Refused(req, "storage_unavailable", "the journal could not be written"))
            self._acks.clear()
            self._unacked.clear()
            return
        if writing:
            metrics.COMMIT.observe(time.perf_counter() - t0)
            if (ended := outage.ended()) is not None:
                log.warning("journal writable again after %d refused submits (%.1fs)", *ended)
        if self._unacked:
            metrics.ACCEPTED.inc(sum(len(ids) for _, _, ids in self._unacked))
        for identity, payload in self._acks:
            self.outbox.send(identity, payload)
        self._acks.clear()
        self._unacked.clear()

    def _finish(self, task: Task, state: str, result=None, error=None) -> P.TaskRecord:
        rec = self.table.finish(task, state, result, error)
        self.events.send_multipart([rec.task_id.encode(), P.encode(P.Final(rec))])
        self.book.finished(state)
        metrics.finished(state, error)
        return rec


def main(settings: Settings) -> None:
    broker = Broker(settings)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    broker.run()
