"""The task table: every live task, its queue, deadlines, idempotency keys.

No sockets here: the broker loop asks the table and tells workers and clients. The
table keeps three views of the same tasks consistent, which is why they live in one
place: the live map (queued and running tasks, by id), the priority queue (queued
ones, by handle = journal sequence number), and the journal (every state change,
committed in groups by the loop before anything is acknowledged).

Finished tasks leave the live map at once, for the final records (records.py).
"""
from __future__ import annotations

import heapq
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .. import protocol as P
from ..store.journal import Journal
from ._pqueue import PriorityQueue, QueueFull
from .deadlines import Deadlines
from .records import FinalRecords
from .routing import URGENT

@dataclass(slots=True)
class Task:
    seq: int                                        # arrival number: the queue handle and journal key
    record: P.TaskRecord
    spec: P.TaskSpec
    deadline: float
    requeues: int = 0                               # times it went back in line after a lost worker
    idem: str | None = None                         # tenant + NUL + idempotency key
    text: list[str] = field(default_factory=list)  # generated so far (Tokens)
    tokens_seq: int = 0
    lost_on: set[str] | None = None                 # instances that lost it: it avoids them

    @property
    def task_id(self) -> str:
        return self.record.task_id

    @property
    def level(self) -> int:
        return P.LEVEL[self.record.priority]


class TaskIds:
    """Random 128-bit task ids, as uuid4().hex gives them, at a fifth of its cost: the
    entropy is read from the OS a few thousand ids at a time. Random, not a counter, so
    that an id says nothing about how many tasks other tenants submitted."""

    def __init__(self) -> None:
        self._buf = b""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._buf):
            self._buf, self._at = os.urandom(16 * 4096), 0
        self._at += 16
        return self._buf[self._at - 16:self._at].hex()


