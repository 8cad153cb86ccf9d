# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The broker's scheduling core: priority levels, FIFO inside a level, aging, O(1) cancel.

Why this shape: one ring buffer per priority level makes push and pop O(1) and keeps
FIFO order for free. Aging compares only the heads of the levels (the oldest task of
each level is the one that has waited longest there), so choosing the next task costs
O(levels), not O(n). Cancel marks a handle dead; the dead entry is skipped when it
reaches the head of its ring, or squeezed out when its ring fills up.

Handles are int64 numbers that the broker assigns; the queue knows nothing of tasks.
"""
from libc.stdlib cimport malloc, free
from libc.stdint cimport int64_t


class QueueFull(Exception):
    """The bound on queued tasks is reached; the API answers 429."""


cdef struct Ring:
    int64_t* handles
    double* enq
    Py_ssize_t head
    Py_ssize_t count
    Py_ssize_t cap


cdef class PriorityQueue:
    cdef Ring* rings
    cdef int levels
    cdef Py_ssize_t max_size
    cdef Py_ssize_t live
    cdef double aging_s
    cdef set queued          # handles that are queued and not cancelled
    cdef object level_of     # dict handle -> level, for depth bookkeeping on cancel
    cdef Py_ssize_t* depth_live

    def __cinit__(self, int levels=5, Py_ssize_t max_size=1000, double aging_s=0.0):
        if levels < 1 or max_size < 1:
            raise ValueError("levels and max_size must be >= 1")
        self.levels = levels
        self.max_size = max_size
        self.aging_s = aging_s
        self.live = 0
        self.queued = set()
        self.level_of = {}
        self.rings = <Ring*> malloc(levels * sizeof(Ring))
        self.depth_live = <Py_ssize_t*> malloc(levels * sizeof(Py_ssize_t))
        if self.rings == NULL or self.depth_live == NULL:
            raise MemoryError()
        cdef int i
        for i in range(levels):
            self.rings[i].handles = NULL
            self.rings[i].enq = NULL
        for i in range(levels):
            self.depth_live[i] = 0
            self.rings[i].cap = 16
            self.rings[i].head = 0
            self.rings[i].count = 0
            self.rings[i].handles = <int64_t*> malloc(16 * sizeof(int64_t))
            self.rings[i].enq = <double*> malloc(16 * sizeof(double))
            if self.rings[i].handles == NULL or self.rings[i].enq == NULL:
                raise MemoryError()

    def __dealloc__(self):
        cdef int i
        if self.rings != NULL:
            for i in range(self.levels):
                free(self.rings[i].handles)
                free(self.rings[i].enq)
            free(self.rings)
        free(self.depth_live)

    cdef int _grow(self, Ring* r) except -1:
        """Double the ring, dropping dead entries on the way (compaction)."""
        cdef Py_ssize_t newcap = r.cap * 2
        cdef int64_t* nh = <int64_t*> malloc(newcap * sizeof(int64_t))
        cdef double* ne = <double*> malloc(newcap * sizeof(double))
        if nh == NULL or ne == NULL:
            free(nh)
            free(ne)
            raise MemoryError()
        cdef Py_ssize_t i, j = 0, idx
        queued = self.queued
        for i in range(r.count):
            idx = (r.head + i) % r.cap
            if r.handles[idx] in queued:
                nh[j] = r.handles[idx]
                ne[j] = r.enq[idx]
                j += 1
        free(r.handles)
        free(r.enq)
        r.handles = nh
        r.enq = ne
        r.cap = newcap
        r.head = 0
        r.count = j
        return 0

    def push(self, int64_t handle, int level, double now):
        """Queue `handle` at `level` (0 is the most urgent), enqueued at time `now`."""
        if level < 0 or level >= self.levels:
            raise ValueError(f"level {level} out of range")
        if self.live >= self.max_size:
            raise QueueFull(self.max_size)
        if handle in self.queued:
            raise ValueError(f"handle {handle} already queued")
        cdef Ring* r = &self.rings[level]
        if r.count == r.cap:
            self._grow(r)
        cdef Py_ssize_t idx = (r.head + r.count) % r.cap
        r.handles[idx] = handle
        r.enq[idx] = now
        r.count += 1
        self.queued.add(handle)
        self.level_of[handle] = level
        self.depth_live[level] += 1
        self.live += 1

    cdef void _skip_dead(self, Ring* r):
        queued = self.queued
        while r.count > 0 and r.handles[r.head] not in queued:
            r.head = (r.head + 1) % r.cap
            r.count -= 1

    def pop(self, double now):
        """The next handle to run, or -1 when nothing is queued.

        With aging, a task's effective level is its level minus waited/aging_s, so a
        low task that waited long enough overtakes fresher urgent ones; ties go to the
        more urgent level.
        """
        cdef int i, best = -1
        cdef double score, best_score = 0.0
        cdef Ring* r
        for i in range(self.levels):
            r = &self.rings[i]
            self._skip_dead(r)
            if r.count == 0:
                continue
            if self.aging_s > 0.0:
                score = i - (now - r.enq[r.head]) / self.aging_s
            else:
                score = i
            if best < 0 or score < best_score:
                best = i
                best_score = score
        if best < 0:
            return -1
        r = &self.rings[best]
        cdef int64_t h = r.handles[r.head]
        r.head = (r.head + 1) % r.cap
        r.count -= 1
        self.queued.discard(h)
        del self.level_of[h]
        self.depth_live[best] -= 1
        self.live -= 1
        return h

    def cancel(self, int64_t handle):
        """Remove a queued handle in O(1); False when it is not queued."""
        if handle not in self.queued:
            return False
        self.queued.discard(handle)
        level = self.level_of.pop(handle)
        self.depth_live[<int> level] -= 1
        self.live -= 1
        return True

    def depth(self, int level):
        if level < 0 or level >= self.levels:
            raise ValueError(f"level {level} out of range")
        return self.depth_live[level]

    def __contains__(self, int64_t handle):
        return handle in self.queued

    def __len__(self):
        return self.live

    @property
    def max_size(self):
        return self.max_size
