"""Retrieval over the store and the vector index: vector, keyword (BM25) or hybrid (RRF).

    rrf(rankings, k=60) -> [(key, score)]
    Retriever(store, vectors, embedder).search(query, k, tenant, filters=None, mode="hybrid") -> [Hit]
    reconcile(store, vectors) -> Reconciled

Tenant isolation is by construction: keyword search runs in SQL with the visibility
clause, and vector search is restricted to `store.visible_keys(tenant, filters)`, so a
chunk of another tenant is never even a candidate (nor one of a document still
'indexing'). Hits are read back with `chunk_rows`; a chunk deleted between the search
and that read is dropped, never shown half.

Why hybrid: embeddings find paraphrases ("high blood sugar" for "hyperglycaemia") but
blur exact tokens (codes like E11.9, drug names, doses); BM25 is the reverse. Reciprocal
rank fusion combines the two rankings without calibrating a cosine against a BM25 score.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import msgspec

from .store import DocStore
from .vectors import VectorIndex

__all__ = ["Hit", "Retriever", "rrf", "reconcile", "Reconciled", "MODES", "CANDIDATES"]

MODES = ("vector", "keyword", "hybrid")
RRF_K = 60
# Hybrid fetches k*CANDIDATES from each side. RRF can lift an item ranked moderately on
# both sides above one ranked high on one side only: with RRF_K=60, ranks (r, r) beat
# (1, absent) while 2/(60+r) > 1/61, i.e. up to r ~ 60. Fetching 4k (40 for k=10) reaches
# that depth for usual k at little cost: BM25 scores every match anyway, and the HNSW
# search cost grows slowly with the count.
CANDIDATES = 4
MAX_K = 200


class Hit(msgspec.Struct, frozen=True):
    chunk_id: int
    document_id: str
    title: str
    score: float                     # cosine (vector), -bm25 (keyword) or RRF score (hybrid)
    start: int                       # character offsets of the chunk in its document
    end: int
    text: str
    metadata: dict[str, Any]
    vector_rank: int | None = None   # 1-based rank in each list (hybrid; the mode's own otherwise)
    keyword_rank: int | None = None


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: score(key) = sum over rankings of 1/(k + rank), rank from 1.
    Best first; ties by first appearance (earlier list, then earlier rank)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, 1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])  # sorted() is stable: ties keep order


class Retriever:
    """Searches for one tenant at a time; thread-safe as its parts are (any thread)."""

    def __init__(self, store: DocStore, vectors: VectorIndex, embedder: Any):
        if embedder.dim != vectors.dim or embedder.id != vectors.embedder_id:
            raise ValueError(f"embedder {embedder.id!r} (dim {embedder.dim}) does not match the index "
                             f"({vectors.embedder_id!r}, dim {vectors.dim})")
        self.store, self.vectors, self.embedder = store, vectors, embedder

    def search(self, query: str, k: int, tenant: str, filters: Mapping[str, Any] | None = None,
               mode: str = "hybrid") -> list[Hit]:
        """The k best chunks for `query` among the tenant's own and shared ready documents.
        Raises FilterError for a bad or unknown filter field, ValueError for a bad mode/k."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}")
        n = k if mode != "hybrid" else k * CANDIDATES
        vec: list[tuple[int, float]] = []
        kw: list[tuple[int, float]] = []
        if mode in ("keyword", "hybrid"):
            kw = self.store.keyword(query, n, tenant, filters)
        if mode in ("vector", "hybrid"):
            allowed = self.store.visible_keys(tenant, filters)   # validates filters too
            if allowed and query.strip():
                q = self.embedder.embed([query])[0]
                vec = self.vectors.search(q, n, allowed)
        vrank = {key: r for r, (key, _) in enumerate(vec, 1)}
        krank = {key: r for r, (key, _) in enumerate(kw, 1)}
        if mode == "hybrid":
            ranked = rrf([[key for key, _ in vec], [key for key, _ in kw]])
        else:
            ranked = vec or kw
        rows = self.store.chunk_rows(key for key, _ in ranked[:k])
        hits = []
        for key, score in ranked[:k]:
            row = rows.get(key)
            if row is not None:
                hits.append(Hit(key, row.doc_id, row.title, score, row.start, row.end, row.text,
                                row.metadata, vrank.get(key), krank.get(key)))
        return hits


class Reconciled(NamedTuple):
    unembedded: int        # chunks marked embedded whose vector was missing: to embed again
    marked: int            # chunks whose vector was in the index but not marked: marked now
    removed: int           # index keys with no chunk: removed from the index
    resume: list[str]      # documents the worker must finish (pending chunks, or still 'indexing')


def reconcile(store: DocStore, vectors: VectorIndex) -> Reconciled:
    """Make the store's `embedded` flags and the index agree after a crash; run at start-up,
    before serving. The index is the truth for what is embedded (its save may lag the
    store's commits); the store is the truth for what exists (a delete commits before the
    index's remove). Records the index's embedder in the store's meta table, so a new
    embedder (a fresh, empty index) re-embeds everything through the same path.

    For the worker: add vectors, mark_embedded, and save the index before mark_ready, so
    a ready document's vectors are on disk."""
    in_index = vectors.keys()
    embedded = store.embedded_keys()
    exists = store.chunk_keys()
    missing = embedded - in_index
    unmarked = (in_index & exists) - embedded
    orphans = in_index - exists
    if missing:
        store.mark_unembedded(missing)
    if unmarked:
        store.mark_embedded(unmarked)
    if orphans:
        vectors.remove(orphans)
        vectors.save()
    if store.embedder() != (vectors.embedder_id, vectors.dim):
        store.set_embedder(vectors.embedder_id, vectors.dim)
    return Reconciled(len(missing), len(unmarked), len(orphans), store.resumable())
