"""gunicorn's gevent worker, with a drain before its graceful stop.

gunicorn's own stop closes the listening socket at once: clients then get a refused
connection, which they cannot tell from a crash. This worker first keeps serving in
`draining` mode (new work: 503 shutting_down) for as long as the broker itself is
draining, i.e. while running tasks finish (supervisord stops the broker first; on a
`stop all` both drain together). When the broker is gone or not draining, the worker
closes its streams with an error event and hands over to gunicorn's graceful stop.
"""
from __future__ import annotations

import logging
import time

import gevent
from gunicorn.workers.ggevent import GeventWorker

from ..broker_client import BrokerUnavailable, get_client
from .lifecycle import state

log = logging.getLogger("appliance.api")

PROBE_EVERY_S = 0.25
STREAMS_CLOSE_S = 0.7  # a stream notices `closing` within the follower's QUIET_S (0.5 s)


class DrainingGeventWorker(GeventWorker):
    settings = None  # the appliance's Settings (procs/api.py sets them before the fork)

    def handle_exit(self, sig, frame):
        if state.draining:  # a second SIGTERM: stop now
            self.alive = False
            return
        state.draining = True
        gevent.spawn(self._drain)

    def _broker_draining(self) -> bool:
        try:
            s = self.settings
            client = get_client(s.broker_front, s.broker_timeout_s, s.broker_events)
            return bool(client.ping(timeout_s=0.5).draining)
        except BrokerUnavailable:
            return False  # gone already: nothing left to wait for
        except Exception as exc:  # never let a probe keep the worker alive
            log.warning("drain probe failed: %s", type(exc).__name__)
            return False

    def _drain(self) -> None:
        limit = time.monotonic() + max(1.0, self.cfg.graceful_timeout - 5)
        while self.settings is not None and time.monotonic() < limit and self._broker_draining():
            gevent.sleep(PROBE_EVERY_S)
        state.closing = True
        gevent.sleep(STREAMS_CLOSE_S)
        self.alive = False
