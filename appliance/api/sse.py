"""Server-sent events: the framing, and a Falcon response that streams them."""
from __future__ import annotations

from typing import Iterable

import falcon
import msgspec


def sse_event(data, event: str | None = None) -> bytes:
    payload = data if isinstance(data, (bytes, str)) else msgspec.json.encode(data)
    if isinstance(payload, str):
        payload = payload.encode()
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + b"\n\n"


KEEPALIVE = b": keep-alive\n\n"


def sse_response(resp: falcon.Response, events: Iterable[bytes]) -> None:
    resp.status = falcon.HTTP_200
    resp.content_type = "text/event-stream"
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")  # nginx: pass each event through at once
    resp.stream = iter(events)
