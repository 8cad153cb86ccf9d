"""The broker's handlers for its workers (the launchers), dispatch and preemption.

A mixin of the Broker (server.py). Dispatch runs once per loop iteration: for each
model with queued tasks, while one of its instances may take work, the queue gives
the next task (only critical/high when nothing but reserved slots is free) and the
pool's routing picks the instance. Preemption is the last resort for critical work:
when a critical or high task has waited CRITICAL_MAX_WAIT_MS and no instance of its
model can take it, the lowest-priority running task below `high` on that model
(the most recently started: the least work lost) is aborted in llama.cpp and put
back at the head of its level; its status counts it (`preempted`).
"""
from __future__ import annotations

import logging
import time

import zmq

from .. import protocol as P
from . import metrics
from ._pqueue import QueueFull
from .outbox import LAST, MORE
from .pool import Worker
from .routing import URGENT, conversation_key
from .tasks import Task

log = logging.getLogger("appliance.broker")

# A task whose worker vanished is requeued this many times, then failed `worker_lost`.
MAX_REQUEUES = 1
# Failures that are the instance's, not the task's: its model server went away under it
# (crashed, killed). The task is requeued like one whose worker vanished.
INSTANCE_FAILURES = frozenset({"llama_unavailable"})
# A preempted task's freed slot is expected back within this long (then counted as free again).
FREEING_S = 5.0
NO_ONE: frozenset[str] = frozenset()


