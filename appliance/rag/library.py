"""The site's document library: ingest, resume, delete, search, in one process.

One Library per RAG worker owns the document store (SQLite + FTS5), the vector index
(usearch) and the embedder. Writes are serialised by one lock; searches run beside
them. Why the order of an ingestion is what it is (crash safety, nothing lost):

1. the document and all its chunks are committed (state `indexing`) before any
   embedding: from then on the text is on disk, whatever happens to the process;
2. chunks are embedded in batches; each batch goes into the index and is marked
   embedded in SQLite;
3. the document turns `ready` once no chunk is pending. The index file is saved at
   most every SAVE_EVERY_S (saving 10k vectors costs ~30 ms: not per document).

After a crash, `reconcile` compares the two stores at start: a chunk marked embedded
that the saved index lacks is pending again and its document back to `indexing`;
`resume()` then finishes every such document from the chunk text in SQLite, with no
one having to ask. An ingest task that the broker runs a second time finds its
document half done and finishes it the same way.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple

import msgspec

from ..metrics import rag as metrics
from . import embedder as emb
from .chunking import chunk
from .search import Retriever, reconcile
from .store import DocStore
from .vectors import VectorIndex

log = logging.getLogger("appliance.rag")

BATCH = 16          # chunks per embedding call: large enough to amortise, small enough to stop quickly
SAVE_EVERY_S = 5.0  # the index file is saved at most this often during ingestion (and at close)
BACKGROUND_NICE = 10  # ingestion threads run at this OS priority: chat and search go first on the CPU


class NewDocument(NamedTuple):
    doc_id: str
    title: str
    text: str
    metadata: dict[str, Any]
    shared: bool


class LibraryError(Exception):
    """A request the library refuses; `code` is the API's stable error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Stopped(Exception):
    """The ingestion was asked to stop (abort, deadline, shutdown); what is done is kept."""


