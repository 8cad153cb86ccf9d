"""The broker's Prometheus metrics (README "Metrics", docs/METRICS.md).

Counters and histograms are recorded where their event happens (a dispatch, a final
state, a commit, a dropped frame...); gauges are set from the loop at most every REFRESH_S, from the same
state that GET /v1/async/stats reads, so a scrape costs the loop nothing. Gauges are
`livesum`: a broker that died (or was restarted) leaves none of its values behind.
Labels are bounded sets fixed by the code or the instances file: priorities, models,
states, error codes (unknown ones count as `other`), socket names.
"""
from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from .. import protocol as P
from .stalls import PHASES

REFRESH_S = 1.0
HEALTH_STATES = ("healthy", "backing_up", "stalled")
WORKER_STATES = ("ready", "throttled", "stopping")
# Every error code a task can end with (README "HTTP API"); a worker's Done could say
# anything, so another code is counted as `other`, never as a new label value.
ERROR_CODES = frozenset({"timeout", "deadline", "worker_lost", "context_exceeded", "llama_rejected",
                         "llama_unavailable", "llama_bad_response", "extract_invalid", "invalid_schema",
                         "cancelled", "preempted", "queue_full", "worker_error"})
_LATENCY = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
            30, 60, 300)
_COMMIT = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

UP = Gauge("appliance_broker_up", "1 while the broker runs", multiprocess_mode="livesum")
DRAINING = Gauge("appliance_broker_draining", "1 while the broker drains for a stop", multiprocess_mode="livesum")
QUEUE_DEPTH = Gauge("appliance_broker_queue_depth", "Queued tasks by priority and model", ["priority", "model"],
                    multiprocess_mode="livesum")
RUNNING = Gauge("appliance_broker_running_tasks", "Tasks running on the instances", multiprocess_mode="livesum")
OLDEST = Gauge("appliance_broker_oldest_queued_seconds", "How long the oldest queued task has waited (0: none)",
               multiprocess_mode="livesum")
WORKERS = Gauge("appliance_broker_workers", "Registered instances by state (ready, throttled: its GPU is, "
                "stopping)", ["state"], multiprocess_mode="livesum")
SLOTS = Gauge("appliance_broker_worker_slots", "Slots of the registered instances", multiprocess_mode="livesum")
CREDIT = Gauge("appliance_broker_worker_credit", "Free slots the instances offered (credit) and the broker has "
               "not used", multiprocess_mode="livesum")
HEALTH = Gauge("appliance_broker_health_state", "The health rule's state, one-hot (GET /v1/async/health)",
               ["state"], multiprocess_mode="livesum")
DISPATCH = Histogram("appliance_broker_dispatch_latency_seconds", "Queued to dispatched, per task", buckets=_LATENCY)
ACCEPTED = Counter("appliance_broker_tasks_accepted_total", "Tasks journaled and acknowledged")
FINISHED = Counter("appliance_broker_tasks_finished_total", "Tasks that reached a final state, by state and "
                   "error code (none: completed)", ["state", "error_code"])
COMMIT = Histogram("appliance_broker_journal_commit_seconds", "Journal group commits that wrote something",
                   buckets=_COMMIT)
JOURNAL_ERRORS = Counter("appliance_broker_journal_errors_total", "Failed journal writes (commit or expiry)")
PREEMPTIONS = Counter("appliance_broker_preemptions_total", "Running tasks stopped to free a slot for critical work")
REPLIES_DEFERRED = Counter("appliance_broker_replies_deferred_total", "Replies that waited for a slow client")
REPLIES_UNDELIVERABLE = Counter("appliance_broker_replies_undeliverable_total", "Replies whose client was gone")
FRAMES_DROPPED = Counter("appliance_broker_frames_dropped_total", "Malformed messages dropped, by socket",
                         ["socket"])
SUBMITS_EXPIRED = Counter("appliance_broker_submits_expired_total", "Submits read after their caller gave up")
LOOP_STALLS = Counter("appliance_broker_loop_stalls_total", "Broker loop iterations (or wake-ups) of 0.25 s or more, "
                      "by where the time went (a phase of the loop, or 'not scheduled')", ["phase"])
for _phase in PHASES:  # every series from the start at 0: increase() then sees the first stall
    LOOP_STALLS.labels(_phase)
WORKERS_DROPPED = Counter("appliance_broker_workers_dropped_total", "Instances dropped for silence")


def finished(state: str, error: P.TaskError | None) -> None:
    code = "none" if error is None else error.code if error.code in ERROR_CODES else "other"
    FINISHED.labels(state, code).inc()


class Sync:
    """Sets the gauges from the loop, at most every REFRESH_S. Also turns the journal's
    count of failed writes into counter increments: the store counts them itself
    (commits and expiry alike) and knows nothing of Prometheus."""

    def __init__(self) -> None:
        self._next = 0.0
        self._journal_errors = 0

    def __call__(self, broker) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + REFRESH_S
        b = broker
        errors = b.table.journal.outage.errors
        if errors > self._journal_errors:
            JOURNAL_ERRORS.inc(errors - self._journal_errors)
        self._journal_errors = errors
        UP.set(1)
        DRAINING.set(1 if b.draining else 0)
        queues = b.table.queues
        for model in set(queues) | set(b.catalog.models):
            q = queues.get(model)
            for name, level in P.LEVEL.items():
                QUEUE_DEPTH.labels(name, model).set(q.depth(level) if q is not None else 0)
        RUNNING.set(b.pool.running_total())
        states = dict.fromkeys(WORKER_STATES, 0)
        slots = credit = 0
        for w in b.pool:
            if w.model == P.RAG_SERVICE:  # model instances only: the RAG worker has its appliance_instance_* series
                continue
            gpu = b.pool.gpus.get(w.gpu) if w.gpu >= 0 else None
            states["stopping" if w.stopping else "throttled" if gpu is not None and gpu.throttled else "ready"] += 1
            slots += w.slots
            credit += w.credit
        for state, n in states.items():
            WORKERS.labels(state).set(n)
        SLOTS.set(slots)
        CREDIT.set(credit)
        health, _, oldest_s = b.health_now()
        for state in HEALTH_STATES:
            HEALTH.labels(state).set(1 if state == health else 0)
        OLDEST.set(oldest_s)
CLAIMED = Counter("appliance_broker_tasks_claimed_total", "Tasks this box took from the shared queue "
                  "(QUEUE_SCOPE=shared)")
LEASES_EXPIRED = Counter("appliance_broker_leases_expired_total", "Tasks returned to the shared queue because "
                         "the box holding them stopped renewing its lease (seen by this box's sweep)")
