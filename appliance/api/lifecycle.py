"""The API worker's own stop: serving, then draining, then closing.

A stop (SIGTERM to gunicorn) must not look like a crash to clients: while the
appliance drains, new work is answered 503 `shutting_down` with Retry-After (a
client or load balancer retries, and reaches the appliance once it is back), reads
and cancels still work, and an open stream ends with an error event rather than a
cut connection. appliance/api/gworker.py moves the flags; resources and the
stream follower read them.
"""
from __future__ import annotations


class Lifecycle:
    draining = False  # a stop was asked: new work gets 503 shutting_down; /readyz says not ready
    closing = False   # the worker exits next: open streams end now with an error event


state = Lifecycle()
