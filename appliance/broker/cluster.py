"""The broker's side of the shared queue (QUEUE_SCOPE=shared; README "Several boxes").

A mixin of the Broker (server.py). The broker stays the hot path for its own
instances: it holds (claims) only as many tasks as its instances can start now, so
the rest of the work stays in PostgreSQL for whichever box frees a slot first. The
SQL is in store/shared_queue.py; here is when the broker uses it:
- a submit is held here at once when this box has room for its model and no other
  work of that model waits (a box on its own then costs no extra round trip);
  otherwise it is journaled unclaimed and announced (NOTIFY appliance_queue);
- claims run when a notification says work waits for a model this box serves, and
  every CLAIM_POLL_S while it has room (a lost notification costs latency only);
- every LEASE_S/3 the box renews its leases, publishes the models it serves, ends
  the leases of boxes that stopped renewing, and lets go of tasks it no longer holds
  (another box cancelled them, or its lease ran out while it was cut off): those are
  aborted on its instances and never written again (the writes are fenced by box);
- a task whose instance was lost goes back to the shared queue when no instance of
  its model is left on this box (else it waits in this box's line, avoiding the lost
  instance); "lost twice, then failed" counts its runs on every box;
- tasks of the RAG service and pinned tasks stay on the box that accepted them: each
  box has its own document index and its own instances. A box claims back its own RAG
  tasks that its lease let go (it was down longer than LEASE_S), never another's.
"""
from __future__ import annotations

import logging
import time

import zmq

from .. import protocol as P
from ..logs import exception_summary
from ..store.journal import Outage
from . import metrics
from ._pqueue import QueueFull
from .routing import URGENT, claim_room

log = logging.getLogger("appliance.broker")

CLAIM_POLL_S = 2.0      # claim without a notification this often, while there is room
RETRY_S = 1.0           # after a failed claim or renewal, the shared queue is left alone this long
PARTIAL_EVERY_S = 0.5   # text generated so far goes to the shared row this often (streams on other boxes)
LOWEST = len(P.PRIORITIES) - 1


