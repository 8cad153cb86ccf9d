"""The worker pool: who is registered, what each serves and can take, who went silent,
and which one a task should go to.

No sockets and no tasks here: the pool counts credit and running tasks per worker,
keeps the GPU states and the conversations' affinity, and asks the routing function
(routing.py) for a choice; the broker loop acts on what it says. Credit is what a
worker said it can take; the pool never lets it exceed its free slots.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .. import protocol as P
from . import metrics, routing
from .routing import URGENT

# Conversations remembered (least recently used forgotten). An entry helps only while its
# instance still holds the prompt (in a slot, or llama.cpp's RAM prompt cache): a few
# dozen prompts per instance. 10,000 is generous, and bounds the broker's memory at
# ~1.7 MiB (100,000 let it grow for most of an hour under a soak's distinct prompts).
AFFINITY_ENTRIES = 10_000
EWMA_WEIGHT = 0.2           # of the newest measurement of an instance's speed


@dataclass(slots=True)
class Worker:
    """A registered worker; it is also what the routing rule reads (routing.Candidate's
    fields), so that dispatch allocates nothing per task."""

    identity: bytes
    name: str
    model: str
    slots: int
    endpoint: str
    reserved: int = 0
    gpu: int = -1
    starts: int = 1
    credit: int = 0
    last_seen: float = 0.0
    tasks: dict[str, int] = field(default_factory=dict)  # running task id -> its priority level
    low_running: int = 0                                  # of those, below `high`
    seconds_per_token: float = 0.0
    stopping: bool = False  # it said Stopping: no credit any more, its tasks may finish
    # Its engine failed a task (llama_unavailable): no new work until it offers credit
    # again (its launcher checked its health) or registers anew (it restarted). Without
    # this, the failed task went straight back to the same dying instance, was lost a
    # second time when the launcher exited, and failed worker_lost (chaos test, here).
    suspect: bool = False

    @property
    def free(self) -> int:
        return self.credit

    @property
    def running(self) -> int:
        return len(self.tasks)

    def add(self, task_id: str, level: int) -> None:
        if task_id not in self.tasks:
            self.tasks[task_id] = level
            self.low_running += level > URGENT

    def remove(self, task_id: str) -> bool:
        """True when it was running here."""
        level = self.tasks.pop(task_id, None)
        if level is None:
            return False
        self.low_running -= level > URGENT
        return True


class WorkerPool:
    def __init__(self, liveness_s: float, slack: int = 1, limits: routing.Limits = routing.Limits()):
        self.liveness_s = liveness_s
        self.slack = slack
        self.limits = limits
        self.workers: dict[bytes, Worker] = {}
        self.gpus: dict[int, routing.Gpu] = {}
        self.affinity: OrderedDict[str, str] = OrderedDict()  # conversation key -> worker name
        self.dropped = 0  # for silence (not for leaving or re-registering)

    def __len__(self) -> int:
        return len(self.workers)

    def __iter__(self):
        return iter(self.workers.values())

    def get(self, identity: bytes) -> Worker | None:
        return self.workers.get(identity)

    # ------------------------------------------------------------ membership
    def register(self, identity: bytes, msg: P.Ready, now: float) -> tuple[Worker, set[str]]:
        """Add a worker (or replace its earlier registration).

        Returns the new worker, already holding the tasks of its earlier registration
        that it says it still runs, and the ids of the earlier registration's tasks it
        no longer runs (lost: the caller requeues them)."""
        new = Worker(identity, msg.worker, msg.model, msg.slots, msg.endpoint, reserved=msg.reserved,
                     gpu=msg.gpu, starts=msg.starts, last_seen=now)
        lost: set[str] = set()
        old = self.workers.get(identity)
        if old is not None:
            still = set(msg.running)
            for task_id, level in old.tasks.items():
                if task_id in still:
                    new.add(task_id, level)
            new.seconds_per_token = old.seconds_per_token
            lost = set(old.tasks) - still
        self.workers[identity] = new
        return new, lost

    def remove(self, worker: Worker) -> set[str]:
        """Forget a worker; the ids of the tasks it was running (the caller requeues them)."""
        self.workers.pop(worker.identity, None)
        return set(worker.tasks)

    def seen(self, worker: Worker, now: float) -> None:
        worker.last_seen = now

    def silent(self, now: float) -> list[Worker]:
        """Workers silent past the liveness window (counted as dropped; the caller removes them)."""
        horizon = now - self.liveness_s
        gone = [w for w in self.workers.values() if w.last_seen < horizon]
        self.dropped += len(gone)
        if gone:
            metrics.WORKERS_DROPPED.inc(len(gone))
        return gone

    # ------------------------------------------------------------ slots
    def add_credit(self, worker: Worker, n: int) -> None:
        worker.suspect = False  # its launcher offers work again: it found its engine healthy
        if not worker.stopping:
            worker.credit = min(worker.slots - worker.running, worker.credit + max(0, n))

    @staticmethod
    def stopping(worker: Worker) -> None:
        """The worker shuts down: it gets nothing new (its running tasks stay its own)."""
        worker.stopping = True
        worker.credit = 0

    def assign(self, worker: Worker, task_id: str, level: int) -> None:
        worker.credit -= 1
        worker.add(task_id, level)

    def release(self, task_id: str) -> Worker | None:
        """The worker that was running `task_id` (now not), or None."""
        for worker in self.workers.values():
            if worker.remove(task_id):
                return worker
        return None

    def measured(self, worker: Worker, timings: P.Timings | None) -> None:
        """Fold a finished generation's speed into the worker's EWMA (llama.cpp's own timings)."""
        if timings is None or timings.predicted_n <= 0 or timings.predicted_ms <= 0:
            return
        sample = timings.predicted_ms / 1000 / timings.predicted_n
        old = worker.seconds_per_token
        worker.seconds_per_token = sample if old <= 0 else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * sample

    # ------------------------------------------------------------ routing
    def serving(self, model: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.model == model]

    def can_take(self, workers: list[Worker]) -> tuple[bool, bool]:
        """(one of these may take work below high, one may take critical/high)."""
        low = urgent = False
        for w in workers:
            urgent = urgent or routing.eligible(w, True, self.gpus)
            low = low or routing.eligible(w, False, self.gpus)
        return low, urgent

    def choose(self, workers: list[Worker], level: int, key: str | None,
               avoid: frozenset[str] = frozenset()) -> Worker | None:
        """The worker (of those serving the task's model) for a task at priority `level`,
        by the routing rule; the conversation `key`, if any, now belongs to the one chosen."""
        affinity = self.affinity.get(key) if key is not None else None
        pick = routing.choose(workers, level <= URGENT, self.gpus, affinity, avoid, self.slack)
        if pick is not None and key is not None:
            self.affinity[key] = pick.name
            self.affinity.move_to_end(key)
            if len(self.affinity) > AFFINITY_ENTRIES:
                self.affinity.popitem(last=False)
        return pick

    def telemetry(self, t: P.Telemetry) -> None:
        """New GPU readings: throttle states (with hysteresis) and memory headroom."""
        self.gpus = {g.index: routing.gpu_state(self.gpus.get(g.index, routing.Gpu()), g, self.limits)
                     for g in t.gpus}

    # ------------------------------------------------------------ views
    def running_total(self) -> int:
        return sum(w.running for w in self.workers.values())

    def models(self) -> list[str]:
        """The services served: model ids, and the RAG service when its worker is up."""
        return sorted({w.model for w in self.workers.values()})

    def view(self, rag: bool = False) -> list[P.WorkerStats]:
        """The model instances (or, with `rag`, the RAG workers): operators read them apart."""
        view = []
        for w in self.workers.values():
            if (w.model == P.RAG_SERVICE) != rag:
                continue
            gpu = self.gpus.get(w.gpu, routing.Gpu()) if w.gpu >= 0 else routing.Gpu()
            view.append(P.WorkerStats(w.name, w.model, w.endpoint, w.slots, w.running, w.credit, w.reserved, w.gpu,
                                      w.starts, gpu.throttled, w.seconds_per_token, w.stopping, gpu.reason))
        return view
