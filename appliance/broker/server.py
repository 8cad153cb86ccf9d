"""The broker: sole owner of queue and task state, one mediate loop.

Shape (after the ZeroMQ guide's Majordomo): a ROUTER for clients (the API workers),
a ROUTER for model workers (the launchers), a SUB for GPU telemetry. Each loop
iteration drains every ready message without blocking, commits the journal once for
all of them (group commit), then acknowledges the submits, dispatches to workers that
have credit, and fires due timers (deadlines, result expiry, heartbeats). Nothing
here blocks except the poll.
"""
from __future__ import annotations

import heapq
import logging
import signal
import time
import uuid
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import msgspec
import zmq

from .. import protocol as P
from ..config import Settings, ensure_dirs
from ..logs import exception_summary
from ..store.journal import SqliteJournal
from ._pqueue import PriorityQueue, QueueFull
from .outbox import Outbox

log = logging.getLogger("appliance.broker")

# A task whose worker vanished is requeued this many times, then failed `worker_lost`.
MAX_REQUEUES = 1
# How many recent dispatches the latency percentiles are computed over.
DISPATCH_WINDOW = 1000
# Recently finished records kept in memory, so that polling clients rarely hit SQLite.
FINISHED_CACHE = 10_000
# How often results past their TTL are dropped from the journal.
EXPIRE_EVERY_S = 1.0


@dataclass(slots=True)
class Task:
    seq: int
    record: P.TaskRecord
    spec: P.TaskSpec
    deadline: float
    requeues: int = 0
    idem: str | None = None                         # tenant + NUL + idempotency key
    text: list[str] = field(default_factory=list)  # generated so far (Tokens)
    tokens_seq: int = 0