class WorkerSide:
    def _send_worker(self, identity: bytes, msg) -> None:
        try:
            self.back.send(identity, MORE)
            self.back.send(P.encode(msg), LAST)
        except zmq.ZMQError as exc:  # peer gone or HWM: liveness will sort it out
            log.debug("send to worker failed: %s", exc)

    def _abort_running(self, task: Task, reason: str) -> None:
        worker = self.pool.release(task.task_id)
        if worker is not None:
            self._send_worker(worker.identity, P.Abort(task.task_id, reason))

    def on_ready(self, identity: bytes, msg: P.Ready, now: float) -> None:
        """Register a worker; what it says it still runs stays its own.

        A worker re-registers after it reconnected (it found us silent) or after we
        restarted. Its tasks that it no longer runs are requeued; those it still runs
        stay with it, and after a broker restart (when the journal's running tasks came
        back queued) it claims them back, so none runs twice. A task it runs that is
        final by now (cancelled, timed out while it was away) is aborted there."""
        if msg.version != P.PROTOCOL_VERSION:  # its messages may not mean what ours do
            self._malformed("back", f"Ready of {msg.worker[:64]!r} with protocol version {msg.version}, "
                                    f"not {P.PROTOCOL_VERSION}: not registered")
            return
        worker, lost = self.pool.register(identity, msg, now)
        self._requeue(lost, msg.worker)
        wall = time.time()
        for task_id in set(msg.running) - set(worker.tasks):
            task = self.table.get(task_id)
            if task is None or task.record.state != "queued":  # final, or running elsewhere: stop this copy
                self._send_worker(identity, P.Abort(task_id, "cancelled"))
                continue
            self.table.unqueue(task)
            self.table.start(task, worker.name, task.record.started_at or wall)
            if self.shared:
                task.record.box = self.s.box_name
            worker.add(task_id, task.level)
            self.table.journal.write(task.seq, task.record)
        self.catalog.note(msg.model)
        log.info("worker %s ready: model=%s slots=%d (%d reserved) gpu=%d at %s; %d running tasks kept",
                 msg.worker, msg.model, msg.slots, msg.reserved, msg.gpu, msg.endpoint, worker.running)

    def on_tokens(self, msg: P.Tokens, payload: bytes) -> None:
        task = self.table.get(msg.task_id)
        if task is not None and task.record.state == "running":
            task.text.append(msg.text)
            task.tokens_seq = msg.seq
            self.events.send_multipart([msg.task_id.encode(), payload])

    def on_done(self, worker: Worker | None, msg: P.Done) -> None:
        """A result is kept from whichever worker ran the task (a former one after a
        requeue or a broker restart too). A failure ends the task when it comes from the
        worker running it now, or from a former one while the task waits in line (after
        a broker restart); never the failure of a copy we stopped ourselves (preempted,
        or cancelled as a duplicate): the task goes on."""
        self._freeing.pop(msg.task_id, None)
        current = worker is not None and worker.remove(msg.task_id)
        if worker is not None and msg.result is not None:
            self.pool.measured(worker, msg.result.timings)
        task = self.table.get(msg.task_id)
        if task is None:  # already final (cancelled, timed out) or unknown
            return
        error = msg.error or (None if msg.result is not None else P.TaskError("worker_error", "no result"))
        if error is None:
            if not current:
                self._abort_running(task, "cancelled")  # a second copy may run elsewhere
            self._finish(task, "completed", result=msg.result)
        elif current and error.code in INSTANCE_FAILURES:
            worker.suspect = True  # until its launcher offers credit again (pool.Worker.suspect)
            self._requeue({task.task_id}, worker.name)
        elif current or (task.record.state == "queued" and error.code not in ("preempted", "cancelled")):
            self._finish(task, "failed", result=msg.result, error=error)  # a result, if any: what it produced

    def _drop(self, worker: Worker, why: str) -> None:
        running = self.pool.remove(worker)
        log.warning("worker %s dropped (%s); %d running tasks affected", worker.name, why, len(running))
        self._requeue(running, worker.name)

    def _requeue(self, task_ids: set[str], worker_name: str) -> None:
        """Tasks of a lost worker go back in line, once, avoiding it; a second loss fails them."""
        for task_id in task_ids:
            task = self.table.get(task_id)
            if task is None:
                continue
            # On a shared queue a task may have lost an instance on another box before: its
            # runs (attempts, less preemptions) count those too.
            lost_before = task.requeues >= MAX_REQUEUES or (
                self.shared and task.record.attempts - task.record.preempted > MAX_REQUEUES)
            if lost_before:
                self._finish(task, "failed", error=P.TaskError("worker_lost", f"worker {worker_name} lost twice"))
                continue
            try:
                self.table.requeue(task, lost_on=worker_name)
            except QueueFull:
                self._finish(task, "failed", error=P.TaskError("worker_lost", "requeue refused: queue full"))
                continue
            self._requeued(task, f"its instance {worker_name} was lost")
            self._hand_back_if_stranded(task)

    def _requeued(self, task: Task, reason: str) -> None:
        """Followers learn that the text streamed so far is void: the task starts over."""
        self.events.send_multipart([task.task_id.encode(),
                                    P.encode(P.Requeued(task.task_id, task.record.attempts, reason))])

    def _dispatch(self) -> None:
        if not self.table.queued or not len(self.pool):
            return
        now = time.time()
        for model in self.table.waiting_models():
            workers = self.pool.serving(model)
            while True:
                low_ok, urgent_ok = self.pool.can_take(workers)
                if not urgent_ok:
                    break
                task = self.table.next_queued(model, now, -1 if low_ok else URGENT)
                if task is None:
                    break
                pin = task.record.pin
                worker = self.pool.choose(workers if pin is None else [w for w in workers if w.name == pin],
                                          task.level, conversation_key(task.spec, task.record.tenant),
                                          task.lost_on or NO_ONE)
                if worker is None:  # the queue and the pool disagree: never lose the task
                    self.table.put_back(task)
                    break
                self.table.start(task, worker.name, now)
                if self.shared:  # other boxes see it running here, and its attempts count
                    task.record.box = self.s.box_name
                    self.table.journal.write(task.seq, task.record)
                self.pool.assign(worker, task.task_id, task.level)
                self.book.dispatched(now - task.record.created_at)
                metrics.DISPATCH.observe(max(0.0, now - task.record.created_at))
                self._send_worker(worker.identity, P.Dispatch(task.task_id, task.spec, task.deadline,
                                                                     task.record.tenant))

    def _preempt(self) -> None:
        """Free a slot for critical work that has waited too long (see the module's docstring)."""
        limit_s = self.s.critical_max_wait_ms / 1000
        if limit_s <= 0 or not self.table.urgent:
            return
        now = time.time()
        for task_id, since in list(self._freeing.items()):
            if now - since[1] > FREEING_S:
                del self._freeing[task_id]
        for model, oldest, waiting in list(self.table.oldest_urgent()):
            freeing = sum(1 for m, _ in self._freeing.values() if m == model)
            if now - oldest < limit_s or waiting <= freeing or self.pool.can_take(self.pool.serving(model))[1]:
                continue
            victim = self._victim(model)
            if victim is None:
                continue
            log.info("preempting task %s (%s) on %s for critical work of %s waiting %.0f ms", victim.task_id,
                     victim.record.priority, victim.record.worker, model, (now - oldest) * 1000)
            self._abort_running(victim, "preempted")
            self._freeing[victim.task_id] = (model, now)
            victim.record.preempted += 1
            self.book.preemptions += 1
            metrics.PREEMPTIONS.inc()
            try:
                self.table.requeue(victim)
            except QueueFull:
                self._finish(victim, "failed", error=P.TaskError("preempted", "stopped for critical work; "
                                                                 "no room to queue it again"))
                continue
            self._requeued(victim, "preempted for critical work")

    def _victim(self, model: str) -> Task | None:
        """The running task below `high` on `model` with the lowest priority, started last."""
        best: Task | None = None
        for worker in self.pool.serving(model):
            for task_id, level in worker.tasks.items():
                task = self.table.get(task_id)
                if level <= URGENT or task is None:
                    continue
                if best is None or (level, task.record.started_at or 0) > (best.level, best.record.started_at or 0):
                    best = task
        return best
