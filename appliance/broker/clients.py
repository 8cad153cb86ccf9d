"""The broker's handlers for its clients (the API workers): one per message kind.

A mixin of the Broker (server.py), which owns the sockets and the loop; the state is
in its task table, worker pool and stats book.
"""
from __future__ import annotations

import time

from .. import protocol as P
from . import metrics
from ._pqueue import QueueFull
from .stats import HealthInput, health


class ClientSide:
    def _visible(self, task_id: str, tenant: str, all_tenants: bool) -> P.TaskRecord | None:
        """The record, unless it belongs to another tenant (then, like an unknown id: None)."""
        rec = self.table.lookup(task_id)
        return rec if rec is not None and (all_tenants or rec.tenant == tenant) else None

    def _expired(self, expires_at: float) -> bool:
        """The caller gave up on this submit already (and answered 503): do not run it unseen."""
        if expires_at and time.time() > expires_at:
            self.book.submits_expired += 1
            metrics.SUBMITS_EXPIRED.inc()
            return True
        return False

    def on_submit(self, identity: bytes, msg: P.Submit) -> None:
        if self._expired(msg.expires_at):
            return
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
        self._accept(identity, msg.req, [msg.spec], msg.tenant, batch=False, task_id=msg.task_id, idem=idem,
                     pin=msg.pin)

    def on_submit_batch(self, identity: bytes, msg: P.SubmitBatch) -> None:
        if self._expired(msg.expires_at):
            return
        self._accept(identity, msg.req, msg.specs, msg.tenant, batch=True)

    def _refusal(self, specs: list[P.TaskSpec], batch: bool) -> tuple[str, str] | None:
        """Why these specs cannot be queued, as (code, message); None when they can."""
        for i, spec in enumerate(specs):
            where = f"tasks[{i}]." if batch else ""
            problem = P.check_bounds(spec, self.s.task_timeout_max_s, self.s.max_prompt_chars, self.s.max_tokens_limit)
            if problem is not None:
                return "invalid_field", f"{where}{problem[0]}: {problem[1]}"
            if spec.model is not None and not self._known_model(spec.model):
                return "model_not_found", (f"{where}model: no instance is configured for {spec.model!r}; "
                                           f"models: {', '.join(self.catalog.models)}")
        if batch and len(specs) > self.s.max_batch:
            return "batch_too_large", f"at most {self.s.max_batch} tasks per batch"
        if len(specs) > (free := self._shared_room() if self.shared else self.table.room()):
            return "queue_full", f"{len(specs)} tasks do not fit: {free} of {self.s.queue_max_size} places free"
        return None

    def _accept(self, identity: bytes, req: int, specs: list[P.TaskSpec], tenant: str, batch: bool,
                task_id: str | None = None, idem: str | None = None, pin: str | None = None) -> None:
        """Queue one task or a whole batch (atomic: all or none); the ack waits for the commit.

        A model that is configured but has no live instance queues (health says so); a
        model no instance is configured for is refused at once."""
        refusal = (("shutting_down", "the appliance is shutting down; retry after it is back")
                   if self.draining else self._refusal(specs, batch))
        if refusal is not None:
            self._reply(identity, P.Refused(req, *refusal))
            return
        now = time.time()
        ids = []
        for spec in specs:
            model = P.service_of(spec, self.catalog.default())
            here = self._hold_here(spec, model, pin)
            self._inserted += not here
            ids.append(self.table.add(P.with_defaults(spec, self.s.task_timeout_max_s, self.s.max_tokens_limit),
                                      model, tenant, now, task_id if not batch else None, idem, pin,
                                      claimed=here).task_id)
        self._reply_after_commit(identity, P.BatchAccepted(req, ids) if batch else P.Accepted(req, ids[0], "queued"))
        self._unacked.append((identity, req, ids))

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
        elif self.shared and rec.state == "running":  # on another box: the text it wrote last
            info.text_so_far, info.tokens_seq = self.table.journal.progress(msg.task_id)
        self._reply(identity, info)

    def on_cancel(self, identity: bytes, msg: P.Cancel) -> None:
        rec = self._visible(msg.task_id, msg.tenant, msg.all_tenants)
        task = self.table.get(msg.task_id)
        if rec is not None and task is None and self.shared and rec.state not in P.FINAL_STATES:
            # held by another box, or by none yet: take it over here, then cancel it as ours
            claimed = self.table.journal.take_over(msg.task_id)
            if claimed is None:
                rec = self.table.lookup(msg.task_id) or rec
            else:
                try:
                    task = self.table.adopt(claimed.seq, claimed.record, claimed.spec, claimed.idem)
                except QueueFull:  # not held in memory: its lease is not renewed, the row returns to the queue
                    self._reply(identity, P.Refused(msg.req, "queue_full", "this box's queue is full; retry"))
                    return
                rec = task.record
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
        ready = sum(1 for w in self.pool if w.slots > 0 and w.model != P.RAG_SERVICE)
        served = self.pool.models()
        self._reply(identity, P.Pong(msg.req, ready, self.table.queued, self.pool.running_total(), self.gpu_state,
                                     [m for m in served if m != P.RAG_SERVICE], self.catalog.models, self.draining,
                                     rag_ready=P.RAG_SERVICE in served))

    def health_now(self) -> tuple[str, str, float]:
        """(state, reason, seconds the oldest queued task has waited): the health rule now."""
        book, table = self.book, self.table
        oldest = table.oldest_queued()
        oldest_s = time.time() - oldest.record.created_at if oldest is not None else 0.0
        state, reason = health(HealthInput(
            queued=table.queued, workers=len(self.pool), since_progress_s=book.since_progress(),
            oldest_queued_s=oldest_s, max_size=self.s.queue_max_size, stall_s=self.s.health_stall_s,
            backlog_wait_s=self.s.health_backlog_wait_s, unserved=self._unserved_models()))
        return state, reason, oldest_s

    def on_stats(self, identity: bytes, msg: P.GetStats) -> None:
        book, table = self.book, self.table
        state, reason, oldest_s = self.health_now()
        p50, p95, p99 = book.dispatch_percentiles()
        self._reply(identity, P.Stats(
            req=msg.req, depth=table.depth(), queued=table.queued, running=self.pool.running_total(),
            max_size=self.s.queue_max_size, workers=self.pool.view(), rag_workers=self.pool.view(rag=True), dispatch_p50_ms=p50, dispatch_p95_ms=p95,
            dispatch_p99_ms=p99, completed_per_min=float(book.per_minute()), finished=dict(book.final_states),
            oldest_queued_s=oldest_s, last_progress_s=book.since_progress(), health=state, health_reason=reason,
            replies_deferred=self.outbox.deferred, replies_undeliverable=self.outbox.undeliverable,
            workers_dropped=self.pool.dropped, depth_by_model=table.depth_by_model(),
            preemptions=book.preemptions, submits_expired=book.submits_expired,
            frames_dropped=dict(book.frames_dropped), journal_errors=table.journal.outage.errors,
            box=self.s.box_name if self.shared else "", boxes=self._boxes, shared_queued=self._backlog))

    def on_gpu(self, identity: bytes, msg: P.GetGpu) -> None:
        states = [P.GpuState(i, g.throttled, g.reason) for i, g in sorted(self.pool.gpus.items())]
        self._reply(identity, P.GpuStatus(msg.req, self.last_telemetry, states, self.pool.view()))

    def _unserved_models(self) -> list[str]:
        """Models with queued tasks and no registered instance."""
        served = set(self.pool.models())
        return sorted(m for m in self.table.waiting_models() if m not in served)
