"""Pure-Python reference of the native PriorityQueue (native/pqueue.pyx).

Why it exists: it is the readable statement of the scheduling rules, and property
tests drive it and the native queue with the same random operations and require the
same answers. The broker itself always runs the native one.
"""
from __future__ import annotations

from collections import deque


class QueueFull(Exception):
    """The bound on queued tasks is reached; the API answers 429."""


class RefPriorityQueue:
    def __init__(self, levels: int = 5, max_size: int = 1000, aging_s: float = 0.0):
        if levels < 1 or max_size < 1:
            raise ValueError("levels and max_size must be >= 1")
        self.levels = levels
        self.max_size = max_size
        self.aging_s = aging_s
        self._rings: list[deque[tuple[int, float]]] = [deque() for _ in range(levels)]
        self._level_of: dict[int, int] = {}

    def push(self, handle: int, level: int, now: float) -> None:
        if not 0 <= level < self.levels:
            raise ValueError(f"level {level} out of range")
        if len(self._level_of) >= self.max_size:
            raise QueueFull(self.max_size)
        if handle in self._level_of:
            raise ValueError(f"handle {handle} already queued")
        self._rings[level].append((handle, now))
        self._level_of[handle] = level

    def pop(self, now: float) -> int:
        best, best_score = -1, 0.0
        for level, ring in enumerate(self._rings):
            while ring and ring[0][0] not in self._level_of:
                ring.popleft()
            if not ring:
                continue
            score = level - (now - ring[0][1]) / self.aging_s if self.aging_s > 0 else level
            if best < 0 or score < best_score:
                best, best_score = level, score
        if best < 0:
            return -1
        handle, _ = self._rings[best].popleft()
        del self._level_of[handle]
        return handle

    def cancel(self, handle: int) -> bool:
        return self._level_of.pop(handle, None) is not None

    def depth(self, level: int) -> int:
        if not 0 <= level < self.levels:
            raise ValueError(f"level {level} out of range")
        return sum(1 for lv in self._level_of.values() if lv == level)

    def __contains__(self, handle: int) -> bool:
        return handle in self._level_of

    def __len__(self) -> int:
        return len(self._level_of)