class TaskTable:
    """One priority queue per model (a task waits for an instance of its own model),
    one bound (QUEUE_MAX_SIZE) over all of them."""

    def __init__(self, journal: Journal, make_queue: Callable[[], PriorityQueue], max_size: int,
                 result_ttl_s: float, tombstone_s: float):
        self.journal = journal
        self.make_queue = make_queue
        self.queues: dict[str, PriorityQueue] = {}
        self.max_size = max_size
        self.records = FinalRecords(journal, result_ttl_s, tombstone_s)
        self.live: dict[str, Task] = {}
        self.by_seq: dict[int, Task] = {}                    # queued tasks, by handle
        self.urgent: dict[str, dict[int, Task]] = {}         # queued critical/high tasks, per model
        self.idem: dict[str, str] = {}                       # idempotency key -> id, while live
        self._idem_release: list[str] = []                   # forgotten after the next commit
        self.deadlines = Deadlines()
        self._arrivals: list[int] = []                       # queued handles, oldest first; pruned lazily
        self.next_seq = 1
        self.ids = TaskIds()
        # QUEUE_SCOPE=shared: sequence numbers come from the journal (unique over the boxes),
        # and tasks left for any box to claim are kept here only until their commit.
        self.shared = hasattr(journal, "claim")
        self.fresh: dict[str, Task] = {}

    # ------------------------------------------------------------- recovery
    def recover(self, default_model: str) -> tuple[int, int, list[Task]]:
        """Load the journal's live tasks back in line; running ones are queued again
        (until their worker claims them). A record from before models existed gets the
        task's own model or the default.

        Returns (live tasks, of them were running, tasks refused for lack of room)."""
        self.next_seq = self.journal.max_seq() + 1  # a shared journal hands out its own (TaskTable._seq)
        was_running, refused = 0, []
        for seq, rec, spec, idem in self.journal.load_live():
            rec.model = rec.model or spec.model or default_model
            if rec.state == "running":
                rec.state, rec.started_at, rec.worker = "queued", None, None
                was_running += 1
            task = self._track(Task(seq, rec, spec, deadline=rec.created_at + spec.timeout_s, idem=idem))
            try:
                self._enqueue(task, rec.created_at)
            except QueueFull:  # QUEUE_MAX_SIZE was lowered below what the journal holds
                refused.append(task)
        return len(self.live), was_running, refused

    # ------------------------------------------------------------- new tasks
    @property
    def queued(self) -> int:
        return len(self.by_seq)

    def room(self) -> int:
        return self.max_size - self.queued

    def _seq(self) -> int:
        if self.shared:
            return self.journal.next_seq()
        self.next_seq += 1
        return self.next_seq - 1

    def add(self, spec: P.TaskSpec, model: str, tenant: str, now: float, task_id: str | None = None,
            idem: str | None = None, pin: str | None = None, claimed: bool = True) -> Task:
        """Queue a new task for `model` (the default already applied) and journal it (the
        caller checked room). `claimed=False` (shared queue): journaled for any box to
        claim, not queued here."""
        rec = P.TaskRecord(task_id=task_id or self.ids.next(), state="queued", type=spec.type,
                           priority=spec.priority, created_at=now, tenant=tenant, model=model, pin=pin)
        task = Task(self._seq(), rec, spec, deadline=now + spec.timeout_s, idem=idem)
        if not claimed:
            self.fresh[rec.task_id] = task
            if idem:
                self.idem[idem] = rec.task_id
                self._idem_release.append(idem)
            self.journal.write(task.seq, rec, spec, idem, claimed=False)
            return task
        self._track(task)
        self._enqueue(task, now)
        self.journal.write(task.seq, rec, spec, idem)
        return task

    def adopt(self, seq: int, rec: P.TaskRecord, spec: P.TaskSpec, idem: str | None) -> Task | None:
        """A task this box claimed from the shared queue joins its line (None: it holds it already).
        Its record may say running: the box that ran it was lost; it runs again here."""
        if rec.task_id in self.live:
            return None
        if rec.state == "running":
            rec.state, rec.started_at, rec.worker = "queued", None, None
        task = self._track(Task(seq, rec, spec, deadline=rec.created_at + spec.timeout_s, idem=idem))
        self._enqueue(task, rec.created_at)
        return task

    def drop(self, task: Task) -> None:
        """This box no longer holds the task (another box took it over): out of every live
        view, nothing journaled (the row is not this box's to write any more)."""
        self.forget([task.task_id])
        self.journal.forget(task.task_id)

    def _track(self, task: Task) -> Task:
        self.live[task.task_id] = task
        if task.idem:
            self.idem[task.idem] = task.task_id
        self.deadlines.add(task.deadline, task.seq, task.task_id)
        return task

    def _queue(self, model: str) -> PriorityQueue:
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = self.make_queue()
        return queue

    def _enqueue(self, task: Task, now: float, front: bool = False) -> None:
        rec = task.record
        if self.queued >= self.max_size:
            raise QueueFull(self.max_size)
        self._queue(rec.model).push(task.seq, task.level, now, rec.tenant, front=front)
        self.by_seq[task.seq] = task
        if task.level <= URGENT:
            self.urgent.setdefault(rec.model, {})[task.seq] = task
        heapq.heappush(self._arrivals, task.seq)
        if len(self._arrivals) > 2 * len(self.by_seq) + 1024:
            self._arrivals = sorted(self.by_seq)

    # ------------------------------------------------------------- lookups
    def get(self, task_id: str) -> Task | None:
        return self.live.get(task_id)

    def idempotent(self, idem: str) -> str | None:
        return self.idem.get(idem) or self.journal.find_idempotent(idem)

    def lookup(self, task_id: str, now: float | None = None) -> P.TaskRecord | None:
        """A task's record wherever it is: live, recently finished, or in the journal;
        None once its tombstone time has passed. A record past RESULT_TTL_S has no result."""
        task = self.live.get(task_id) or self.fresh.get(task_id)
        return task.record if task is not None else self.records.get(task_id, now)

    def position(self, task: Task) -> int:
        return self._queue(task.record.model).position(task.seq)

    def depth(self) -> dict[str, int]:
        """Queued tasks per priority, over every model."""
        return {name: sum(q.depth(level) for q in self.queues.values()) for name, level in P.LEVEL.items()}

    def depth_by_model(self) -> dict[str, int]:
        return {model: len(q) for model, q in self.queues.items() if len(q)}

    def waiting_models(self) -> list[str]:
        return [model for model, q in self.queues.items() if len(q)]

    def oldest_urgent(self) -> Iterator[tuple[str, float, int]]:
        """(model, arrival of its longest-waiting critical/high task, how many wait) per model."""
        for model, tasks in self.urgent.items():
            if tasks:
                yield model, min(t.record.created_at for t in tasks.values()), len(tasks)

    def oldest_queued(self) -> Task | None:
        """The queued task that arrived first. By sequence number, so a task requeued
        after a lost worker keeps its place (it used to count as the newest)."""
        heap = self._arrivals
        while heap and heap[0] not in self.by_seq:
            heapq.heappop(heap)
        return self.by_seq[heap[0]] if heap else None

    # ------------------------------------------------------------- transitions
    def next_queued(self, model: str, now: float, max_level: int = -1) -> Task | None:
        """Take the next task of `model` out of line (not yet running); with `max_level`,
        only tasks of that priority level or more urgent."""
        queue = self.queues.get(model)
        while queue is not None:
            seq = queue.pop(now, max_level)
            if seq < 0:
                return None
            task = self.by_seq.pop(seq, None)
            if task is not None:
                self._not_urgent(model, seq)
                return task
        return None

    def _not_urgent(self, model: str, seq: int) -> None:
        waiting = self.urgent.get(model)
        if waiting is not None:
            waiting.pop(seq, None)
            if not waiting:  # empty: the loop stops looking at preemption
                del self.urgent[model]

    def put_back(self, task: Task) -> None:
        """Undo next_queued: the task goes back to the head of its level."""
        self._enqueue(task, task.record.created_at, front=True)

    def start(self, task: Task, worker: str, now: float) -> None:
        """Running on `worker`, one more attempt. (A start is not journaled: after a broker
        restart the journal has the task queued, with the attempts before this one, and
        its worker claiming it back counts this one again.)"""
        rec = task.record
        rec.state, rec.started_at, rec.worker = "running", now, worker
        rec.attempts += 1

    def unqueue(self, task: Task) -> None:
        """Out of line without running (cancelled, expired, claimed by a worker that runs it)."""
        self._queue(task.record.model).cancel(task.seq)
        self.by_seq.pop(task.seq, None)
        self._not_urgent(task.record.model, task.seq)

    def requeue(self, task: Task, lost_on: str | None = None) -> None:
        """A running task goes back in line: at the head of its priority level (it waited
        already), with its original arrival time (aging counts from then); it will
        avoid `lost_on`, the instance that lost it. Raises QueueFull."""
        rec = task.record
        task.text.clear()
        task.tokens_seq = 0
        if lost_on is not None:
            task.requeues += 1
            task.lost_on = (task.lost_on or set()) | {lost_on}
        rec.state, rec.started_at, rec.worker = "queued", None, None
        self._enqueue(task, rec.created_at, front=True)
        self.journal.write(task.seq, rec)

    def finish(self, task: Task, state: str, result: P.TaskResult | None = None,
               error: P.TaskError | None = None) -> P.TaskRecord:
        """Make a live task final: journaled, cached, out of every live view."""
        rec = task.record
        if rec.state == "queued":
            self.unqueue(task)
        rec.state, rec.finished_at, rec.result, rec.error = state, time.time(), result, error
        del self.live[rec.task_id]
        if task.idem:  # forgotten here once the journal has it (after this loop's commit)
            self._idem_release.append(task.idem)
        self.records.add(rec)
        self.journal.write(task.seq, rec)
        return rec

    def past_deadline(self, now: float) -> Iterator[Task]:
        """Live tasks whose deadline has come, earliest first (the caller makes them final)."""
        for seq, task_id in self.deadlines.due(now):
            task = self.live.get(task_id)
            if task is not None and task.seq == seq:
                yield task
        self.deadlines.prune(self.live)

    def next_deadline(self) -> float | None:
        return self.deadlines.next()

    # ------------------------------------------------------------- durability
    def commit(self) -> None:
        """Commit the journal (raises on failure), then forget released idempotency keys."""
        self.journal.commit()
        self.fresh.clear()
        for idem in self._idem_release:
            self.idem.pop(idem, None)
        self._idem_release.clear()

    def forget(self, task_ids: list[str]) -> None:
        """Undo tasks whose journal commit failed: they were never acknowledged."""
        for task_id in task_ids:
            if (fresh := self.fresh.pop(task_id, None)) is not None and fresh.idem:
                self.idem.pop(fresh.idem, None)
            task = self.live.pop(task_id, None)
            if task is not None:
                self.unqueue(task)
                if task.idem:
                    self.idem.pop(task.idem, None)

    def expire(self, now: float) -> None:
        self.records.expire(now)
