"""The task table: every live task, recent final records, deadlines, idempotency keys.

No sockets here: the broker loop asks the table and tells workers and clients. The
table keeps three views of the same tasks consistent, which is why they live in one
place: the live map (queued and running tasks, by id), the priority queue (queued
ones, by handle = journal sequence number), and the journal (every state change,
committed in groups by the loop before anything is acknowledged).

Finished tasks leave the live map at once; a bounded cache of their records spares
polling clients a SQLite read, and the journal holds the rest until RESULT_TTL_S (the
result) and RESULT_TOMBSTONE_S (the record) have passed.
"""
from __future__ import annotations

import heapq
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import msgspec

from .. import protocol as P
from ..store.journal import Journal
from ._pqueue import PriorityQueue, QueueFull

# Final records kept in memory, so that polling clients rarely hit SQLite.
FINISHED_CACHE = 10_000


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

    @property
    def task_id(self) -> str:
        return self.record.task_id


class TaskTable:
    def __init__(self, journal: Journal, queue: PriorityQueue, result_ttl_s: float, tombstone_s: float):
        self.journal = journal
        self.queue = queue
        self.result_ttl_s = result_ttl_s
        self.tombstone_s = tombstone_s
        self.live: dict[str, Task] = {}
        self.by_seq: dict[int, Task] = {}                    # queued tasks, by handle
        self.recent: OrderedDict[str, P.TaskRecord] = OrderedDict()  # final records, newest last
        self.idem: dict[str, str] = {}                       # idempotency key -> id, while live
        self._idem_release: list[str] = []                   # forgotten after the next commit
        self._deadlines: list[tuple[float, int, str]] = []   # (deadline, seq, id), pruned lazily
        self._arrivals: list[int] = []                       # queued handles, oldest first; pruned lazily
        self.next_seq = 1

    # ------------------------------------------------------------- recovery
    def recover(self) -> tuple[int, int, list[Task]]:
        """Load the journal's live tasks back in line; running ones are queued again.

        Returns (live tasks, of them were running, tasks refused for lack of room)."""
        self.next_seq = self.journal.max_seq() + 1
        was_running, refused = 0, []
        for seq, rec, spec, idem in self.journal.load_live():
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
    def room(self) -> int:
        return self.queue.max_size - len(self.queue)

    def add(self, spec: P.TaskSpec, tenant: str, now: float, task_id: str | None = None,
            idem: str | None = None) -> Task:
        """Queue a new task and journal it (the caller checked room)."""
        seq = self.next_seq
        self.next_seq += 1
        rec = P.TaskRecord(task_id=task_id or uuid.uuid4().hex, state="queued", type=spec.type,
                           priority=spec.priority, created_at=now, tenant=tenant)
        task = self._track(Task(seq, rec, spec, deadline=now + spec.timeout_s, idem=idem))
        self._enqueue(task, now)
        self.journal.write(seq, rec, spec, idem)
        return task

    def _track(self, task: Task) -> Task:
        self.live[task.task_id] = task
        if task.idem:
            self.idem[task.idem] = task.task_id
        heapq.heappush(self._deadlines, (task.deadline, task.seq, task.task_id))
        return task

    def _enqueue(self, task: Task, now: float) -> None:
        rec = task.record
        self.queue.push(task.seq, P.LEVEL[rec.priority], now, rec.tenant)
        self.by_seq[task.seq] = task
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
        task = self.live.get(task_id)
        if task is not None:
            return task.record
        rec = self.recent.get(task_id) or self.journal.get(task_id)
        if rec is None:
            return None
        now = time.time() if now is None else now
        if rec.finished_at is not None and now - rec.finished_at > self.result_ttl_s:
            if now - rec.finished_at > self.result_ttl_s + self.tombstone_s:
                return None
            rec = msgspec.structs.replace(rec, result=None, result_expired=True)
        return rec

    def position(self, task: Task) -> int:
        return self.queue.position(task.seq)

    def oldest_queued(self) -> Task | None:
        """The queued task that arrived first. By sequence number, so a task requeued
        after a lost worker keeps its place (it used to count as the newest)."""
        heap = self._arrivals
        while heap and heap[0] not in self.by_seq:
            heapq.heappop(heap)
        return self.by_seq[heap[0]] if heap else None

    # ------------------------------------------------------------- transitions
    def next_queued(self, now: float) -> Task | None:
        """Take the queue's next task out of line (not yet running)."""
        while True:
            seq = self.queue.pop(now)
            if seq < 0:
                return None
            task = self.by_seq.pop(seq, None)
            if task is not None:
                return task

    def start(self, task: Task, worker: str, now: float) -> None:
        rec = task.record
        rec.state, rec.started_at, rec.worker = "running", now, worker

    def unqueue(self, task: Task) -> None:
        """Out of line without running (cancelled, expired, claimed by a worker that runs it)."""
        self.queue.cancel(task.seq)
        self.by_seq.pop(task.seq, None)

    def requeue(self, task: Task) -> None:
        """A running task goes back in line at its priority, with its original arrival
        time (aging counts from then). Raises QueueFull."""
        rec = task.record
        task.requeues += 1
        task.text.clear()
        task.tokens_seq = 0
        rec.state, rec.started_at, rec.worker = "queued", None, None
        self._enqueue(task, rec.created_at)
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
        self.recent[rec.task_id] = rec
        if len(self.recent) > FINISHED_CACHE:
            self.recent.popitem(last=False)
        self.journal.write(task.seq, rec)
        return rec

    def past_deadline(self, now: float) -> Iterator[Task]:
        """Live tasks whose deadline has come, earliest first (the caller makes them final)."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, seq, task_id = heapq.heappop(heap)
            task = self.live.get(task_id)
            if task is not None and task.seq == seq:
                yield task
        # Entries of tasks that finished early stay until their deadline; rebuild the
        # heap when they outnumber the live ones, so memory follows the live tasks.
        if len(heap) > 4 * len(self.live) + 1024:
            self._deadlines = [(t.deadline, t.seq, tid) for tid, t in self.live.items()]
            heapq.heapify(self._deadlines)

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    # ------------------------------------------------------------- durability
    def commit(self) -> None:
        """Commit the journal (raises on failure), then forget released idempotency keys."""
        self.journal.commit()
        for idem in self._idem_release:
            self.idem.pop(idem, None)
        self._idem_release.clear()

    def forget(self, task_ids: list[str]) -> None:
        """Undo tasks whose journal commit failed: they were never acknowledged."""
        for task_id in task_ids:
            task = self.live.pop(task_id, None)
            if task is not None:
                self.unqueue(task)
                if task.idem:
                    self.idem.pop(task.idem, None)

    def expire(self, now: float) -> None:
        ttl = self.result_ttl_s
        self.journal.expire(now - ttl, now - ttl - self.tombstone_s)
