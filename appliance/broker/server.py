"""The broker: sole owner of queue and task state, one mediate loop.

Shape (after the ZeroMQ guide's Majordomo): a ROUTER for clients (the API workers),
a ROUTER for model workers (the launchers), a SUB for GPU telemetry. Each loop
iteration drains every ready message without blocking, commits the journal once for
all of them (group commit), then acknowledges the submits and dispatches to workers
that have credit. Nothing here blocks except the poll.
"""
from __future__ import annotations

import logging
import signal
import time
import uuid
from dataclasses import dataclass, field

import zmq

from .. import protocol as P
from ..config import Settings, ensure_dirs
from ..store.journal import SqliteJournal
from ._pqueue import PriorityQueue, QueueFull

log = logging.getLogger("appliance.broker")

# A task whose worker vanished is requeued this many times, then failed `worker_lost`.
MAX_REQUEUES = 1


@dataclass(slots=True)
class Task:
    seq: int
    record: P.TaskRecord
    spec: P.TaskSpec
    deadline: float
    requeues: int = 0


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


class Broker:
    def __init__(self, settings: Settings, journal_path: str | None = None):
        self.s = settings
        ensure_dirs(settings)
        self.ctx = zmq.Context.instance()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.back = self.ctx.socket(zmq.ROUTER)
        self.telemetry = self.ctx.socket(zmq.SUB)
        for sock in (self.front, self.back, self.telemetry):
            sock.setsockopt(zmq.LINGER, 0)
        # A restarted launcher reuses its identity; let the new connection take it over.
        self.back.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.front.bind(settings.broker_front)
        self.back.bind(settings.broker_back)
        self.telemetry.setsockopt(zmq.SUBSCRIBE, P.TELEMETRY_TOPIC)
        self.telemetry.connect(settings.telemetry_endpoint)

        self.queue = PriorityQueue(len(P.PRIORITIES), settings.queue_max_size, settings.queue_aging_s)
        self.journal = SqliteJournal(journal_path or f"{settings.data_dir}/journal.sqlite3")
        self.tasks: dict[str, Task] = {}
        self.by_seq: dict[int, str] = {}
        self.workers: dict[bytes, Worker] = {}
        self.next_seq = 1
        self.gpu_state = "unknown"
        self._acks: list[tuple[bytes, bytes]] = []
        self._refuse_on_fail: list[tuple[bytes, int, str]] = []
        self._running = True
        self._next_heartbeat = 0.0
        self._recover()

    # ---------------------------------------------------------------- recovery
    def _recover(self) -> None:
        """Rebuild queue and results from the journal; running tasks go back in line."""
        now = time.time()
        requeued = 0
        for seq, rec, spec in self.journal.load():
            self.next_seq = max(self.next_seq, seq + 1)
            task = Task(seq, rec, spec, deadline=rec.created_at + spec.timeout_s)
            self.tasks[rec.task_id] = task
            if rec.state in P.FINAL_STATES:
                continue
            if rec.state == "running":
                rec.state, rec.started_at, rec.worker = "queued", None, None
                requeued += 1
            self.by_seq[seq] = rec.task_id
            # Recovery may exceed the bound momentarily; every journaled task comes back.
            try:
                self.queue.push(seq, P.LEVEL[rec.priority], now)
            except QueueFull:
                self._finish(task, "failed", error=P.TaskError("queue_full", "queue bound reached on recovery"))
        self.journal.commit()
        if self.tasks:
            log.info("recovered %d tasks from the journal (%d queued, %d were running)",
                     len(self.tasks), len(self.queue), requeued)

    # ------------------------------------------------------------- main loop
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        poller.register(self.telemetry, zmq.POLLIN)
        log.info("broker up: front=%s back=%s", self.s.broker_front, self.s.broker_back)
        while self._running:
            timeout_ms = max(0, int((self._next_heartbeat - time.monotonic()) * 1000))
            ready = dict(poller.poll(timeout_ms))
            if self.front in ready:
                self._drain(self.front, self._on_front)
            if self.back in ready:
                self._drain(self.back, self._on_back)
            if self.telemetry in ready:
                self._drain_telemetry()
            self._commit_and_ack()
            self._dispatch()
            if time.monotonic() >= self._next_heartbeat:
                self._heartbeat()
                self._commit_and_ack()
        self.close()

    def stop(self, *_: object) -> None:
        self._running = False

    def close(self) -> None:
        for w in self.workers.values():
            self._send_worker(w.identity, P.Disconnect())
        self.journal.commit()
        self.journal.close()
        for sock in (self.front, self.back, self.telemetry):
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
            handler(frames[0], frames[1])

    def _drain_telemetry(self) -> None:
        while True:
            try:
                _, payload = self.telemetry.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            try:
                t = P.telemetry.decode(payload)
            except Exception:
                log.warning("undecodable telemetry dropped")
                continue
            self.gpu_state = "cpu_only" if t.cpu_only else "gpu"

    # ----------------------------------------------------------------- clients
    def _reply(self, identity: bytes, msg) -> None:
        self.front.send_multipart([identity, P.encode(msg)])

    def _on_front(self, identity: bytes, payload: bytes) -> None:
        try:
            msg = P.front_request.decode(payload)
        except Exception:
            log.warning("undecodable client message dropped")
            return
        if isinstance(msg, P.Submit):
            self._on_submit(identity, msg)
        elif isinstance(msg, P.Query):
            task = self.tasks.get(msg.task_id)
            if task is None:
                self._reply(identity, P.Refused(msg.req, "not_found", "no such task"))
            else:
                self._reply(identity, P.TaskInfo(msg.req, task.record))
        elif isinstance(msg, P.Ping):
            ready = sum(1 for w in self.workers.values() if w.slots > 0)
            running = sum(len(w.running) for w in self.workers.values())
            self._reply(identity, P.Pong(msg.req, ready, len(self.queue), running, self.gpu_state))

    def _on_submit(self, identity: bytes, msg: P.Submit) -> None:
        spec = msg.spec
        problem = spec.check()
        if problem is not None:
            self._reply(identity, P.Refused(msg.req, "invalid_field", f"{problem[0]}: {problem[1]}"))
            return
        now = time.time()
        seq = self.next_seq
        try:
            self.queue.push(seq, P.LEVEL[spec.priority], now)
        except QueueFull:
            self._reply(identity, P.Refused(msg.req, "queue_full", f"queue holds {self.s.queue_max_size} tasks"))
            return
        self.next_seq += 1
        task_id = uuid.uuid4().hex
        rec = P.TaskRecord(task_id=task_id, state="queued", type=spec.type, priority=spec.priority,
                           created_at=now, tenant=msg.tenant)
        task = Task(seq, rec, spec, deadline=now + spec.timeout_s)
        self.tasks[task_id] = task
        self.by_seq[seq] = task_id
        self.journal.write(seq, rec, spec)
        # Acknowledged only after the journal commit of this loop iteration.
        self._acks.append((identity, P.encode(P.Accepted(msg.req, task_id, "queued"))))
        self._refuse_on_fail.append((identity, msg.req, task_id))

    def _commit_and_ack(self) -> None:
        try:
            self.journal.commit()
        except Exception as exc:
            log.error("journal commit failed: %s; refusing %d submits", exc, len(self._refuse_on_fail))
            for identity, req, task_id in self._refuse_on_fail:
                task = self.tasks.pop(task_id, None)
                if task is not None:
                    self.queue.cancel(task.seq)
                    self.by_seq.pop(task.seq, None)
                self._reply(identity, P.Refused(req, "storage_unavailable", "the journal could not be written"))
            self._acks.clear()
            self._refuse_on_fail.clear()
            return
        for identity, payload in self._acks:
            self.front.send_multipart([identity, payload])
        self._acks.clear()
        self._refuse_on_fail.clear()

    # ----------------------------------------------------------------- workers
    def _send_worker(self, identity: bytes, msg) -> None:
        try:
            self.back.send_multipart([identity, P.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or HWM: liveness will sort it out
            log.debug("send to worker failed: %s", exc)

    def _on_back(self, identity: bytes, payload: bytes) -> None:
        try:
            msg = P.worker_to_broker.decode(payload)
        except Exception:
            log.warning("undecodable worker message dropped")
            return
        now = time.monotonic()
        worker = self.workers.get(identity)
        if isinstance(msg, P.Ready):
            if worker is not None:
                self._drop_worker(worker, "re-registered")
            self.workers[identity] = Worker(identity, msg.worker, msg.model, msg.slots, msg.endpoint, last_seen=now)
            log.info("worker %s ready: model=%s slots=%d at %s", msg.worker, msg.model, msg.slots, msg.endpoint)
            return
        if isinstance(msg, P.Done):
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

    def _on_done(self, worker: Worker | None, msg: P.Done) -> None:
        task = self.tasks.get(msg.task_id)
        if worker is not None:
            worker.running.discard(msg.task_id)
        if task is None or task.record.state in P.FINAL_STATES:
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
        self.journal.write(task.seq, rec)

    def _drop_worker(self, worker: Worker, why: str) -> None:
        self.workers.pop(worker.identity, None)
        log.warning("worker %s dropped (%s); %d running tasks affected", worker.name, why, len(worker.running))
        now = time.time()
        for task_id in worker.running:
            task = self.tasks.get(task_id)
            if task is None or task.record.state in P.FINAL_STATES:
                continue
            if task.requeues >= MAX_REQUEUES:
                self._finish(task, "failed", error=P.TaskError("worker_lost", f"worker {worker.name} lost twice"))
                continue
            task.requeues += 1
            rec = task.record
            rec.state, rec.started_at, rec.worker = "queued", None, None
            self.by_seq[task.seq] = task_id
            try:
                self.queue.push(task.seq, P.LEVEL[rec.priority], now)
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
                if now >= task.deadline:
                    self._finish(task, "expired", error=P.TaskError("deadline", "expired before it could run"))
                    continue
                rec = task.record
                rec.state, rec.started_at, rec.worker = "running", now, worker.name
                worker.credit -= 1
                worker.running.add(task_id)
                self._send_worker(worker.identity, P.Dispatch(task_id, task.spec, task.deadline))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        self._next_heartbeat = now + P.HEARTBEAT_INTERVAL_S
        horizon = now - P.HEARTBEAT_INTERVAL_S * P.HEARTBEAT_LIVENESS
        for worker in list(self.workers.values()):
            if worker.last_seen < horizon:
                self._drop_worker(worker, "missed heartbeats")
            else:
                self._send_worker(worker.identity, P.Heartbeat())


def main(settings: Settings) -> None:
    broker = Broker(settings)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    broker.run()
