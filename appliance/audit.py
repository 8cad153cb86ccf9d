"""The audit log: who did what to which task, as append-only, hash-chained JSON lines.

Each record carries `seq`, the previous record's hash (`prev`) and its own `hash`, an
HMAC-SHA256 under AUDIT_KEY of the record's canonical JSON (sorted keys, without
`hash`). Changing a line breaks its hash; removing or reordering lines breaks `seq`
and `prev`; and without the key nobody can write a new, consistent chain.
`appliance audit verify` checks all three and names the line.

Records hold subject, tenant, route, ids, status and outcome: never prompt or result
text. Several gunicorn workers append to one file. The chain's head (seq, hash, and
the file size it belongs to) and a lock word live in a small mapped side file
(`audit.jsonl.head`): a writer takes the lock (native/shm.pyx; never flock, whose GIL
round trip made a convoy under load), learns where the chain stands without reading
the log, appends, and moves the head. Only when the sizes disagree (a writer died
between its line and the head) does it read the log's last line.
Records are written (not fsynced) before the response leaves: they survive a process
crash, and an OS crash can lose the last few, which `verify` then cannot see (a chain
proves order and integrity of what is there, not that the tail is complete).
"""
from __future__ import annotations

import hashlib
import hmac
import mmap
import os
import struct
import threading
import time
from pathlib import Path

import msgspec

from ._shm import SpinLock, write_all

GENESIS = "0" * 64
_LOCK_AT, _HEAD_AT = 0, 8  # the side file: lock word (+pad), then the head
_HEAD = struct.Struct("<QQ32s")  # seq, file size after that record, its hash


def _sign(key: bytes, record: dict) -> tuple[bytes, bytes]:
    """(canonical JSON, HMAC): sorted keys, `hash` itself left out. Writer and verifier share it."""
    body = msgspec.json.encode({k: v for k, v in record.items() if k != "hash"}, order="sorted")
    return body, hmac.digest(key, body, "sha256")


_second: tuple[int, str] = (-1, "")


def _now_iso() -> str:
    """UTC, microseconds, `Z`: the date part is formatted once a second (it showed in profiles)."""
    global _second
    t = time.time()
    whole = int(t)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((t - whole) * 1e6):06d}Z"


class AuditLog:
    def __init__(self, path: str | Path, key: str):
        self.path = Path(path)
        self.key = key.encode()
        self._lock = threading.Lock()
        self._pid = -1

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        head = os.open(self.path.with_name(self.path.name + ".head"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(head).st_size < _HEAD_AT + _HEAD.size:
                os.ftruncate(head, _HEAD_AT + _HEAD.size)
            self._head = mmap.mmap(head, _HEAD_AT + _HEAD.size)
        finally:
            os.close(head)
        self._shared = SpinLock(self._head, _LOCK_AT)
        self._pid = os.getpid()

    def _last(self, size: int) -> tuple[int, str]:
        """(seq, hash) of the record that ends at `size`."""
        if size == 0:
            return 0, GENESIS
        seq, head_size, digest = _HEAD.unpack_from(self._head, _HEAD_AT)
        if head_size == size:
            return seq, digest.hex()
        chunk, start = 4096, size  # the head is stale: read back to the last line's start
        tail = b""
        while start > 0:
            start = max(0, start - chunk)
            tail = os.pread(self._fd, size - start, start)
            if tail.rstrip(b"\n").rfind(b"\n") >= 0:
                break
            chunk *= 4
        last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            rec = msgspec.json.decode(last)
            return int(rec["seq"]), str(rec["hash"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            # a damaged last line: chain on from it anyway, `verify` will name it
            return seq + 1, hashlib.sha256(last).hexdigest()

    def append(self, **fields) -> dict:
        with self._lock:
            if self._pid != os.getpid():
                self._open()
            stamp = _now_iso()
            self._shared.acquire()
            try:
                size = os.fstat(self._fd).st_size
                seq, prev = self._last(size)
                rec = {"seq": seq + 1, "time": stamp, **fields, "prev": prev}
                body, digest = _sign(self.key, rec)
                rec["hash"] = digest.hex()
                line = b"%s,\"hash\":\"%s\"}\n" % (body[:-1], rec["hash"].encode())
                write_all(self._fd, line)
                _HEAD.pack_into(self._head, _HEAD_AT, rec["seq"], size + len(line), digest)
                return rec
            finally:
                self._shared.release()


def verify(path: str | Path, key: str) -> tuple[int, list[str]]:
    """(records read, problems); each problem names its line (1-based)."""
    problems: list[str] = []
    prev_hash, prev_seq, n = GENESIS, 0, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                rec = msgspec.json.decode(raw)
                seq, stored, prev = int(rec["seq"]), rec["hash"], rec["prev"]
            except (msgspec.DecodeError, KeyError, TypeError, ValueError):
                problems.append(f"line {n}: not an audit record (damaged or inserted)")
                prev_hash, prev_seq = hashlib.sha256(raw).hexdigest(), prev_seq + 1
                continue
            if not hmac.compare_digest(_sign(key.encode(), rec)[1].hex(), str(stored)):
                problems.append(f"line {n} (seq {seq}): content changed (hash does not match)")
            if seq != prev_seq + 1 or prev != prev_hash:
                if seq <= prev_seq:
                    problems.append(f"line {n} (seq {seq}): out of order, after seq {prev_seq} (lines reordered)")
                elif seq > prev_seq + 1:
                    problems.append(f"line {n} (seq {seq}): {seq - prev_seq - 1} record(s) removed before it")
                else:
                    problems.append(f"line {n} (seq {seq}): does not chain to the line before it")
            prev_hash, prev_seq = str(stored), seq
    return n, problems
