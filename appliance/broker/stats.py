"""The broker's figures (dispatch latency, final states, progress) and the health rule.

The rule is a pure function of a few numbers, so it is tested without a broker; the
book keeps the numbers it needs as the loop reports events.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

# How many recent dispatches the latency percentiles are computed over.
DISPATCH_WINDOW = 1000


@dataclass(frozen=True, slots=True)
class HealthInput:
    queued: int
    workers: int
    since_progress_s: float
    oldest_queued_s: float
    max_size: int
    stall_s: float
    backlog_wait_s: float
    unserved: tuple[str, ...] | list[str] = ()  # models with queued tasks and no registered instance


def health(h: HealthInput) -> tuple[str, str]:
    """(state, reason): `stalled` when tasks are queued and no instance is registered,
    or nothing was dispatched or finished for HEALTH_STALL_S; `backing_up` when a model
    with queued tasks has no instance registered (the others go on), the queue is at 80 %
    of its bound, or its oldest task waited HEALTH_BACKLOG_WAIT_S; else healthy."""
    if h.queued and not h.workers:
        return "stalled", "tasks are queued and no model instance is registered"
    if h.queued and h.since_progress_s > h.stall_s:
        return "stalled", f"tasks are queued and nothing progressed for {h.since_progress_s:.0f}s"
    if h.unserved:
        return "backing_up", f"tasks wait for models with no instance registered: {', '.join(h.unserved)}"
    if h.queued >= 0.8 * h.max_size:
        return "backing_up", f"queue at {h.queued}/{h.max_size}"
    if h.oldest_queued_s > h.backlog_wait_s:
        return "backing_up", f"oldest queued task waited {h.oldest_queued_s:.0f}s"
    return "healthy", ""


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


class StatsBook:
    def __init__(self) -> None:
        self.dispatch_ms: deque[float] = deque(maxlen=DISPATCH_WINDOW)
        self.final_states: Counter[str] = Counter()  # since the broker started
        self._final_times: deque[float] = deque()     # monotonic times of the last minute's final states
        self.last_progress = time.monotonic()
        self.preemptions = 0
        self.submits_expired = 0
        self.frames_dropped: Counter[str] = Counter()  # per socket: malformed messages dropped

    def dispatched(self, waited_s: float) -> None:
        self.dispatch_ms.append(waited_s * 1000)
        self.last_progress = time.monotonic()

    def finished(self, state: str) -> None:
        now = time.monotonic()
        self.final_states[state] += 1
        self._final_times.append(now)
        self.last_progress = now

    def per_minute(self) -> int:
        horizon = time.monotonic() - 60
        while self._final_times and self._final_times[0] < horizon:
            self._final_times.popleft()
        return len(self._final_times)

    def dispatch_percentiles(self) -> tuple[float, float, float]:
        lat = sorted(self.dispatch_ms)
        return percentile(lat, 50), percentile(lat, 95), percentile(lat, 99)

    def since_progress(self) -> float:
        return time.monotonic() - self.last_progress