def lower_this_threads_priority() -> None:
    """Linux nice values are per thread: only the ingestion's embedding thread yields the
    CPU. It is a thread of its own, niced once for good: raising a thread's priority back
    needs CAP_SYS_NICE, so a task thread niced for an ingestion would stay slow for the
    searches it runs later under the appliance's unprivileged user."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (OSError, AttributeError):
        pass


class Library:
    def __init__(self, directory: Path, embedder: emb.Embedder, chunk_tokens: int = 200, overlap: int = 40,
                 compact_pct: float = 20.0):
        directory.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        self.chunk_tokens = min(chunk_tokens, embedder.max_tokens)
        self.overlap = min(overlap, self.chunk_tokens // 2)
        self.compact_fraction = compact_pct / 100
        self.store = DocStore(directory / "documents.sqlite3")
        self.vectors = VectorIndex(directory / "vectors.usearch", embedder.dim, embedder.id)
        self.retriever = Retriever(self.store, self.vectors, embedder)
        self.write = threading.Lock()     # one writer: store and index change together
        self.embedding = threading.Lock()  # one ingestion embeds at a time: the CPU is shared with chat
        self._embed_thread = ThreadPoolExecutor(1, thread_name_prefix="rag-ingest-embed",
                                                initializer=lower_this_threads_priority)
        self._saved = time.monotonic()
        self._dirty = False
        self.compactions = 0
        self.recovered = reconcile(self.store, self.vectors)
        self._publish()

    # ------------------------------------------------------------ ingestion
    def ingest(self, docs: list[NewDocument], tenant: str, progress: Callable[[int, int], None],
               should_stop: Callable[[], bool]) -> list[dict]:
        """Index documents (or finish them); their summaries. Idempotent by content."""
        docs = list({d.doc_id: d for d in docs}.values())  # the same text twice in one task: once
        with self.write, self.store.transaction():  # one commit for all (reads see it only after)
            for d in docs:
                if self.store.get(d.doc_id) is not None:
                    continue
                pieces = chunk(d.text, self.embedder.token_spans(d.text), self.chunk_tokens, self.overlap)
                if not pieces:
                    raise LibraryError("invalid_field", "text: nothing to index (only whitespace)")
                sha = hashlib.sha256(d.text.encode()).hexdigest()
                self.store.add_document(d.doc_id, tenant, d.shared, d.title, sha, d.metadata, len(d.text), pieces)
        return self.complete([d.doc_id for d in docs], progress, should_stop)

    def complete(self, doc_ids: list[str], progress: Callable[[int, int], None] = lambda d, t: None,
                 should_stop: Callable[[], bool] = lambda: False) -> list[dict]:
        """Embed what is pending of these documents, then mark them ready; the summaries
        of those that still exist (one deleted meanwhile is left out)."""
        with self.embedding:
            return self._complete(doc_ids, progress, should_stop)

    def _complete(self, doc_ids, progress, should_stop) -> list[dict]:
        docs = [d for d in map(self.store.get, doc_ids) if d is not None]
        pending = [(d.id, key, text) for d in docs for key, text in self.store.pending(d.id)]
        total = sum(d.n_chunks for d in docs)
        done = total - len(pending)
        progress(done, total)
        for i in range(0, len(pending), BATCH):
            if should_stop():
                raise Stopped(f"{done} of {total} chunks indexed")
            batch = pending[i:i + BATCH]
            vectors = self._embed_thread.submit(self.embedder.embed, [text for _, _, text in batch]).result()
            with self.write:  # a document deleted meanwhile: its chunks are not indexed
                alive = {doc for doc, _, _ in batch if self.store.get(doc) is not None}
                rows = [j for j, (doc, _, _) in enumerate(batch) if doc in alive]
                keys = [batch[j][1] for j in rows]
                if keys:
                    self.vectors.add(keys, vectors[rows])
                    self.store.mark_embedded(keys)
                    metrics.EMBEDDED.inc(len(keys))
                    self._dirty = True
                    self._save_if_due()
            done += len(batch)
            progress(done, total)
        finished = []
        with self.write, self.store.transaction():
            for d in docs:
                if self.store.get(d.id) is not None:
                    self.store.mark_ready(d.id)
                    finished.append(d.id)
            self._save_if_due()
        metrics.DOCUMENTS.labels("indexed").inc(len(finished))
        self._publish()
        return [self.describe(self.store.get(i)) for i in finished]

    def resume(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Finish every document left `indexing` (a crash, a stop); how many were finished."""
        finished = 0
        for doc_id in self.store.resumable():
            if should_stop():
                break
            try:
                finished += len(self.complete([doc_id], should_stop=should_stop))
            except (LibraryError, Stopped) as exc:
                log.warning("document %s not resumed: %s", doc_id, exc)
        return finished

    # ------------------------------------------------------------ documents
    def visible(self, doc_id: str | None, tenant: str):
        doc = self.store.get(doc_id) if doc_id else None
        if doc is None or not (doc.tenant == tenant or doc.shared):
            raise LibraryError("not_found", "no such document")  # another tenant's: the same answer
        return doc

    def delete(self, doc_id: str, tenant: str, admin: bool) -> dict:
        with self.write:
            doc = self.visible(doc_id, tenant)
            if doc.tenant != tenant and not admin:
                raise LibraryError("forbidden", "a site-wide document is deleted by an admin")
            keys = self.store.delete(doc_id)
            self.vectors.remove(keys)
            self._dirty = True
            self._save_if_due(force=True)
        metrics.DOCUMENTS.labels("deleted").inc()
        self._publish()
        if self.vectors.deleted_fraction >= self.compact_fraction:
            threading.Thread(target=self._compact, name="rag-compact", daemon=True).start()
        return {"document_id": doc_id, "deleted": True, "chunks": len(keys)}

    def _compact(self) -> None:
        """Rebuild the index without its deleted slots; searches and writes go on meanwhile."""
        t0 = time.monotonic()
        if self.vectors.compact():
            self.compactions += 1
            metrics.COMPACTIONS.inc()
            self._publish()
            log.info("rag: index compacted in %.2fs (%d vectors)", time.monotonic() - t0, len(self.vectors))

    def list(self, tenant: str, limit: int, offset: int) -> list[dict]:
        return [self.describe(d) for d in self.store.list_documents(tenant, limit, offset)]

    def _publish(self) -> None:
        metrics.index(len(self.vectors), self.vectors.deleted_fraction)

    def index_stats(self) -> dict:
        return {"chunks": len(self.vectors), "deleted_fraction": round(self.vectors.deleted_fraction, 4),
                "embedder": self.embedder.id, "compactions": self.compactions}

    @staticmethod
    def describe(doc) -> dict:
        return {"document_id": doc.id, "title": doc.title, "state": doc.state, "chunks": doc.n_chunks,
                "chars": doc.chars, "metadata": doc.metadata, "shared": bool(doc.shared),
                "sha256": doc.sha256, "created_at": doc.created_at}

    # ------------------------------------------------------------ search
    def search(self, query: str, k: int, tenant: str, filters: dict | None, mode: str):
        # FilterIn structs -> {"in": [...]}, the store's form
        with metrics.SEARCH.labels(mode).time():
            return self.retriever.search(query, k, tenant, msgspec.to_builtins(filters or {}), mode)

    # ------------------------------------------------------------ persistence
    def _save_if_due(self, force: bool = False) -> None:
        if self._dirty and (force or time.monotonic() - self._saved >= SAVE_EVERY_S):
            self.vectors.save()
            self._saved = time.monotonic()
            self._dirty = False

    def close(self) -> None:
        self._embed_thread.shutdown(wait=False, cancel_futures=True)
        with self.write:
            self._save_if_due(force=True)
