"""Following one task to its end: text as it is generated, then the final record.

Both SSE endpoints (/v1/async/stream, OpenAI `stream: true`) and the OpenAI calls
that wait for a whole answer use this. Events come from the broker's PUB socket;
a subscription takes effect asynchronously, so the follower also asks the broker
(Query) at the start, whenever the token sequence has a gap, and whenever events go
quiet: events make it fast, queries make it certain.
"""
from __future__ import annotations

import time
from typing import Iterator

from .. import protocol as P

QUIET_S = 0.5  # no event for this long: ask the broker directly


def follow(api, task_id: str, deadline: float, owner, watch=None) -> Iterator[tuple[str, object]]:
    """Yield ("text", str) pieces, then one ("final", TaskRecord) or ("timeout", None).

    `owner` is the caller's tenant scope (base.Owner), sent with every query.
    `watch` may be an already-open Watch (opened before the task was submitted);
    this generator closes it.
    """
    client = api.broker()
    watch = watch or client.watch(task_id)
    sent = 0      # characters of generated text already yielded
    seq = 0       # last Tokens message accounted for
    try:
        need_query = True
        while True:
            if need_query:
                need_query = False
                info = client.query(task_id, *owner)
                rec = info.task
                if rec.state in P.FINAL_STATES:
                    text = rec.result.text if rec.result is not None else ""
                    if len(text) > sent:
                        yield "text", text[sent:]
                    yield "final", rec
                    return
                if info.text_so_far and len(info.text_so_far) > sent:
                    yield "text", info.text_so_far[sent:]
                    sent = len(info.text_so_far)
                seq = max(seq, info.tokens_seq)
            if time.time() > deadline:
                yield "timeout", None
                return
            event = watch.get(QUIET_S)
            if event is None:
                yield "idle", None  # lets an SSE writer send a keep-alive
                need_query = True
            elif isinstance(event, P.Tokens):
                if event.seq <= seq:
                    continue  # already included in a query's text_so_far
                if event.seq != seq + 1:
                    need_query = True  # a gap: the query fills it
                    continue
                seq = event.seq
                sent += len(event.text)
                yield "text", event.text
            elif isinstance(event, P.Final):
                rec = event.task
                text = rec.result.text if rec.result is not None else ""
                if len(text) > sent:
                    yield "text", text[sent:]
                yield "final", rec
                return
    finally:
        watch.close()
