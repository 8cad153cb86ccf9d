"""Tasks the RAG worker hands to the model instances, through the broker like any client.

A rag_answer's generation (and, with RAG_EMBEDDER=llama:MODEL, every embedding) is a
task of its own: the broker queues it by priority and tenant, routes it to an
instance and journals it, so RAG work gets no side door around the scheduler. The
child's idempotency key is made from the parent's task id: when the parent runs a
second time (the RAG worker restarted under it), it finds the child it already
submitted instead of paying for a second generation.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Callable

from .. import protocol as P
from ..broker_client import BrokerClient, BrokerRefused, BrokerUnavailable

POLL_S = 0.5  # a missed event (the SUB socket is lossy under load) is caught by asking this often


class ChildFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def run_child(client: BrokerClient, spec: P.TaskSpec, tenant: str, key: str | None, deadline: float,
              stop: threading.Event, on_text: Callable[[str], None] | None = None) -> P.TaskRecord:
    """Submit `spec` for `tenant` (idempotent by `key`, if any) and wait for its final record.

    Streams the child's text to `on_text` as it comes. `stop` set, or `deadline`
    (wall clock) passed: the child is cancelled and ChildFailed raised. A refusal or an
    unreachable broker is ChildFailed too, with the broker's code."""
    proposed = uuid.uuid4().hex
    watch = client.watch(proposed)
    try:
        try:
            task_id = client.submit(spec, tenant, idempotency_key=key, task_id=proposed).task_id
        except BrokerRefused as exc:
            raise ChildFailed(exc.code, exc.message) from None
        except BrokerUnavailable:
            raise ChildFailed("broker_unavailable", "the broker did not take the model's task") from None
        if task_id != proposed:  # an earlier attempt's child: follow that one
            watch.close()
            watch = client.watch(task_id)
        seq = 0
        next_poll = time.monotonic() + POLL_S
        while True:
            if stop.is_set() or time.time() >= deadline:
                _cancel(client, task_id, tenant)
                raise ChildFailed("cancelled" if stop.is_set() else "timeout", "the model's task was stopped")
            event = watch.get(min(POLL_S, max(0.01, deadline - time.time())))
            if isinstance(event, P.Final):
                return event.task
            if isinstance(event, P.Tokens) and on_text is not None and event.seq > seq:
                seq = event.seq
                on_text(event.text)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_S
                try:
                    info = client.query(task_id, tenant)
                except (BrokerRefused, BrokerUnavailable):
                    continue
                if info.task.state in P.FINAL_STATES:
                    return info.task
    finally:
        watch.close()


def _cancel(client: BrokerClient, task_id: str, tenant: str) -> None:
    try:
        client.cancel(task_id, tenant)
    except (BrokerRefused, BrokerUnavailable):  # already final, or the broker is away: it expires on its own
        pass


def result_of(rec: P.TaskRecord) -> P.TaskResult:
    """The child's result, or ChildFailed with its error."""
    if rec.state == "completed" and rec.result is not None:
        return rec.result
    err = rec.error or P.TaskError(rec.state, f"the model's task ended {rec.state}")
    raise ChildFailed(err.code, err.message)
