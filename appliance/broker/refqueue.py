"""Pure-Python reference of the native PriorityQueue (native/pqueue.pyx).

Why it exists: it is the readable statement of the scheduling rules, and property
tests drive it and the native queue with the same random operations and require the
same answers. The broker itself always runs the native one.

The rules:
- levels 0 (most urgent) .. N-1; at most `max_size` queued handles;
- inside a level, tenants with queued work take turns (round robin) and each
  tenant's tasks are FIFO; a tenant that runs out of work (pop or cancel) leaves the
  rotation and rejoins at its back;
- push(..., front=True) requeues at the front of the level (a task that was preempted
  or whose worker was lost): the task goes to the head of its tenant's FIFO and the
  tenant to the head of the level's rotation, served next, the other tenants keeping
  their order behind it; that holds whether or not the tenant had queued work, and of
  several front pushes the latest runs first. `now` (the task's original arrival) is
  its enqueue time for aging, as for any push;
- between levels the lowest effective level wins, effective = level - waited/aging_s
  for the task the level would serve next (ties: the more urgent level);
- pop(now, max_level) with max_level >= 0 only considers levels 0..max_level, by
  declared level and not by aged score, and chooses among them by the rule above
  (-1 when none of them has work); max_level=-1, the default, or max_level >= levels
  means all levels; max_level < -1 raises ValueError.
"""
from __future__ import annotations

from collections import deque
from typing import Hashable


class QueueFull(Exception):
    """The bound on queued tasks is reached; the API answers 429."""


class RefPriorityQueue:
    def __init__(self, levels: int = 5, max_size: int = 1000, aging_s: float = 0.0):
        if levels < 1 or max_size < 1:
            raise ValueError("levels and max_size must be >= 1")
        self.levels = levels
        self.max_size = max_size
        self.aging_s = aging_s
        # per level: tenant -> FIFO of (handle, enqueued at); rotation: next tenant first
        self._fifos: list[dict[Hashable, deque[tuple[int, float]]]] = [{} for _ in range(levels)]
        self._rotation: list[deque[Hashable]] = [deque() for _ in range(levels)]
        self._where: dict[int, tuple[int, Hashable, float]] = {}

    def push(
        self, handle: int, level: int, now: float, tenant: Hashable = "", front: bool = False
    ) -> None:
        if not 0 <= level < self.levels:
            raise ValueError(f"level {level} out of range")
        if len(self._where) >= self.max_size:
            raise QueueFull(self.max_size)
        if handle in self._where:
            raise ValueError(f"handle {handle} already queued")
        fifos, rotation = self._fifos[level], self._rotation[level]
        if front:
            if tenant in fifos:
                rotation.remove(tenant)
            else:
                fifos[tenant] = deque()
            rotation.appendleft(tenant)  # served next; the others keep their order
            fifos[tenant].appendleft((handle, now))
        else:
            if tenant not in fifos:
                fifos[tenant] = deque()
                rotation.append(tenant)
            fifos[tenant].append((handle, now))
        self._where[handle] = (level, tenant, now)

    def _remove(self, level: int, tenant: Hashable, handle: int, now: float) -> None:
        fifo = self._fifos[level][tenant]
        fifo.remove((handle, now))
        del self._where[handle]
        if not fifo:
            del self._fifos[level][tenant]
            self._rotation[level].remove(tenant)

    def pop(self, now: float, max_level: int = -1) -> int:
        if max_level < -1:
            raise ValueError(f"max_level {max_level} out of range")
        top = self.levels if max_level < 0 else min(max_level + 1, self.levels)
        best, best_score = -1, 0.0
        for level in range(top):
            rotation = self._rotation[level]
            if not rotation:
                continue
            waited = now - self._fifos[level][rotation[0]][0][1]
            score = level - waited / self.aging_s if self.aging_s > 0 else level
            if best < 0 or score < best_score:
                best, best_score = level, score
        if best < 0:
            return -1
        rotation = self._rotation[best]
        tenant = rotation[0]
        handle, enq = self._fifos[best][tenant][0]
        rotation.rotate(-1)  # its turn is over: to the back of the line
        self._remove(best, tenant, handle, enq)
        return handle

    def cancel(self, handle: int) -> bool:
        if handle not in self._where:
            return False
        level, tenant, enq = self._where[handle]
        self._remove(level, tenant, handle, enq)
        return True

    def position(self, handle: int) -> int:
        """Tasks that run first if nothing arrives, aging reorders nothing and pops take
        all levels; -1 if absent. Front pushes show in the FIFO and rotation it reads."""
        if handle not in self._where:
            return -1
        level, tenant, _ = self._where[handle]
        n = sum(1 for lv, _, _ in self._where.values() if lv < level)
        k = [h for h, _ in self._fifos[level][tenant]].index(handle)
        n += k
        before = True
        for t in self._rotation[level]:
            if t == tenant:
                before = False
            else:
                n += min(len(self._fifos[level][t]), k + 1 if before else k)
        return n

    def depth(self, level: int) -> int:
        if not 0 <= level < self.levels:
            raise ValueError(f"level {level} out of range")
        return sum(len(f) for f in self._fifos[level].values())

    def __contains__(self, handle: int) -> bool:
        return handle in self._where

    def __len__(self) -> int:
        return len(self._where)
