"""The broker: sole owner of queue and task state, one mediate loop.

Shape (after the ZeroMQ guide's Majordomo): a ROUTER for clients (the API workers),
a ROUTER for workers (the launchers), a SUB for GPU telemetry, a PUB for task events.
Each loop iteration drains every ready message without blocking, handing each to the
handler of its kind; then fires due timers (deadlines, result expiry), dispatches to
workers with credit, commits the journal once for the whole batch (group commit), and
only then acknowledges the submits and cancels of that batch. Nothing here blocks
except the poll.

The state lives in three parts with no sockets: the task table (tasks.py), the
worker pool (pool.py) and the figures with the health rule (stats.py).
"""
from __future__ import annotations

import logging
import signal
import time

import zmq

from .. import protocol as P
from ..config import Settings, ensure_dirs
from ..logs import exception_summary
from ..store.journal import SqliteJournal
from ._pqueue import PriorityQueue, QueueFull
from .outbox import Outbox
from .pool import Worker, WorkerPool
from .stats import HealthInput, StatsBook, health
from .tasks import Task, TaskTable

log = logging.getLogger("appliance.broker")

# A task whose worker vanished is requeued this many times, then failed `worker_lost`.
MAX_REQUEUES = 1
# How often results past their TTL are dropped from the journal.
EXPIRE_EVERY_S = 1.0


