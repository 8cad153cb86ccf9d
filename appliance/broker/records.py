"""Final records: a bounded cache in front of the journal, and their lifetime.

A finished task's record stays in memory (the FINISHED_CACHE newest), so that clients
polling for a result rarely cost a SQLite read; the journal holds every record. Its
result is dropped RESULT_TTL_S after the task ended (the record then says
`result_expired`), the record itself RESULT_TOMBSTONE_S later (then: unknown id).
"""
from __future__ import annotations

import time
from collections import OrderedDict

import msgspec

from .. import protocol as P
from ..store.journal import Journal

FINISHED_CACHE = 10_000


class FinalRecords:
    def __init__(self, journal: Journal, result_ttl_s: float, tombstone_s: float):
        self.journal = journal
        self.result_ttl_s = result_ttl_s
        self.tombstone_s = tombstone_s
        self.recent: OrderedDict[str, P.TaskRecord] = OrderedDict()  # newest last

    def add(self, rec: P.TaskRecord) -> None:
        self.recent[rec.task_id] = rec
        if len(self.recent) > FINISHED_CACHE:
            self.recent.popitem(last=False)

    def get(self, task_id: str, now: float | None = None) -> P.TaskRecord | None:
        """The record as a client may see it now: without its result past the TTL, None
        past the tombstone time."""
        rec = self.recent.get(task_id) or self.journal.get(task_id)
        if rec is None:
            return None
        now = time.time() if now is None else now
        if rec.finished_at is not None and now - rec.finished_at > self.result_ttl_s:
            if now - rec.finished_at > self.result_ttl_s + self.tombstone_s:
                return None
            rec = msgspec.structs.replace(rec, result=None, result_expired=True)
        return rec

    def expire(self, now: float) -> None:
        ttl = self.result_ttl_s
        self.journal.expire(now - ttl, now - ttl - self.tombstone_s)
