# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""State that every gunicorn worker shares: a cross-process lock and the rate-limit buckets.

Why not flock: flock() releases the GIL, and when it returns the thread must win the
GIL back, possibly after another thread's 5 ms switch interval, all the while holding
the file lock that the other workers are queued on. Under load that convoy cost more
than the work it protected (measured: ~170 us per request for the audit log, ~90 for
the rate limiter). The lock here is a word in shared memory, taken with an atomic
compare-and-swap while the GIL is held, so a holder never waits for its own GIL.

The lock word holds the owner's pid. A waiter spins briefly, then sleeps (releasing
its GIL); a holder that died (the pid is gone) or kept it beyond
STALE_NS is assumed dead and the lock is taken over, so a worker killed at the wrong
instant cannot wedge the others. Threads of one process must also hold a
threading.Lock around acquire/release (AuditLog and RateLimiter do): a thread
preempted inside a Python critical section would otherwise be spun on by its own
siblings.

Keep the lock word's bytes out of every struct packed into the same buffer: packing
writes padding bytes too, and zeroing the word under its holder opens the lock.
"""
from libc.errno cimport errno, ESRCH, EINTR
from libc.stdint cimport int32_t, uint64_t
from posix.time cimport clock_gettime, nanosleep, timespec, CLOCK_MONOTONIC
from posix.unistd cimport getpid

cdef extern from "signal.h":
    int kill(int pid, int sig) nogil

cdef extern from "unistd.h":
    ssize_t c_write "write" (int fd, const void *buf, size_t n) nogil

cdef extern from *:
    """
    static inline int shm_cas(volatile int *p, int expected, int desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
    }
    static inline void shm_store(volatile int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int shm_load(volatile int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    """
    bint shm_cas(int *p, int expected, int desired) nogil
    void shm_store(int *p, int v) nogil
    int shm_load(int *p) nogil

DEF STALE_NS = 200000000  # 0.2 s: nothing legitimate holds the lock this long

cdef inline long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef class SpinLock:
    """A lock word at `offset` in a shared buffer (an mmap), for processes, not threads."""

    cdef object _buf
    cdef int *_word

    def __cinit__(self, buf, Py_ssize_t offset=0):
        cdef unsigned char[::1] view = buf
        if offset < 0 or offset + 4 > view.shape[0] or offset % 4:
            raise ValueError("lock word outside the buffer or unaligned")
        self._buf = buf
        self._word = <int *>(&view[0] + offset)

    cpdef acquire(self):
        cdef int me = getpid()
        cdef int owner
        cdef long spins = 0
        cdef long long since = 0, now
        cdef timespec pause
        pause.tv_sec = 0
        pause.tv_nsec = 20000
        while not shm_cas(self._word, 0, me):
            spins += 1
            if spins < 50:
                continue
            owner = shm_load(self._word)
            now = _now_ns()
            if since == 0:
                since = now
            if owner != 0 and ((kill(owner, 0) != 0 and errno == ESRCH) or now - since > STALE_NS):
                if shm_cas(self._word, owner, me):  # its holder is gone: take it over
                    return
                since = 0
            with nogil:  # the holder may be waiting for a CPU or its GIL: get out of its way
                nanosleep(&pause, NULL)

    cpdef release(self):
        shm_store(self._word, 0)

    @property
    def owner(self) -> int:
        return shm_load(self._word)


def write_all(int fd, const unsigned char[::1] data):
    """write(2) the whole buffer without releasing the GIL (see the module's docstring)."""
    cdef Py_ssize_t done = 0, n = data.shape[0]
    cdef ssize_t w
    while done < n:
        w = c_write(fd, &data[done], n - done)
        if w < 0:
            if errno == EINTR:
                continue
            raise OSError(errno, "write failed")
        done += w
    return done


ctypedef struct Slot:
    uint64_t key
    double tokens
    double stamp


cdef class BucketTable:
    """Token buckets in a shared buffer: a header (lock word, padding) and then slots.

    Open addressing with linear probing over PROBE slots from the key's home; a full
    window evicts its least recently used slot (the evicted key comes back later with
    a full bucket, which is what it would have after idling that long).
    """

    cdef object _buf
    cdef SpinLock _lock
    cdef Slot *_slots
    cdef Py_ssize_t _n
    cdef int _probe

    def __cinit__(self, buf, Py_ssize_t header, Py_ssize_t slots, int probe=16):
        cdef unsigned char[::1] view = buf
        if header % 8 or header < 8 or header + slots * sizeof(Slot) > view.shape[0] or slots < probe:
            raise ValueError("bucket table does not fit the buffer")
        self._buf = buf
        self._lock = SpinLock(buf, 0)
        self._slots = <Slot *>(&view[0] + header)
        self._n = slots
        self._probe = probe

    def take(self, uint64_t key, double rate, double burst, double now):
        """Take one token; 0.0 when allowed, else the seconds until one is available."""
        cdef Slot *s = NULL
        cdef Slot *slot
        cdef Slot *victim = NULL
        cdef double tokens = burst
        cdef int i
        if key == 0:
            key = 1  # 0 marks an empty slot
        self._lock.acquire()
        try:
            for i in range(self._probe):
                slot = &self._slots[(key + i) % self._n]
                if slot.key == key:
                    s = slot
                    tokens = s.tokens + (now - s.stamp) * rate if now > s.stamp else s.tokens
                    if tokens > burst:
                        tokens = burst
                    break
                if slot.key == 0:  # slots never empty again, so the key is not further on
                    victim = slot
                    break
                if victim == NULL or slot.stamp < victim.stamp:
                    victim = slot
            if s == NULL:  # a new key: the empty slot, or the least recently used one
                s = victim
                s.key = key
                tokens = burst
            if tokens >= 1.0:
                s.tokens = tokens - 1.0
                s.stamp = now
                return 0.0
            s.tokens = tokens
            s.stamp = now
            return (1.0 - tokens) / rate
        finally:
            self._lock.release()
