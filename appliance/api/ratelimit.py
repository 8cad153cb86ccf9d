"""Token buckets per (subject, scope), shared by every gunicorn worker.

Why shared: a limit kept per worker would let a client multiply its rate by the
worker count (and the kernel picks the worker). The buckets live in a small file
under RUN_DIR that each worker maps; the table and its lock are native
(native/shm.pyx: a compare-and-swap lock word, taken without releasing the GIL).

Layout: the lock word (8 bytes with padding), magic, slot count, padding to HEADER,
then SLOTS slots of (key u64, tokens f64, stamp f64). The key is an 8-byte BLAKE2b of
scope and subject.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading
import time
from pathlib import Path

from .._shm import BucketTable
from ..config import RateLimit

MAGIC = b"APRL0002"
SLOTS = 8192
HEADER = 64
_MAGIC = struct.Struct("<8sQ")  # at offset 8, after the lock word (never written over: packing
                               # padding bytes would zero the lock under its holder)
SIZE = HEADER + SLOTS * 24

def prepare(path: Path) -> None:
    """Create (or reset) the bucket file; the API's master process does this before forking."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(bytes(8) + _MAGIC.pack(MAGIC, SLOTS))
        f.truncate(SIZE)
    os.replace(tmp, path)


class RateLimiter:
    def __init__(self, path: Path, limits: dict[str, RateLimit]):
        self.path = path
        self.limits = limits
        self._pid = -1
        self._keys: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # the shared lock is for processes; threads queue here

    def _open(self) -> None:
        if not self.path.exists():
            prepare(self.path)
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        magic, slots = _MAGIC.unpack_from(self._map, 8)
        if magic != MAGIC or slots != SLOTS:
            raise RuntimeError(f"{self.path} is not a rate-limit table of this version")
        self._table = BucketTable(self._map, HEADER, SLOTS)
        self._pid = os.getpid()

    def _key(self, subject: str, scope: str) -> int:
        key = self._keys.get((subject, scope))
        if key is None:
            if len(self._keys) > 100_000:
                self._keys.clear()
            digest = hashlib.blake2b(f"{scope}\0{subject}".encode(), digest_size=8).digest()
            key = self._keys[(subject, scope)] = int.from_bytes(digest, "little")
        return key

    def take(self, subject: str, scope: str, now: float | None = None) -> float:
        """Take one token; 0.0 when allowed, else the seconds until one is available."""
        limit = self.limits.get(scope)
        if limit is None:
            return 0.0
        key = self._key(subject, scope)
        with self._lock:
            if self._pid != os.getpid():
                self._open()
            return self._table.take(key, limit.per_s, limit.burst, time.monotonic() if now is None else now)
