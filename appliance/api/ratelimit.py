"""Token buckets per (subject, scope), shared by every gunicorn worker.

Why a shared file mapping: a limit kept per worker would let a client multiply its
rate by the worker count (and the kernel picks the worker). The buckets live in a
small file under RUN_DIR that each worker maps; an flock serialises the few
microseconds of arithmetic. flock, unlike a semaphore, is released by the kernel if a
worker dies holding it, so one crashed worker cannot wedge the others.

Layout: a header (magic, slot count) and then SLOTS slots of (key u64, tokens f64,
stamp f64). The key is an 8-byte BLAKE2b of subject and scope; probing is linear over
PROBE slots, and a full window evicts its least recently used slot (an evicted
subject comes back with a full bucket, which is what it would have after idling).
"""
from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import re
import struct
import threading
import time
from pathlib import Path

from ..config import ConfigError

MAGIC = b"APRL0001"
SLOTS = 8192
PROBE = 16
_HEADER = struct.Struct("<8sQ")
_SLOT = struct.Struct("<Qdd")
SIZE = _HEADER.size + SLOTS * _SLOT.size

_RULE = re.compile(r"^\s*([a-z:]+)\s*=\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*:\s*(\d+)\s*$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate_limits(text: str) -> dict[str, tuple[float, int]]:
    """"tasks:write=100/s:200,admin=10/m:5" -> {scope: (tokens per second, burst)}."""
    from ..security import SCOPES

    limits: dict[str, tuple[float, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _RULE.match(part)
        if not m:
            raise ConfigError(f"RATE_LIMITS: {part!r} is not SCOPE=RATE/UNIT:BURST (e.g. tasks:write=100/s:200)")
        scope, rate, unit, burst = m.group(1), float(m.group(2)), m.group(3), int(m.group(4))
        if scope not in SCOPES:
            raise ConfigError(f"RATE_LIMITS: unknown scope {scope!r}; known: {', '.join(SCOPES)}")
        if rate <= 0 or burst < 1:
            raise ConfigError(f"RATE_LIMITS: {part!r}: the rate must be > 0 and the burst >= 1")
        limits[scope] = (rate / _PER[unit], burst)
    return limits


def prepare(path: Path) -> None:
    """Create (or reset) the bucket file; the API's master process does this before forking."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_HEADER.pack(MAGIC, SLOTS))
        f.truncate(SIZE)
    os.replace(tmp, path)


class RateLimiter:
    def __init__(self, path: Path, limits: dict[str, tuple[float, int]]):
        self.path = path
        self.limits = limits
        self._pid = -1
        self._lock = threading.Lock()

    def _open(self) -> None:
        # per process: an inherited descriptor would share one flock between processes
        if not self.path.exists():
            prepare(self.path)
        fd = os.open(self.path, os.O_RDWR)
        self._fd = fd
        self._map = mmap.mmap(fd, SIZE)
        magic, slots = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or slots != SLOTS:
            raise RuntimeError(f"{self.path} is not a rate-limit table of this version")
        self._pid = os.getpid()

    def take(self, subject: str, scope: str, now: float | None = None) -> float:
        """Take one token; 0.0 when allowed, else the seconds until one is available."""
        limit = self.limits.get(scope)
        if limit is None:
            return 0.0
        rate, burst = limit
        key = int.from_bytes(hashlib.blake2b(f"{scope}\0{subject}".encode(), digest_size=8).digest(), "little") or 1
        with self._lock:
            if self._pid != os.getpid():
                self._open()
            now = time.monotonic() if now is None else now
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                return self._take(key, rate, burst, now)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _take(self, key: int, rate: float, burst: int, now: float) -> float:
        m = self._map
        start = key % SLOTS
        victim, victim_stamp = -1, float("inf")
        for i in range(PROBE):
            off = _HEADER.size + ((start + i) % SLOTS) * _SLOT.size
            k, tokens, stamp = _SLOT.unpack_from(m, off)
            if k == key:
                tokens = min(float(burst), tokens + max(0.0, now - stamp) * rate)
                break
            if k == 0 or stamp < victim_stamp:
                victim, victim_stamp = off, (-1.0 if k == 0 else stamp)
        else:
            off, tokens = victim, float(burst)
        if tokens >= 1.0:
            _SLOT.pack_into(m, off, key, tokens - 1.0, now)
            return 0.0
        _SLOT.pack_into(m, off, key, tokens, now)
        return (1.0 - tokens) / rate