class ClusterSide:
    def _cluster_setup(self) -> None:
        self.shared = self.table.shared
        self._wake: set[str] = set()          # models some box announced work for
        self._next_poll = self._next_tick = self._next_partial = self._retry_listen = 0.0
        self._backlog = self._inserted = 0    # unclaimed tasks at the last tick, journaled since
        self._cluster_models: set[str] = set()
        self._boxes: list[str] = []
        self._listen_fd: int | None = None
        self._partial_seq: dict[str, int] = {}
        # Failed claims, renewals, listens: their own episodes, apart from the journal's
        # (whose end means "submits are accepted again"), told once per cause.
        self.cluster_outage = Outage()
        self._retry_at = 0.0

    def _cluster_failed(self, exc: OSError, what: str, message: str) -> None:
        self._retry_at = time.monotonic() + RETRY_S
        if (news := self.cluster_outage.failed(exc, what=what)) is not None:
            log.error(message, news)

    def _cluster_ok(self) -> None:
        if (ended := self.cluster_outage.ended()) is not None:
            log.warning("shared queue: PostgreSQL answers again after %.1fs", ended[1])

    def _cluster_paused(self) -> bool:
        return time.monotonic() < self._retry_at

    # ------------------------------------------------------------- submits
    def _hold_here(self, spec: P.TaskSpec, model: str, pin: str | None) -> bool:
        """Whether a new task is held by this box at once (see the module's docstring)."""
        if not self.shared or pin is not None or model == P.RAG_SERVICE:
            return True
        if model in self._wake:
            return False
        low, urgent = self._room(model)
        return low > 0 or (urgent > 0 and P.LEVEL[spec.priority] <= URGENT)

    def _room(self, model: str) -> tuple[int, int]:
        """routing.claim_room for `model` on this box, less the tasks of it held here already."""
        queue = self.table.queues.get(model)
        return claim_room(self.pool.serving(model), self.pool.gpus, len(queue) if queue is not None else 0)

    def _shared_room(self) -> int:
        return self.s.queue_max_size - self._backlog - self._inserted - self.table.queued

    def _known_model(self, model: str) -> bool:
        return model in self.catalog.models or (self.shared and model in self._cluster_models)

    # ------------------------------------------------------------- the loop's steps
    def _cluster_listen(self, poller: zmq.Poller) -> None:
        """(Re)open the listening connection when it is down; its socket joins the poller."""
        if not self.shared or self.table.journal.listener is not None or time.monotonic() < self._retry_listen:
            return
        if self._listen_fd is not None:
            poller.unregister(self._listen_fd)
            self._listen_fd = None
        try:
            self._listen_fd = self.table.journal.listen()
        except OSError as exc:
            self._retry_listen = time.monotonic() + RETRY_S
            self._cluster_failed(exc, "listen", "shared queue: cannot listen for notifications (%s); claiming "
                                 f"every {CLAIM_POLL_S:g}s meanwhile")
            return
        poller.register(self._listen_fd, zmq.POLLIN)
        self._wake.update(self.pool.models())  # what was announced while deaf: look once

    def _cluster_notices(self) -> None:
        try:
            notices = self.table.journal.notifications()
        except OSError:
            return  # the listener is closed; _cluster_listen opens it again
        for channel, payload in notices:
            what, _, arg = payload.partition(" ")
            if channel == "appliance_queue":
                self._wake.add(what)
            elif what == "cancel":
                self._let_go(arg, "cancelled through another box")
            elif what == "final":
                self._remote_final(arg)

    def _remote_final(self, task_id: str) -> None:
        """A task accepted here ended on another box: followers here hear it now."""
        try:
            rec = self.table.journal.get(task_id)
        except OSError:
            return  # followers ask again within a second
        if rec is not None and rec.state in P.FINAL_STATES:
            self.events.send_multipart([task_id.encode(), P.encode(P.Final(rec))])

    def _let_go(self, task_id: str, why: str) -> None:
        task = self.table.get(task_id)
        if task is None:
            return
        if task.record.state == "running":
            self._abort_running(task, "cancelled")
        self.table.drop(task)
        self._partial_seq.pop(task_id, None)
        log.info("task %s: no longer held by this box (%s)", task_id, why)
        self._requeued(task, why)

    def _hand_back_if_stranded(self, task) -> None:
        """A requeued task whose model has no instance left on this box goes back to the
        shared queue, where a box that has one claims it, rather than waiting here for
        this box's instance to restart (a real model takes a while to load)."""
        rec = task.record
        if not self.shared or rec.pin is not None or rec.model == P.RAG_SERVICE or self.pool.serving(rec.model):
            return
        self.table.drop(task)  # the requeue's buffered write gives way to the hand-back
        self.table.journal.hand_back(rec)
        log.info("task %s handed back to the shared queue: no instance of %s left on this box", rec.task_id,
                 rec.model)

    def _cluster_claim(self) -> None:
        if not self.shared or self.draining or self._cluster_paused():
            return
        now = time.monotonic()
        poll = now >= self._next_poll
        if poll:
            self._next_poll = now + CLAIM_POLL_S
        journal = self.table.journal
        for model in self.pool.models():
            if not (poll or model in self._wake):
                continue
            own = model == P.RAG_SERVICE  # only its own: back after this box restarted past its leases
            low, urgent = self._room(model)
            if not low and not urgent:
                continue
            try:
                got = journal.claim(model, low, LOWEST, own) if low else []
                if low and len(got) < low:
                    self._wake.discard(model)  # nothing more waits (or another box was quicker)
                if urgent:  # reserved slots: urgent work only (normal work may still wait: the hint stays)
                    got += journal.claim(model, urgent, URGENT, own)
            except OSError as exc:
                self._cluster_failed(exc, "claim", "shared queue: claiming failed (%s); retrying")
                return
            self._cluster_ok()
            self._adopt(got)

    def _adopt(self, claimed) -> None:
        for c in claimed:
            try:
                task = self.table.adopt(c.seq, c.record, c.spec, c.idem)
            except QueueFull:  # QUEUE_MAX_SIZE here is smaller than what this box was given: its lease ends it
                log.warning("task %s claimed but the local queue is full; its lease will return it", c.record.task_id)
                continue
            metrics.CLAIMED.inc()
            if task is not None and task.record.pin is not None and c.origin != self.s.box_name:
                # pinned to an instance of the box that accepted it, which let it go (it was down)
                self._finish(task, "failed", error=P.TaskError(
                    "worker_lost", f"pinned to instance {task.record.pin} of box {c.origin}, which lost it"))

    def _cluster_tick(self) -> None:
        """Leases, membership, expired boxes, overdue tasks, text so far (see the module's docstring)."""
        if not self.shared:
            return
        now = time.monotonic()
        journal = self.table.journal
        if now >= self._next_partial:
            self._next_partial = now + PARTIAL_EVERY_S
            self._write_partials()
        if now < self._next_tick or journal.pending or self._cluster_paused():
            return
        self._next_tick = now + self.s.lease_s / 3
        served = [m for m in self.pool.models() if m != P.RAG_SERVICE]
        try:
            tick = journal.tick(served, list(self.table.live))
            overdue = journal.claim_overdue(time.time())
        except OSError as exc:
            self._cluster_failed(exc, "lease", "shared queue: renewing leases failed (%s); this box's tasks "
                                 f"return to the queue if that lasts {self.s.lease_s:g}s")
            return
        self._cluster_ok()
        self._backlog, self._inserted = tick.backlog, 0
        self._cluster_models, self._boxes = tick.models, sorted(tick.boxes)
        for box, n in tick.expired.items():
            metrics.LEASES_EXPIRED.inc(n)
            log.warning("shared queue: box %s stopped renewing its leases; its %d tasks return to the queue", box, n)
        for task_id in [t for t in self.table.live if t not in tick.held]:
            self._let_go(task_id, "its lease ran out")
        self._adopt(overdue)

    def _write_partials(self) -> None:
        sent = self._partial_seq
        for task_id in list(sent):
            if task_id not in self.table.live:
                del sent[task_id]
        for task in self.table.live.values():
            if task.record.state == "running" and task.tokens_seq > sent.get(task.task_id, 0):
                self.table.journal.write_partial(task.task_id, "".join(task.text), task.tokens_seq)
                sent[task.task_id] = task.tokens_seq

    def _cluster_release(self) -> None:
        if not self.shared:
            return
        try:
            n = self.table.journal.release()
        except OSError as exc:
            log.error("shared queue: could not hand back queued tasks at stop (%s); their lease returns them",
                      exception_summary(exc))
            return
        if n:
            log.info("shared queue: %d queued tasks handed back for the other boxes", n)