class Broker:
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

        queue = PriorityQueue(len(P.PRIORITIES), settings.queue_max_size, settings.queue_aging_s)
        self.table = TaskTable(SqliteJournal(journal_path or settings.journal_path), queue,
                               settings.result_ttl_s, settings.result_tombstone_s)
        self.pool = WorkerPool(settings.worker_liveness_s)
        self.book = StatsBook()
        self.gpu_state = "unknown"
        self._acks: list[tuple[bytes, bytes]] = []             # replies that wait for the commit
        self._unacked: list[tuple[bytes, int, list[str]]] = []  # submits in this batch
        self._next_expire = 0.0
        self._next_heartbeat = 0.0
        self._running = True
        self._front_handlers = {P.Submit: self.on_submit, P.SubmitBatch: self.on_submit_batch,
                                P.Query: self.on_query, P.Cancel: self.on_cancel, P.Ping: self.on_ping,
                                P.GetStats: self.on_stats}
        self._recover()

    def _recover(self) -> None:
        live, was_running, refused = self.table.recover()
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
        log.info("broker up: front=%s back=%s", self.s.broker_front, self.s.broker_back)
        while self._running:
            ready = dict(poller.poll(self._poll_timeout_ms()))
            if self.front in ready:
                self._drain(self.front, self._on_front)
            if self.back in ready:
                self._drain(self.back, self._on_back)
            if self.telemetry in ready:
                self._drain(self.telemetry, self._on_telemetry)
            self._fire_timers()
            # Dispatch first: the worker starts while the journal fsyncs. Acks still wait
            # for the commit, so a crash here loses no acknowledged task; at worst a task
            # whose submit was never answered runs once for nothing.
            self._dispatch()
            self._commit_and_ack()
            if time.monotonic() >= self._next_heartbeat:
                self._heartbeat()
                self._commit_and_ack()
            self.outbox.flush()
        self.close()

    def _poll_timeout_ms(self) -> int:
        if self.outbox.pending:
            return 1  # replies wait for a slow reader: try again soon
        wait = self._next_heartbeat - time.monotonic()
        deadline = self.table.next_deadline()
        if deadline is not None:
            wait = min(wait, deadline - time.time())
        return max(0, int(wait * 1000) + 1)

    def stop(self, *_: object) -> None:
        self._running = False

    def close(self) -> None:
        for w in self.pool:
            self._send_worker(w.identity, P.Disconnect())
        self.table.commit()
        self.table.journal.close()
        for sock in (self.front, self.back, self.telemetry, self.events):
            sock.close(0)

    @staticmethod
    def _drain(sock: zmq.Socket, handler) -> None:
        """Every ready message, without blocking: batching is where the speed is."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                log.warning("dropped a message with %d frames", len(frames))
                continue
            try:
                handler(frames[0], frames[1])
            except Exception as exc:  # a bug must cost one message, not the broker
                log.error("message handling failed; message dropped: %s", exception_summary(exc))

    def _on_telemetry(self, topic: bytes, payload: bytes) -> None:
        try:
            t = P.telemetry.decode(payload)
        except Exception:
            log.warning("undecodable telemetry dropped")
            return
        self.gpu_state = "cpu_only" if t.cpu_only else "gpu"

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

    # ----------------------------------------------------------------- clients
    def _reply(self, identity: bytes, msg) -> None:
        self.outbox.send(identity, P.encode(msg))

    def _reply_after_commit(self, identity: bytes, msg) -> None:
        self._acks.append((identity, P.encode(msg)))

    def _on_front(self, identity: bytes, payload: bytes) -> None:
        try:
            msg = P.front_request.decode(payload)
        except Exception:
            log.warning("undecodable client message dropped")
            return
        self._front_handlers[type(msg)](identity, msg)

    def _visible(self, task_id: str, tenant: str, all_tenants: bool) -> P.TaskRecord | None:
        """The record, unless it belongs to another tenant (then, like an unknown id: None)."""
        rec = self.table.lookup(task_id)
        return rec if rec is not None and (all_tenants or rec.tenant == tenant) else None

    def on_submit(self, identity: bytes, msg: P.Submit) -> None:
        idem = f"{msg.tenant}\0{msg.idempotency_key}" if msg.idempotency_key is not None else None
        if idem is not None:
            earlier = self.table.idempotent(idem)
            if earlier is not None and (rec := self.table.lookup(earlier)) is not None:
                # after this loop's commit, like the original's ack: it may be in the same batch
                self._reply_after_commit(identity, P.Accepted(msg.req, earlier, rec.state))
                return
        if msg.task_id is not None and (len(msg.task_id) != 32 or self.table.lookup(msg.task_id) is not None):
            self._reply(identity, P.Refused(msg.req, "invalid_field", "task_id: not a fresh 32-hex id"))
            return
        self._accept(identity, msg.req, [msg.spec], msg.tenant, batch=False, task_id=msg.task_id, idem=idem)

    def on_submit_batch(self, identity: bytes, msg: P.SubmitBatch) -> None:
        self._accept(identity, msg.req, msg.specs, msg.tenant, batch=True)

    def _accept(self, identity: bytes, req: int, specs: list[P.TaskSpec], tenant: str, batch: bool,
                task_id: str | None = None, idem: str | None = None) -> None:
        """Queue one task or a whole batch (atomic: all or none); the ack waits for the commit."""
        for i, spec in enumerate(specs):
            problem = P.check_bounds(spec, self.s.task_timeout_max_s, self.s.max_prompt_chars)
            if problem is not None:
                where = f"tasks[{i}].{problem[0]}" if batch else problem[0]
                self._reply(identity, P.Refused(req, "invalid_field", f"{where}: {problem[1]}"))
                return
        if batch and len(specs) > self.s.max_batch:
            self._reply(identity, P.Refused(req, "batch_too_large", f"at most {self.s.max_batch} tasks per batch"))
            return
        if len(specs) > (free := self.table.room()):
            self._reply(identity, P.Refused(
                req, "queue_full", f"{len(specs)} tasks do not fit: {free} of {self.s.queue_max_size} places free"))
            return
        now = time.time()
        ids = [self.table.add(spec, tenant, now, task_id if not batch else None, idem).task_id for spec in specs]
        self._reply_after_commit(identity, P.BatchAccepted(req, ids) if batch else P.Accepted(req, ids[0], "queued"))
        self._unacked.append((identity, req, ids))

    def _commit_and_ack(self) -> None:
        try:
            self.table.commit()
        except Exception as exc:
            log.error("journal commit failed: %s; refusing %d submits", exc, len(self._unacked))
            for identity, req, ids in self._unacked:
                self.table.forget(ids)
                self._reply(identity, P.Refused(req, "storage_unavailable", "the journal could not be written"))
            self._acks.clear()
            self._unacked.clear()
            return
        for identity, payload in self._acks:
            self.outbox.send(identity, payload)
        self._acks.clear()
        self._unacked.clear()

    def on_query(self, identity: bytes, msg: P.Query) -> None:
        rec = self._visible(msg.task_id, msg.tenant, msg.all_tenants)
        if rec is None:
            self._reply(identity, P.Refused(msg.req, "not_found", "no such task"))
            return
        info = P.TaskInfo(msg.req, rec)
        task = self.table.get(msg.task_id)
        if task is not None and rec.state == "queued":
            info.position = self.table.position(task)
        elif task is not None and rec.state == "running":
            info.text_so_far, info.tokens_seq = "".join(task.text), task.tokens_seq
        self._reply(identity, info)

    def on_cancel(self, identity: bytes, msg: P.Cancel) -> None:
        rec = self._visible(msg.task_id, msg.tenant, msg.all_tenants)
        task = self.table.get(msg.task_id)
        if rec is None:
            self._reply(identity, P.Refused(msg.req, "not_found", "no such task"))
        elif task is None:
            self._reply(identity, P.Refused(msg.req, "already_final", f"the task is already {rec.state}"))
        else:
            if rec.state == "running":
                self._abort_running(task, "cancelled")
            rec = self._finish(task, "cancelled", error=P.TaskError("cancelled", "cancelled by request"))
            self._reply_after_commit(identity, P.TaskInfo(msg.req, rec))  # like a submit's ack

    def on_ping(self, identity: bytes, msg: P.Ping) -> None:
        ready = sum(1 for w in self.pool if w.slots > 0)
        self._reply(identity, P.Pong(msg.req, ready, len(self.table.queue), self.pool.running_total(),
                                     self.gpu_state, self.pool.models()))

    def on_stats(self, identity: bytes, msg: P.GetStats) -> None:
        queue, book = self.table.queue, self.book
        oldest = self.table.oldest_queued()
        oldest_s = time.time() - oldest.record.created_at if oldest is not None else 0.0
        state, reason = health(HealthInput(
            queued=len(queue), workers=len(self.pool), since_progress_s=book.since_progress(),
            oldest_queued_s=oldest_s, max_size=self.s.queue_max_size, stall_s=self.s.health_stall_s,
            backlog_wait_s=self.s.health_backlog_wait_s))
        p50, p95, p99 = book.dispatch_percentiles()
        self._reply(identity, P.Stats(
            req=msg.req,
            depth={name: queue.depth(level) for name, level in P.LEVEL.items()},
            queued=len(queue), running=self.pool.running_total(), max_size=self.s.queue_max_size,
            workers=self.pool.view(), dispatch_p50_ms=p50, dispatch_p95_ms=p95, dispatch_p99_ms=p99,
            completed_per_min=float(book.per_minute()), finished=dict(book.final_states),
            oldest_queued_s=oldest_s, last_progress_s=book.since_progress(), health=state, health_reason=reason,
            replies_deferred=self.outbox.deferred, replies_undeliverable=self.outbox.undeliverable,
            workers_dropped=self.pool.dropped))

    # ----------------------------------------------------------------- workers
    def _send_worker(self, identity: bytes, msg) -> None:
        try:
            self.back.send_multipart([identity, P.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or HWM: liveness will sort it out
            log.debug("send to worker failed: %s", exc)

    def _abort_running(self, task: Task, reason: str) -> None:
        worker = self.pool.release(task.task_id)
        if worker is not None:
            self._send_worker(worker.identity, P.Abort(task.task_id, reason))

    def _on_back(self, identity: bytes, payload: bytes) -> None:
        try:
            msg = P.worker_to_broker.decode(payload)
        except Exception:
            log.warning("undecodable worker message dropped")
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

    def on_ready(self, identity: bytes, msg: P.Ready, now: float) -> None:
        """Register a worker; what it says it still runs stays its own.

        A worker re-registers after it reconnected (it found us silent) or after we
        restarted. Its tasks that it no longer runs are requeued; those it still runs
        stay with it, and after a broker restart (when the journal's running tasks came
        back queued) it claims them back, so none runs twice. A task it runs that is
        final by now (cancelled, timed out while it was away) is aborted there."""
        worker, lost = self.pool.register(identity, msg, now)
        self._requeue(lost, msg.worker, "re-registered")
        wall = time.time()
        for task_id in set(msg.running) - worker.running:
            task = self.table.get(task_id)
            if task is None or task.record.state != "queued":  # final, or running elsewhere: stop this copy
                self._send_worker(identity, P.Abort(task_id, "cancelled"))
                continue
            self.table.unqueue(task)
            self.table.start(task, worker.name, task.record.started_at or wall)
            worker.running.add(task_id)
            self.table.journal.write(task.seq, task.record)
        log.info("worker %s ready: model=%s slots=%d at %s; %d running tasks kept", msg.worker, msg.model,
                 msg.slots, msg.endpoint, len(worker.running))

    def on_tokens(self, msg: P.Tokens, payload: bytes) -> None:
        task = self.table.get(msg.task_id)
        if task is not None and task.record.state == "running":
            task.text.append(msg.text)
            task.tokens_seq = msg.seq
            self.events.send_multipart([msg.task_id.encode(), payload])

    def on_done(self, worker: Worker | None, msg: P.Done) -> None:
        if worker is not None:
            worker.running.discard(msg.task_id)
        task = self.table.get(msg.task_id)
        if task is None:  # already final (cancelled, timed out) or unknown
            return
        if msg.error is None and msg.result is not None:
            self._finish(task, "completed", result=msg.result)  # (from a former worker after a requeue too)
        else:
            self._finish(task, "failed", error=msg.error or P.TaskError("worker_error", "no result"))

    def _finish(self, task: Task, state: str, result=None, error=None) -> P.TaskRecord:
        rec = self.table.finish(task, state, result, error)
        self.events.send_multipart([rec.task_id.encode(), P.encode(P.Final(rec))])
        self.book.finished(state)
        return rec

    def _drop(self, worker: Worker, why: str) -> None:
        running = self.pool.remove(worker)
        log.warning("worker %s dropped (%s); %d running tasks affected", worker.name, why, len(running))
        self._requeue(running, worker.name, why)

    def _requeue(self, task_ids: set[str], worker_name: str, why: str) -> None:
        """Tasks of a lost worker go back in line, once; a second loss fails them."""
        for task_id in task_ids:
            task = self.table.get(task_id)
            if task is None:
                continue
            if task.requeues >= MAX_REQUEUES:
                self._finish(task, "failed", error=P.TaskError("worker_lost", f"worker {worker_name} lost twice"))
                continue
            try:
                self.table.requeue(task)
            except QueueFull:
                self._finish(task, "failed", error=P.TaskError("worker_lost", "requeue refused: queue full"))

    def _dispatch(self) -> None:
        if not self.table.queue or not len(self.pool):
            return
        now = time.time()
        for worker in self.pool.by_free_credit():
            while worker.credit > 0:
                task = self.table.next_queued(now)
                if task is None:
                    return
                self.table.start(task, worker.name, now)
                self.pool.assign(worker, task.task_id)
                self.book.dispatched(now - task.record.created_at)
                self._send_worker(worker.identity, P.Dispatch(task.task_id, task.spec, task.deadline))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        self._next_heartbeat = now + P.HEARTBEAT_INTERVAL_S
        for worker in self.pool.silent(now):
            self._drop(worker, f"silent for {now - worker.last_seen:.1f}s")
        for worker in self.pool:
            self._send_worker(worker.identity, P.Heartbeat())


def main(settings: Settings) -> None:
    broker = Broker(settings)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    broker.run()
