"""The worker pool: who is registered, what each can take, who has gone silent.

No sockets and no tasks here: the pool counts credit and running task ids per worker,
and the broker loop acts on what it says (dispatch, requeue, abort). Credit is what a
worker said it can take; the pool never lets it exceed its free slots.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import protocol as P


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


class WorkerPool:
    def __init__(self, liveness_s: float):
        self.liveness_s = liveness_s
        self.workers: dict[bytes, Worker] = {}
        self.dropped = 0  # for silence (not for leaving or re-registering)

    def __len__(self) -> int:
        return len(self.workers)

    def __iter__(self):
        return iter(self.workers.values())

    def get(self, identity: bytes) -> Worker | None:
        return self.workers.get(identity)

    def register(self, identity: bytes, msg: P.Ready, now: float) -> tuple[Worker, set[str]]:
        """Add a worker (or replace its earlier registration).

        Returns the new worker, already holding the tasks of its earlier registration
        that it says it still runs, and the ids of the earlier registration's tasks it
        no longer runs (lost: the caller requeues them)."""
        new = Worker(identity, msg.worker, msg.model, msg.slots, msg.endpoint, last_seen=now)
        lost: set[str] = set()
        old = self.workers.get(identity)
        if old is not None:
            new.running = old.running & set(msg.running)
            lost = old.running - new.running
        self.workers[identity] = new
        return new, lost

    def remove(self, worker: Worker) -> set[str]:
        """Forget a worker; the ids of the tasks it was running (the caller requeues them)."""
        self.workers.pop(worker.identity, None)
        return set(worker.running)

    def seen(self, worker: Worker, now: float) -> None:
        worker.last_seen = now

    def add_credit(self, worker: Worker, n: int) -> None:
        worker.credit = min(worker.slots - len(worker.running), worker.credit + max(0, n))

    def assign(self, worker: Worker, task_id: str) -> None:
        worker.credit -= 1
        worker.running.add(task_id)

    def release(self, task_id: str) -> Worker | None:
        """The worker that was running `task_id` (now not), or None."""
        for worker in self.workers.values():
            if task_id in worker.running:
                worker.running.discard(task_id)
                return worker
        return None

    def silent(self, now: float) -> list[Worker]:
        """Workers silent past the liveness window (counted as dropped; the caller removes them)."""
        horizon = now - self.liveness_s
        gone = [w for w in self.workers.values() if w.last_seen < horizon]
        self.dropped += len(gone)
        return gone

    def by_free_credit(self) -> list[Worker]:
        """Workers with credit, the most free first: the dispatch order."""
        return sorted((w for w in self.workers.values() if w.credit > 0), key=lambda w: -w.credit)

    def running_total(self) -> int:
        return sum(len(w.running) for w in self.workers.values())

    def models(self) -> list[str]:
        return sorted({w.model for w in self.workers.values()})

    def view(self) -> list[P.WorkerStats]:
        return [P.WorkerStats(w.name, w.model, w.endpoint, w.slots, len(w.running), w.credit)
                for w in self.workers.values()]
