"""Deadlines of live tasks, earliest first.

A heap of (deadline, seq, task id). A task that ends early leaves its entry behind
(removing it from the middle of a heap costs more than skipping it later); the heap is
rebuilt when such entries outnumber the live tasks, so memory follows the live tasks.
"""
from __future__ import annotations

import heapq
from typing import Iterator


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []

    def add(self, deadline: float, seq: int, task_id: str) -> None:
        heapq.heappush(self._heap, (deadline, seq, task_id))

    def due(self, now: float) -> Iterator[tuple[int, str]]:
        """(seq, task id) of entries whose time has come; the caller checks they are still live."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, task_id = heapq.heappop(heap)
            yield seq, task_id

    def prune(self, live: dict) -> None:
        """Rebuild from the live tasks (id -> task with .deadline, .seq) when stale entries dominate."""
        if len(self._heap) > 4 * len(live) + 1024:
            self._heap = [(t.deadline, t.seq, tid) for tid, t in live.items()]
            heapq.heapify(self._heap)

    def next(self) -> float | None:
        return self._heap[0][0] if self._heap else None