@dataclass(slots=True)
class Worker:
    identity: bytes
    name: str
    model: str
    slots: int
    endpoint: str
    credit: int = 0
    last_seen: float = 0.0
    running: set[str] = field(default_factory=set)


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


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

        self.queue = PriorityQueue(len(P.PRIORITIES), settings.queue_max_size, settings.queue_aging_s)
        self.journal = SqliteJournal(journal_path or settings.journal_path)
        self.tasks: dict[str, Task] = {}           # live tasks only: queued or running
        self.by_seq: dict[int, str] = {}           # queued tasks, in arrival order
        self.finished: OrderedDict[str, P.TaskRecord] = OrderedDict()  # recent final records
        self.idem: dict[str, str] = {}              # idempotency keys of live tasks -> task id
        self._idem_release: list[str] = []
        self.workers: dict[bytes, Worker] = {}
        self.next_seq = 1
        self.gpu_state = "unknown"
        self._deadlines: list[tuple[float, int, str]] = []  # (deadline, seq, task_id), lazily pruned
        self._next_expire = 0.0
        self._acks: list[tuple[bytes, bytes]] = []
        self._unacked: list[tuple[bytes, int, list[str]]] = []
        self._dispatch_ms: deque[float] = deque(maxlen=DISPATCH_WINDOW)
        self._finished_at: deque[float] = deque()
        self._finished = Counter()
        self._last_progress = time.monotonic()
        self.workers_dropped = 0  # for silence (not for leaving or re-registering)
        self._running = True
        self._next_heartbeat = 0.0
        self._recover()

    # ---------------------------------------------------------------- recovery
    def _recover(self) -> None:
        """Rebuild the queue from the journal; tasks that were running go back in line."""
        self.next_seq = self.journal.max_seq() + 1
        requeued = 0
        for seq, rec, spec, idem in self.journal.load_live():
            task = Task(seq, rec, spec, deadline=rec.created_at + spec.timeout_s, idem=idem)
            self.tasks[rec.task_id] = task
            if idem:
                self.idem[idem] = rec.task_id
            if rec.state == "running":
                rec.state, rec.started_at, rec.worker = "queued", None, None
                requeued += 1
            self.by_seq[seq] = rec.task_id
            heapq.heappush(self._deadlines, (task.deadline, seq, rec.task_id))
            try:
                self.queue.push(seq, P.LEVEL[rec.priority], rec.created_at, rec.tenant)
            except QueueFull:  # QUEUE_MAX_SIZE was lowered below what the journal holds
                self._finish(task, "failed", error=P.TaskError("queue_full", "queue bound reached on recovery"))
        self.journal.commit()
        if self.tasks:
            log.info("recovered %d live tasks from the journal (%d were running)", len(self.tasks), requeued)

    # ------------------------------------------------------------- main loop
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        poller.register(self.telemetry, zmq.POLLIN)
        log.info("broker up: front=%s back=%s", self.s.broker_front, self.s.broker_back)
        while self._running:
            ready = dict(poller.poll(self._poll_timeout_ms()))
            if self.front in ready:
                self._drain(self.front, self._on_front)
            if self.back in ready:
                self._drain(self.back, self._on_back)
            if self.telemetry in ready:
                self._drain_telemetry()
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
        if self._deadlines:
            wait = min(wait, self._deadlines[0][0] - time.time())
        return max(0, int(wait * 1000) + 1)

    def stop(self, *_: object) -> None:
        self._running = False

    def close(self) -> None:
        for w in self.workers.values():
            self._send_worker(w.identity, P.Disconnect())
        self.journal.commit()
        self.journal.close()
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

    def _drain_telemetry(self) -> None:
        while True:
            try:
                frames = self.telemetry.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                t = P.telemetry.decode(frames[-1])
            except Exception:
                log.warning("undecodable telemetry dropped")
                continue
            self.gpu_state = "cpu_only" if t.cpu_only else "gpu"

    # ------------------------------------------------------------------ timers
    def _fire_timers(self) -> None:
        """Deadlines: a queued task past its own expires, a running one is aborted."""
        now = time.time()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, seq, task_id = heapq.heappop(heap)
            task = self.tasks.get(task_id)
            if task is None or task.seq != seq:
                continue  # finished before its deadline
            if task.record.state == "queued":
                self.queue.cancel(seq)
                self._finish(task, "expired", error=P.TaskError("deadline", "expired before it could run"))
            else:
                self._abort_running(task, "timeout")
                self._finish(task, "failed",
                             error=P.TaskError("timeout", f"did not finish within {task.spec.timeout_s:g}s"))
        # Entries of tasks that finished early stay until their deadline; rebuild the
        # heap when they outnumber the live ones, so memory follows the live tasks.
        if len(heap) > 4 * len(self.tasks) + 1024:
            self._deadlines = [(t.deadline, t.seq, tid) for tid, t in self.tasks.items()]
            heapq.heapify(self._deadlines)
        if now >= self._next_expire:
            self._next_expire = now + EXPIRE_EVERY_S
            ttl = self.s.result_ttl_s
            try:
                self.journal.expire(now - ttl, now - ttl - self.s.result_tombstone_s)
            except Exception as exc:  # a full disk must not stop the queue
                log.error("expiring old results failed: %s", exc)

    def _lookup(self, task_id: str) -> P.TaskRecord | None:
        """A task's record wherever it is: live, recently finished, or in the journal."""
        task = self.tasks.get(task_id)
        if task is not None:
            return task.record
        # Every record this loop finished is in the cache; the journal holds older ones.
        rec = self.finished.get(task_id)
        if rec is None:
            rec = self.journal.get(task_id)
        if rec is None:
            return None
        now = time.time()
        if rec.finished_at is not None and now - rec.finished_at > self.s.result_ttl_s:
            if now - rec.finished_at > self.s.result_ttl_s + self.s.result_tombstone_s:
                return None
            rec = msgspec.structs.replace(rec, result=None, result_expired=True)
        return rec

    # ----------------------------------------------------------------- clients
    def _reply(self, identity: bytes, msg) -> None:
        self.outbox.send(identity, P.encode(msg))

    def _on_front(self, identity: bytes, payload: bytes) -> None:
        try:
            msg = P.front_request.decode(payload)
        except Exception:
            log.warning("undecodable client message dropped")
            return
        if isinstance(msg, P.Submit):
            self._on_single_submit(identity, msg)
        elif isinstance(msg, P.SubmitBatch):
            self._on_submit(identity, msg.req, msg.specs, msg.tenant, batch=True)
        elif isinstance(msg, P.Query):
            rec = self._lookup(msg.task_id)
            if rec is None or not (msg.all_tenants or rec.tenant == msg.tenant):
                self._reply(identity, P.Refused(msg.req, "not_found", "no such task"))
            else:
                task = self.tasks.get(msg.task_id)
                info = P.TaskInfo(msg.req, rec)
                if task is not None and rec.state == "queued":
                    info.position = self.queue.position(task.seq)
                elif task is not None and rec.state == "running":
                    info.text_so_far, info.tokens_seq = "".join(task.text), task.tokens_seq
                self._reply(identity, info)
        elif isinstance(msg, P.Cancel):
            self._on_cancel(identity, msg)
        elif isinstance(msg, P.Ping):
            ready = sum(1 for w in self.workers.values() if w.slots > 0)
            running = sum(len(w.running) for w in self.workers.values())
            models = sorted({w.model for w in self.workers.values()})
            self._reply(identity, P.Pong(msg.req, ready, len(self.queue), running, self.gpu_state, models))
        elif isinstance(msg, P.GetStats):
            self._reply(identity, self._stats(msg.req))

    def _on_single_submit(self, identity: bytes, msg: P.Submit) -> None:
        idem = f"{msg.tenant}\0{msg.idempotency_key}" if msg.idempotency_key is not None else None
        if idem is not None:
            earlier = self.idem.get(idem) or self.journal.find_idempotent(idem)
            if earlier is not None and (rec := self._lookup(earlier)) is not None:
                # after this loop's commit, like the original's ack: it may be in the same batch
                self._acks.append((identity, P.encode(P.Accepted(msg.req, earlier, rec.state))))
                return
        if msg.task_id is not None and (len(msg.task_id) != 32 or self._lookup(msg.task_id) is not None):
            self._reply(identity, P.Refused(msg.req, "invalid_field", "task_id: not a fresh 32-hex id"))
            return
        self._on_submit(identity, msg.req, [msg.spec], msg.tenant, batch=False, task_id=msg.task_id, idem=idem)

    def _on_submit(self, identity: bytes, req: int, specs: list[P.TaskSpec], tenant: str, batch: bool,
                   task_id: str | None = None, idem: str | None = None) -> None:
        """Queue one task or a whole batch; a batch is atomic: all or none."""
        for i, spec in enumerate(specs):
            problem = P.check_bounds(spec, self.s.task_timeout_max_s, self.s.max_prompt_chars)
            if problem is not None:
                where = f"tasks[{i}].{problem[0]}" if batch else problem[0]
                self._reply(identity, P.Refused(req, "invalid_field", f"{where}: {problem[1]}"))
                return
        if batch and len(specs) > self.s.max_batch:
            self._reply(identity, P.Refused(req, "batch_too_large", f"at most {self.s.max_batch} tasks per batch"))
            return
        free = self.s.queue_max_size - len(self.queue)
        if len(specs) > free:
            self._reply(identity, P.Refused(
                req, "queue_full", f"{len(specs)} tasks do not fit: {free} of {self.s.queue_max_size} places free"))
            return
        now = time.time()
        ids = []
        for spec in specs:
            seq = self.next_seq
            self.next_seq += 1
            self.queue.push(seq, P.LEVEL[spec.priority], now, tenant)  # room was checked above
            task_id = task_id or uuid.uuid4().hex
            rec = P.TaskRecord(task_id=task_id, state="queued", type=spec.type, priority=spec.priority,
                               created_at=now, tenant=tenant)
            task = Task(seq, rec, spec, deadline=now + spec.timeout_s, idem=idem)
            self.tasks[task_id] = task
            self.by_seq[seq] = task_id
            if idem:
                self.idem[idem] = task_id
            heapq.heappush(self._deadlines, (task.deadline, seq, task_id))
            self.journal.write(seq, rec, spec, idem)
            ids.append(task_id)
            task_id = None
        # Acknowledged only after the journal commit of this loop iteration.
        reply = P.BatchAccepted(req, ids) if batch else P.Accepted(req, ids[0], "queued")
        self._acks.append((identity, P.encode(reply)))
        self._unacked.append((identity, req, ids))

    def _commit_and_ack(self) -> None:
        try:
            self.journal.commit()
        except Exception as exc:
            log.error("journal commit failed: %s; refusing %d submits", exc, len(self._unacked))
            for identity, req, ids in self._unacked:
                for task_id in ids:
                    task = self.tasks.pop(task_id, None)
                    if task is not None:
                        self.queue.cancel(task.seq)
                        self.by_seq.pop(task.seq, None)
                self._reply(identity, P.Refused(req, "storage_unavailable", "the journal could not be written"))
            self._acks.clear()
            self._unacked.clear()
            return
        for identity, payload in self._acks:
            self.outbox.send(identity, payload)
        self._acks.clear()
        self._unacked.clear()
        for idem in self._idem_release:
            self.idem.pop(idem, None)
        self._idem_release.clear()

    def _on_cancel(self, identity: bytes, msg: P.Cancel) -> None:
        task = self.tasks.get(msg.task_id)
        if task is not None and not (msg.all_tenants or task.record.tenant == msg.tenant):
            self._reply(identity, P.Refused(msg.req, "not_found", "no such task"))
            return
        if task is None:
            rec = self._lookup(msg.task_id)
            if rec is None or not (msg.all_tenants or rec.tenant == msg.tenant):
                self._reply(identity, P.Refused(msg.req, "not_found", "no such task"))
            else:
                self._reply(identity, P.Refused(msg.req, "already_final", f"the task is already {rec.state}"))
            return
        rec = task.record
        if rec.state == "queued":
            self.queue.cancel(task.seq)
        else:
            self._abort_running(task, "cancelled")
        self._finish(task, "cancelled", error=P.TaskError("cancelled", "cancelled by request"))
        # the reply waits for the journal commit, like a submit's
        self._acks.append((identity, P.encode(P.TaskInfo(msg.req, rec))))

    def _stats(self, req: int) -> P.Stats:
        now, mono = time.time(), time.monotonic()
        while self._finished_at and self._finished_at[0] < mono - 60:
            self._finished_at.popleft()
        lat = sorted(self._dispatch_ms)
        queued = len(self.queue)
        oldest = 0.0
        for task_id in self.by_seq.values():  # arrival order: the first is the oldest
            oldest = now - self.tasks[task_id].record.created_at
            break
        since = mono - self._last_progress
        health, reason = "healthy", ""
        if queued and not self.workers:
            health, reason = "stalled", "tasks are queued and no model instance is registered"
        elif queued and since > self.s.health_stall_s:
            health, reason = "stalled", f"tasks are queued and nothing progressed for {since:.0f}s"
        elif queued >= 0.8 * self.s.queue_max_size:
            health, reason = "backing_up", f"queue at {queued}/{self.s.queue_max_size}"
        elif oldest > self.s.health_backlog_wait_s:
            health, reason = "backing_up", f"oldest queued task waited {oldest:.0f}s"
        return P.Stats(
            req=req,
            depth={name: self.queue.depth(level) for name, level in P.LEVEL.items()},
            queued=queued,
            running=sum(len(w.running) for w in self.workers.values()),
            max_size=self.s.queue_max_size,
            workers=[P.WorkerStats(w.name, w.model, w.endpoint, w.slots, len(w.running), w.credit)
                     for w in self.workers.values()],
            dispatch_p50_ms=_pct(lat, 50), dispatch_p95_ms=_pct(lat, 95), dispatch_p99_ms=_pct(lat, 99),
            completed_per_min=float(len(self._finished_at)),
            finished=dict(self._finished),
            oldest_queued_s=oldest,
            last_progress_s=since,
            health=health,
            health_reason=reason,
            replies_deferred=self.outbox.deferred,
            replies_undeliverable=self.outbox.undeliverable,
            workers_dropped=self.workers_dropped,
        )

    # ----------------------------------------------------------------- workers
    def _send_worker(self, identity: bytes, msg) -> None:
        try:
            self.back.send_multipart([identity, P.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or HWM: liveness will sort it out
            log.debug("send to worker failed: %s", exc)

    def _abort_running(self, task: Task, reason: str) -> None:
        for worker in self.workers.values():
            if task.record.task_id in worker.running:
                worker.running.discard(task.record.task_id)
                self._send_worker(worker.identity, P.Abort(task.record.task_id, reason))

    def _on_back(self, identity: bytes, payload: bytes) -> None:
        try:
            msg = P.worker_to_broker.decode(payload)
        except Exception:
            log.warning("undecodable worker message dropped")
            return
        now = time.monotonic()
        worker = self.workers.get(identity)
        if isinstance(msg, P.Ready):
            self._on_ready(identity, worker, msg, now)
            return
        if isinstance(msg, P.Tokens):
            task = self.tasks.get(msg.task_id)
            if task is not None and task.record.state == "running":
                task.text.append(msg.text)
                task.tokens_seq = msg.seq
                self.events.send_multipart([msg.task_id.encode(), payload])
        elif isinstance(msg, P.Done):
            self._on_done(worker, msg)  # a result is kept even from an unknown worker
        if worker is None:
            # We restarted (or dropped it): ask it to register again.
            self._send_worker(identity, P.Disconnect())
            return
        worker.last_seen = now
        if isinstance(msg, P.Credit):
            worker.credit = min(worker.slots - len(worker.running), worker.credit + max(0, msg.n))
        elif isinstance(msg, P.Disconnect):
            self._drop_worker(worker, "disconnected")

    def _on_ready(self, identity: bytes, old: Worker | None, msg: P.Ready, now: float) -> None:
        """Register a worker; what it says it still runs stays its own.

        A worker re-registers after it reconnected (it found us silent) or after we
        restarted. Its tasks that it no longer runs are requeued; those it still runs
        stay with it, and after a broker restart (when the journal's running tasks came
        back queued) it claims them back, so none runs twice. A task it runs that is
        final by now (cancelled, timed out while it was away) is aborted there."""
        new = Worker(identity, msg.worker, msg.model, msg.slots, msg.endpoint, last_seen=now)
        still = set(msg.running)
        if old is not None:
            new.running = old.running & still
            old.running -= new.running
            self._drop_worker(old, "re-registered")
        wall = time.time()
        for task_id in still - new.running:
            task = self.tasks.get(task_id)
            if task is None:
                self._send_worker(identity, P.Abort(task_id, "cancelled"))
                continue
            rec = task.record
            if rec.state == "queued":
                self.queue.cancel(task.seq)
                self.by_seq.pop(task.seq, None)
            else:  # running on another worker: the duplicate is stopped, the first one goes on
                self._send_worker(identity, P.Abort(task_id, "cancelled"))
                continue
            rec.state, rec.worker = "running", msg.worker
            rec.started_at = rec.started_at or wall
            new.running.add(task_id)
            self.journal.write(task.seq, rec)
        self.workers[identity] = new
        log.info("worker %s ready: model=%s slots=%d at %s; %d running tasks kept", msg.worker, msg.model,
                 msg.slots, msg.endpoint, len(new.running))

    def _on_done(self, worker: Worker | None, msg: P.Done) -> None:
        task = self.tasks.get(msg.task_id)
        if worker is not None:
            worker.running.discard(msg.task_id)
        if task is None:  # already final (cancelled, timed out) or unknown
            return
        if task.record.state == "queued":  # finished elsewhere after a requeue
            self.queue.cancel(task.seq)
        if msg.error is None and msg.result is not None:
            self._finish(task, "completed", result=msg.result)
        else:
            self._finish(task, "failed", error=msg.error or P.TaskError("worker_error", "no result"))

    def _finish(self, task: Task, state: str, result=None, error=None) -> None:
        rec = task.record
        rec.state = state
        rec.finished_at = time.time()
        rec.result = result
        rec.error = error
        self.by_seq.pop(task.seq, None)
        del self.tasks[rec.task_id]
        if task.idem:  # forgotten here once the journal has it (after this loop's commit)
            self._idem_release.append(task.idem)
        self.events.send_multipart([rec.task_id.encode(), P.encode(P.Final(rec))])
        self.finished[rec.task_id] = rec
        if len(self.finished) > FINISHED_CACHE:
            self.finished.popitem(last=False)
        self.journal.write(task.seq, rec)
        self._finished[state] += 1
        self._finished_at.append(time.monotonic())
        self._last_progress = time.monotonic()

    def _drop_worker(self, worker: Worker, why: str) -> None:
        self.workers.pop(worker.identity, None)
        log.warning("worker %s dropped (%s); %d running tasks affected", worker.name, why, len(worker.running))
        for task_id in worker.running:
            task = self.tasks.get(task_id)
            if task is None:
                continue
            if task.requeues >= MAX_REQUEUES:
                self._finish(task, "failed", error=P.TaskError("worker_lost", f"worker {worker.name} lost twice"))
                continue
            task.requeues += 1
            task.text.clear()
            task.tokens_seq = 0
            rec = task.record
            rec.state, rec.started_at, rec.worker = "queued", None, None
            self.by_seq[task.seq] = task_id
            try:
                # back in line at its priority, with its original arrival time
                self.queue.push(task.seq, P.LEVEL[rec.priority], rec.created_at, rec.tenant)
            except QueueFull:
                self._finish(task, "failed", error=P.TaskError("worker_lost", "requeue refused: queue full"))
                continue
            self.journal.write(task.seq, rec)

    def _dispatch(self) -> None:
        if not self.queue or not self.workers:
            return
        now = time.time()
        for worker in sorted(self.workers.values(), key=lambda w: -w.credit):
            while worker.credit > 0:
                seq = self.queue.pop(now)
                if seq < 0:
                    return
                task_id = self.by_seq.pop(seq, None)
                task = self.tasks.get(task_id) if task_id else None
                if task is None:
                    continue
                rec = task.record
                rec.state, rec.started_at, rec.worker = "running", now, worker.name
                worker.credit -= 1
                worker.running.add(task_id)
                self._dispatch_ms.append((now - rec.created_at) * 1000)
                self._last_progress = time.monotonic()
                self._send_worker(worker.identity, P.Dispatch(task_id, task.spec, task.deadline))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        self._next_heartbeat = now + P.HEARTBEAT_INTERVAL_S
        horizon = now - self.s.worker_liveness_s
        for worker in list(self.workers.values()):
            if worker.last_seen < horizon:
                self.workers_dropped += 1
                self._drop_worker(worker, f"silent for {now - worker.last_seen:.1f}s")
            else:
                self._send_worker(worker.identity, P.Heartbeat())


def main(settings: Settings) -> None:
    broker = Broker(settings)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    broker.run()
