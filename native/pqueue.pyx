# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The broker's scheduling core: priority levels, fair share between tenants, aging,
O(1) cancel, a bound on size.

Rules (the pure-Python reference, appliance/broker/refqueue.py, states the same ones
and property tests compare the two):
- levels 0 (most urgent) .. N-1; at most `max_size` queued handles;
- inside a level, the tenants with queued work take turns (round robin), and each
  tenant's own tasks are FIFO, so one tenant's flood cannot starve another tenant of
  the same priority; a tenant that runs out of work leaves the rotation and rejoins
  at its back;
- a push with front=True (a task requeued after preemption or a lost worker) puts the
  task at the head of its tenant's FIFO, and that tenant at the head of its level's
  rotation (served next; the other tenants keep their order behind it), whether or
  not the tenant had queued work; of several front pushes the latest runs first.
  Its `now` (the task's original arrival) is its enqueue time for aging as usual;
- between levels the lowest effective level wins, effective = level - waited/aging_s
  for the task the level would serve next (ties go to the more urgent level);
- pop(now, max_level) with max_level >= 0 considers only levels 0..max_level (the
  declared level, not the aged score) and picks among them by the rule above;
  max_level=-1 means all levels, as does max_level >= levels; below -1 is refused.

Memory layout, all C arrays: an entry pool (one slot per queued handle, linked
doubly within its tenant's FIFO), a pool of tenant queues (linked in a circle per
level: the rotation), and an open-addressing hash from handle to slot. Push, pop and
cancel touch a constant number of slots; pop compares the heads of the levels only.
Python objects are touched only on push, to map a new (level, tenant) to its queue.
"""
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc


class QueueFull(Exception):
    """The bound on queued tasks is reached; the API answers 429."""


cdef enum:
    NIL = -1


cdef inline Py_ssize_t _pow2_at_least(Py_ssize_t n):
    cdef Py_ssize_t c = 16
    while c < n:
        c <<= 1
    return c


cdef class PriorityQueue:
    # entry pool
    cdef int64_t* e_handle
    cdef double* e_enq
    cdef int* e_next
    cdef int* e_prev
    cdef int* e_tq
    cdef int e_free
    # tenant-queue pool: one FIFO per (level, tenant), linked in a circle per level
    cdef int* q_head
    cdef int* q_tail
    cdef int* q_count
    cdef int* q_rnext
    cdef int* q_rprev
    cdef int* q_level
    cdef int q_len, q_cap
    cdef dict q_index           # (level, tenant) -> tenant-queue index
    # per level
    cdef int* l_rot             # tenant queue served next, or NIL
    cdef Py_ssize_t* l_live
    # handle -> slot hash (linear probing, backward-shift delete)
    cdef int64_t* h_key
    cdef int* h_val
    cdef Py_ssize_t h_mask
    cdef int h_shift

    cdef int levels
    cdef Py_ssize_t max_size_
    cdef Py_ssize_t live
    cdef double aging_s

    def __cinit__(self, int levels=5, Py_ssize_t max_size=1000, double aging_s=0.0):
        if levels < 1 or max_size < 1:
            raise ValueError("levels and max_size must be >= 1")
        if max_size > 1 << 30:
            raise ValueError("max_size too large")
        self.levels = levels
        self.max_size_ = max_size
        self.aging_s = aging_s
        self.live = 0
        cdef Py_ssize_t i, hcap = _pow2_at_least(2 * max_size)
        self.e_handle = <int64_t*> malloc(max_size * sizeof(int64_t))
        self.e_enq = <double*> malloc(max_size * sizeof(double))
        self.e_next = <int*> malloc(max_size * sizeof(int))
        self.e_prev = <int*> malloc(max_size * sizeof(int))
        self.e_tq = <int*> malloc(max_size * sizeof(int))
        self.h_key = <int64_t*> malloc(hcap * sizeof(int64_t))
        self.h_val = <int*> malloc(hcap * sizeof(int))
        self.l_rot = <int*> malloc(levels * sizeof(int))
        self.l_live = <Py_ssize_t*> malloc(levels * sizeof(Py_ssize_t))
        self.q_cap = 16
        self.q_len = 0
        self.q_head = <int*> malloc(self.q_cap * sizeof(int))
        self.q_tail = <int*> malloc(self.q_cap * sizeof(int))
        self.q_count = <int*> malloc(self.q_cap * sizeof(int))
        self.q_rnext = <int*> malloc(self.q_cap * sizeof(int))
        self.q_rprev = <int*> malloc(self.q_cap * sizeof(int))
        self.q_level = <int*> malloc(self.q_cap * sizeof(int))
        if (self.e_handle == NULL or self.e_enq == NULL or self.e_next == NULL or self.e_prev == NULL
                or self.e_tq == NULL or self.h_key == NULL or self.h_val == NULL or self.l_rot == NULL
                or self.l_live == NULL or self.q_head == NULL or self.q_tail == NULL or self.q_count == NULL
                or self.q_rnext == NULL or self.q_rprev == NULL or self.q_level == NULL):
            raise MemoryError()
        for i in range(max_size):
            self.e_next[i] = i + 1 if i + 1 < max_size else NIL
        self.e_free = 0
        for i in range(hcap):
            self.h_val[i] = NIL
        self.h_mask = hcap - 1
        self.h_shift = 64
        while (<Py_ssize_t> 1 << (64 - self.h_shift)) < hcap:
            self.h_shift -= 1
        for i in range(levels):
            self.l_rot[i] = NIL
            self.l_live[i] = 0
        self.q_index = {}

    def __dealloc__(self):
        free(self.e_handle); free(self.e_enq); free(self.e_next); free(self.e_prev); free(self.e_tq)
        free(self.h_key); free(self.h_val); free(self.l_rot); free(self.l_live)
        free(self.q_head); free(self.q_tail); free(self.q_count); free(self.q_rnext); free(self.q_rprev)
        free(self.q_level)

    # ------------------------------------------------------------ hash: handle -> slot
    cdef inline Py_ssize_t _h_home(self, int64_t key):
        return <Py_ssize_t> ((<uint64_t> key * <uint64_t> 0x9E3779B97F4A7C15ULL) >> self.h_shift) & self.h_mask

    cdef int _h_find(self, int64_t key):
        cdef Py_ssize_t i = self._h_home(key)
        while self.h_val[i] != NIL:
            if self.h_key[i] == key:
                return <int> i
            i = (i + 1) & self.h_mask
        return NIL

    cdef void _h_put(self, int64_t key, int val):
        cdef Py_ssize_t i = self._h_home(key)
        while self.h_val[i] != NIL:
            i = (i + 1) & self.h_mask
        self.h_key[i] = key
        self.h_val[i] = val

    cdef void _h_del(self, Py_ssize_t i):
        """Backward-shift deletion keeps probe chains intact without tombstones."""
        cdef Py_ssize_t j = i, home
        while True:
            self.h_val[i] = NIL
            while True:
                j = (j + 1) & self.h_mask
                if self.h_val[j] == NIL:
                    return
                home = self._h_home(self.h_key[j])
                # move j back to i unless its home lies cyclically in (i, j]
                if (i <= j and (home <= i or home > j)) or (i > j and (home <= i and home > j)):
                    break
            self.h_key[i] = self.h_key[j]
            self.h_val[i] = self.h_val[j]
            i = j

    # ------------------------------------------------------------ tenant queues
    cdef int _new_tq(self, int level) except -2:
        cdef int q = self.q_len
        cdef int cap
        if q == self.q_cap:
            cap = self.q_cap * 2
            self.q_head = <int*> realloc(self.q_head, cap * sizeof(int))
            self.q_tail = <int*> realloc(self.q_tail, cap * sizeof(int))
            self.q_count = <int*> realloc(self.q_count, cap * sizeof(int))
            self.q_rnext = <int*> realloc(self.q_rnext, cap * sizeof(int))
            self.q_rprev = <int*> realloc(self.q_rprev, cap * sizeof(int))
            self.q_level = <int*> realloc(self.q_level, cap * sizeof(int))
            if (self.q_head == NULL or self.q_tail == NULL or self.q_count == NULL or self.q_rnext == NULL
                    or self.q_rprev == NULL or self.q_level == NULL):
                raise MemoryError()
            self.q_cap = cap
        self.q_len += 1
        self.q_head[q] = self.q_tail[q] = NIL
        self.q_count[q] = 0
        self.q_rnext[q] = self.q_rprev[q] = NIL
        self.q_level[q] = level
        return q

    cdef void _rot_join(self, int q):
        """A tenant with new work joins its level's rotation at the back."""
        cdef int level = self.q_level[q]
        cdef int head = self.l_rot[level], tail
        if head == NIL:
            self.q_rnext[q] = self.q_rprev[q] = q
            self.l_rot[level] = q
        else:
            tail = self.q_rprev[head]
            self.q_rnext[tail] = q
            self.q_rprev[q] = tail
            self.q_rnext[q] = head
            self.q_rprev[head] = q

    cdef void _rot_front(self, int q):
        """Make q the tenant queue its level serves next: it leaves its place in the
        rotation, if it had one, and goes in front of the current head; the others
        keep their order behind it."""
        cdef int level = self.q_level[q]
        if self.l_rot[level] == q:
            return
        if self.q_rnext[q] != NIL:
            self.q_rnext[self.q_rprev[q]] = self.q_rnext[q]
            self.q_rprev[self.q_rnext[q]] = self.q_rprev[q]
        self._rot_join(q)           # at the back of the circle, i.e. just before the head
        self.l_rot[level] = q       # ... which makes it the head

    cdef void _rot_leave(self, int q):
        cdef int level = self.q_level[q]
        cdef int nxt = self.q_rnext[q], prv = self.q_rprev[q]
        if nxt == q:
            self.l_rot[level] = NIL
        else:
            self.q_rnext[prv] = nxt
            self.q_rprev[nxt] = prv
            if self.l_rot[level] == q:
                self.l_rot[level] = nxt
        self.q_rnext[q] = self.q_rprev[q] = NIL

    cdef void _unlink(self, int slot):
        """Take an entry out of its tenant queue, the queue out of the rotation if it
        empties, and give the slot back."""
        cdef int q = self.e_tq[slot]
        cdef int nxt = self.e_next[slot], prv = self.e_prev[slot]
        if prv == NIL:
            self.q_head[q] = nxt
        else:
            self.e_next[prv] = nxt
        if nxt == NIL:
            self.q_tail[q] = prv
        else:
            self.e_prev[nxt] = prv
        self.q_count[q] -= 1
        if self.q_count[q] == 0:
            self._rot_leave(q)
        self.l_live[self.q_level[q]] -= 1
        self.live -= 1
        self.e_next[slot] = self.e_free
        self.e_free = slot

    # ------------------------------------------------------------ public interface
    def push(self, int64_t handle, int level, double now, tenant="", bint front=False):
        """Queue `handle` at `level` (0 is the most urgent) for `tenant`, enqueued at
        time `now` (for aging). With `front`, requeue it at the front of its level:
        the head of the tenant's FIFO, and the tenant served next in the level."""
        if level < 0 or level >= self.levels:
            raise ValueError(f"level {level} out of range")
        if self.live >= self.max_size_:
            raise QueueFull(self.max_size_)
        if self._h_find(handle) != NIL:
            raise ValueError(f"handle {handle} already queued")
        key = (level, tenant)
        cdef object qo = self.q_index.get(key)
        cdef int q
        if qo is None:
            q = self._new_tq(level)
            self.q_index[key] = q
        else:
            q = qo
        cdef int slot = self.e_free
        self.e_free = self.e_next[slot]
        self.e_handle[slot] = handle
        self.e_enq[slot] = now
        self.e_tq[slot] = q
        if front:
            self.e_prev[slot] = NIL
            self.e_next[slot] = self.q_head[q]
            if self.q_head[q] == NIL:
                self.q_tail[q] = slot
            else:
                self.e_prev[self.q_head[q]] = slot
            self.q_head[q] = slot
        else:
            self.e_next[slot] = NIL
            self.e_prev[slot] = self.q_tail[q]
            if self.q_tail[q] == NIL:
                self.q_head[q] = slot
            else:
                self.e_next[self.q_tail[q]] = slot
            self.q_tail[q] = slot
        self.q_count[q] += 1
        if front:
            self._rot_front(q)
        elif self.q_count[q] == 1:
            self._rot_join(q)
        self.l_live[level] += 1
        self.live += 1
        self._h_put(handle, slot)

    cpdef int64_t pop(self, double now, int max_level=-1):
        """The next handle to run, or -1 when nothing is queued. With max_level >= 0
        only levels 0..max_level (declared, not aged) are candidates, and -1 is also
        the answer when none of them has work; max_level=-1 (or >= levels) means all
        levels, below -1 raises ValueError. Touches no Python object."""
        cdef int i, q, best = -1, slot, hi = self.levels
        cdef double score, best_score = 0.0
        if max_level >= 0:
            if max_level < hi:
                hi = max_level + 1
        elif max_level != -1:
            raise ValueError(f"max_level {max_level} out of range")
        for i in range(hi):
            q = self.l_rot[i]
            if q == NIL:
                continue
            if self.aging_s > 0.0:
                score = i - (now - self.e_enq[self.q_head[q]]) / self.aging_s
            else:
                score = i
            if best < 0 or score < best_score:
                best = i
                best_score = score
        if best < 0:
            return -1
        q = self.l_rot[best]
        slot = self.q_head[q]
        cdef int64_t h = self.e_handle[slot]
        # its turn is over: the rotation moves on (q goes to the back if it stays)
        self.l_rot[best] = self.q_rnext[q]
        self._unlink(slot)
        self._h_del(self._h_find(h))
        return h

    cpdef bint cancel(self, int64_t handle):
        """Remove a queued handle in O(1); False when it is not queued."""
        cdef int i = self._h_find(handle)
        if i == NIL:
            return False
        self._unlink(self.h_val[i])
        self._h_del(i)
        return True

    def position(self, int64_t handle):
        """How many queued tasks run before this one if nothing else arrives, no
        aging reorders them and pops consider all levels; -1 when not queued. Front
        pushes need nothing special here: they only reorder the FIFO and the rotation
        that this walks. Costs O(tasks ahead in its tenant's queue + tenants in its
        level): for status calls, not the hot path."""
        cdef int i = self._h_find(handle)
        if i == NIL:
            return -1
        cdef int slot = self.h_val[i], q = self.e_tq[slot], level = self.q_level[q], s, r
        cdef Py_ssize_t n = 0, k = 0
        for i in range(level):
            n += self.l_live[i]
        s = self.q_head[q]
        while s != slot:
            k += 1
            s = self.e_next[s]
        n += k
        r = self.l_rot[level]
        cdef bint before = True
        while True:
            if r == q:
                before = False
            else:
                n += min(self.q_count[r], k + 1 if before else k)
            r = self.q_rnext[r]
            if r == self.l_rot[level]:
                break
        return n

    def depth(self, int level):
        if level < 0 or level >= self.levels:
            raise ValueError(f"level {level} out of range")
        return self.l_live[level]

    def __contains__(self, int64_t handle):
        return self._h_find(handle) != NIL

    def __len__(self):
        return self.live

    @property
    def max_size(self):
        return self.max_size_
