"""`appliance rag load-icd10cm`: the ICD-10-CM code set as site-wide documents.

One document per code (the code and its description; metadata: code, chapter,
billable; the inclusion terms are left out, they are the retrieval benchmark's
queries), submitted to the broker as batch-priority rag_ingest tasks of the `site` tenant,
shared with every tenant. The broker's queue bound is respected: a `queue_full`
refusal waits and retries, so loading the 98,186 codes never crowds out chat. Running
it twice adds nothing: ids derive from the text.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from .. import protocol as P
from ..broker_client import BrokerClient, BrokerRefused
from ..config import Settings

BATCH = 200       # tasks per submit-batch
PER_TASK = 64     # codes per rag_ingest task: embedded together, one task's overhead for all


def load_icd10cm(s: Settings, chapters: Sequence[str] | None, limit: int | None, wait: bool,
                 say: Callable[[str], None]) -> dict:
    from ..rag import icd10
    from ..rag.samples import SITE

    client = BrokerClient(s.broker_front, max(s.broker_timeout_s, 5.0))
    ids: list[str] = []
    pending: list[P.RagIngestTask] = []
    docs: list[P.RagDocument] = []
    n = 0
    t0 = time.monotonic()

    def flush() -> None:
        while pending:
            try:
                ids.extend(client.submit_batch(list(pending), SITE).task_ids)
                pending.clear()
            except BrokerRefused as exc:
                if exc.code != "queue_full":
                    raise
                time.sleep(1.0)  # the queue drains at the worker's pace
        say(f"{n} codes submitted in {len(ids)} tasks ({time.monotonic() - t0:.0f} s)")

    def task() -> None:
        pending.append(P.RagIngestTask(priority="batch", timeout_s=s.task_timeout_max_s, documents=list(docs)))
        docs.clear()
        if len(pending) >= min(BATCH, s.max_batch):
            flush()

    for code in icd10.codes(chapters):
        if limit is not None and n >= limit:
            break
        title, text, metadata = icd10.document(code)
        docs.append(P.RagDocument(P.document_id(SITE, text), title, text, metadata, shared=True))
        n += 1
        if len(docs) >= PER_TASK:
            task()
    if docs:
        task()
    flush()
    summary = {"codes": n, "tasks": len(ids), "completed": 0, "failed": 0}
    if not wait:
        return summary
    for i, task_id in enumerate(ids):
        while True:
            rec = client.query(task_id, SITE).task
            if rec.state in P.FINAL_STATES:
                break
            time.sleep(0.5)
        summary["completed" if rec.state == "completed" else "failed"] += 1
        if (i + 1) % 1000 == 0:
            say(f"{i + 1} of {len(ids)} indexed ({time.monotonic() - t0:.0f} s)")
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary
