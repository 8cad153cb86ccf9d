"""Following one task to its end: text as it is generated, then the final record.

Both SSE endpoints (/v1/async/stream, OpenAI `stream: true`) and the OpenAI calls
that wait for a whole answer use this. Events come from the broker's PUB socket;
a subscription takes effect asynchronously, so the follower also asks the broker
(Query) at the start, whenever the token sequence has a gap, and whenever events go
quiet: events make it fast, queries make it certain.

A stream must never end silently: when it cannot go on faithfully it says why, as
("interrupted", TaskError) with a stable code, and ends. `task_restarted`: the task
lost its instance and runs again from the start (the text sent is void; its result
will be whole). `stream_interrupted`: the broker restarted while the task ran and
the text generated meanwhile is not known here (the result will be whole).
`broker_unavailable`: the broker does not answer (the task is journaled and goes on).
`shutting_down`: this API worker is stopping.
"""
from __future__ import annotations

import time
from typing import Iterator

from .. import protocol as P
from ..broker_client import BrokerUnavailable
from .lifecycle import state as lifecycle

QUIET_S = 0.5  # no event for this long: ask the broker directly


def _interrupted(code: str, message: str) -> tuple[str, P.TaskError]:
    return "interrupted", P.TaskError(code, message)


def follow(api, task_id: str, deadline: float, owner, watch=None, text: bool = True) -> Iterator[tuple[str, object]]:
    """Yield ("text", str) pieces, then one ("final", TaskRecord), ("timeout", None) or
    ("interrupted", TaskError); ("idle", None) when nothing happened for QUIET_S.

    `owner` is the caller's tenant scope (base.Owner), sent with every query.
    `watch` may be an already-open Watch (opened before the task was submitted);
    this generator closes it. `text=False`: only the end matters (a caller that waits
    for the whole answer), so a re-run or a gap in the text is no interruption.
    """
    client = api.broker()
    watch = watch or client.watch(task_id)
    sent = 0        # characters of generated text already yielded
    seq = 0         # last Tokens message accounted for
    run = 0         # the attempt whose text is being sent
    try:
        need_query = True
        while True:
            if lifecycle.closing:
                yield _interrupted("shutting_down", "this API worker is shutting down; the task goes on: "
                                   f"GET /v1/async/result/{task_id}")
                return
            if need_query:
                need_query = False
                try:
                    info = client.query(task_id, *owner)
                except BrokerUnavailable:
                    yield _interrupted("broker_unavailable", "the broker does not answer; the task is journaled "
                                       f"and goes on: GET /v1/async/result/{task_id} later")
                    return
                rec = info.task
                if rec.state in P.FINAL_STATES:
                    whole = rec.result.text if rec.result is not None else ""
                    if text and len(whole) > sent:
                        yield "text", whole[sent:]
                    yield "final", rec
                    return
                if not sent:  # the run whose text comes next: this one, or the next dispatch
                    run = rec.attempts if rec.state == "running" else rec.attempts + 1
                elif text and rec.attempts > run:
                    yield _interrupted("task_restarted", f"the task lost its instance and runs again (attempt "
                                       f"{rec.attempts}); its result will be whole: GET /v1/async/result/{task_id}")
                    return
                so_far = info.text_so_far or ""
                if text and len(so_far) < sent:
                    yield _interrupted("stream_interrupted", "the broker restarted while the task ran; its result "
                                       f"will be whole: GET /v1/async/result/{task_id}")
                    return
                if text and len(so_far) > sent:
                    yield "text", so_far[sent:]
                    sent = len(so_far)
                seq = max(seq, info.tokens_seq)
            if time.time() > deadline:
                yield "timeout", None
                return
            event = watch.get(QUIET_S)
            if event is None:
                yield "idle", None  # lets an SSE writer send a keep-alive
                need_query = True
            elif isinstance(event, P.Tokens):
                if not text or event.seq <= seq:
                    continue  # already included in a query's text_so_far
                if event.seq != seq + 1:
                    need_query = True  # a gap: the query fills it
                    continue
                seq = event.seq
                sent += len(event.text)
                yield "text", event.text
            elif isinstance(event, P.Requeued):
                if text and sent:
                    yield _interrupted("task_restarted", f"{event.reason}; the task runs again (attempt "
                                       f"{event.attempts + 1}); its result will be whole: "
                                       f"GET /v1/async/result/{task_id}")
                    return
                seq = 0  # nothing sent yet: follow the new run from its start
                need_query = True
            elif isinstance(event, P.Final):
                rec = event.task
                whole = rec.result.text if rec.result is not None else ""
                if text and len(whole) > sent:
                    yield "text", whole[sent:]
                yield "final", rec
                return
    finally:
        watch.close()
