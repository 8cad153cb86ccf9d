"""The vector index: usearch HNSW (cosine, f32) keyed by the store's chunk keys.

API:
    VectorIndex(path, dim, embedder_id)       restores `path` if it exists
    add(keys, vectors); remove(keys) -> int;  search(vector, k, allowed=None) -> [(key, similarity)]
    save(); compact() -> bool; start_compaction() -> Thread; deleted_fraction; contains(key);
    keys() -> set[int]; len(); VectorIndex.discard(path)

Which model made the vectors is kept in a JSON sidecar (`<path>.json`, written
atomically): an index opened with another embedder id or dim raises IndexMismatch, since
vectors of two models do not share a space. The caller then discards the files and
reindexes (reconciliation re-embeds every chunk the new, empty index lacks).

Thread safety: every method may be called from any thread. One lock guards the usearch
object: usearch grows its storage during `add`, which is not safe beside a search, and
the GIL is held during a search anyway, so a lock costs searches no parallelism. Writes
are expected one at a time (the worker serialises them) but are safe regardless.

Filtered search (`allowed`, the tenant's visible keys): up to EXACT_MAX allowed keys,
their vectors are fetched and scored exactly (~1.5 us a key: 1.3 ms for 1,000, 16 ms
for 4,000 in a 10k index), so a small tenant gets exact results however large the index;
beyond that the ANN search is oversampled by the allowed fraction (2x the expected
count, at least 4k) and grown x4 until k allowed keys are found (0.5 ms for k=40 with
8,000 of 10,000 keys allowed). An ANN search for a quarter of the index or more is done
by brute force instead (usearch `exact=True`), which is then both cheaper and exact.

Compaction: usearch's `remove` only marks slots deleted (they stay in the file and the
graph). `compact` builds a fresh index from the live vectors aside, holding the lock only
to copy batches out, while writes keep going to the live index and are journalled; under
the lock the journal is replayed onto the new index and the two are swapped. Replay is
correct whatever the interleaving: a key the journal does not touch still has the vector
copied, and for one it does touch the last add/remove wins.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Collection, Iterable

import numpy as np
from usearch.index import Index  # appliance.rag.__init__ imported onnxruntime first (see there)

__all__ = ["VectorIndex", "IndexMismatch", "EXACT_MAX"]

EXACT_MAX = 2048        # allowed keys scored exactly rather than through the graph
_COPY_BATCH = 512       # vectors copied per lock hold during compaction (~1 ms)
_FORMAT = 1


class IndexMismatch(RuntimeError):
    """The index on disk cannot serve this embedder: built by another one (or dim), of
    unknown origin (no sidecar), or damaged. The remedy is the same for all: `discard`
    it, open a fresh one, and `search.reconcile` makes every chunk be embedded again."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes | bytearray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _keys(keys: Iterable[int]) -> np.ndarray:
    return np.fromiter((int(k) for k in keys), dtype=np.uint64)


class VectorIndex:
    def __init__(self, path: str | Path, dim: int, embedder_id: str):
        self.path, self.dim, self.embedder_id = Path(path), int(dim), embedder_id
        self.sidecar = self.path.with_name(self.path.name + ".json")
        self._lock = threading.Lock()
        self._compacting = threading.Lock()
        self._saving = threading.Lock()    # file writes in order; taken before _lock, never after
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None
        self._meta = want = {"format": _FORMAT, "embedder_id": embedder_id, "dim": self.dim,
                             "metric": "cos", "dtype": "f32"}
        if self.path.exists():
            try:
                have = json.loads(self.sidecar.read_text())
            except (OSError, ValueError):
                raise IndexMismatch(f"vector index {self.path} has no readable {self.sidecar.name}: "
                                    f"which embedder built it is unknown; discard it and reindex") from None
            if have != want:
                raise IndexMismatch(
                    f"vector index {self.path} was built by embedder {have.get('embedder_id')!r} "
                    f"(dim {have.get('dim')}), not {embedder_id!r} (dim {self.dim}): discard it and reindex")
            try:
                index = Index.restore(str(self.path))
            except (RuntimeError, ValueError) as e:     # truncated or not a usearch file
                raise IndexMismatch(f"vector index {self.path} is damaged ({e}); discard it and reindex") from None
            if index is None or index.ndim != self.dim:
                raise IndexMismatch(f"vector index {self.path} is unreadable or not {self.dim}-d; discard it and reindex")
            self._index = index
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.sidecar, json.dumps(want).encode())
            self._index = self._new()

    def _new(self) -> Index:
        return Index(ndim=self.dim, metric="cos", dtype="f32")

    @staticmethod
    def discard(path: str | Path) -> None:
        """Delete an index and its sidecar (after IndexMismatch, before reindexing)."""
        p = Path(path)
        for f in (p, p.with_name(p.name + ".json"), p.with_name(p.name + ".tmp")):
            f.unlink(missing_ok=True)

    # -- writes ------------------------------------------------------------------------
    def add(self, keys: Iterable[int], vectors: np.ndarray) -> None:
        """Add vectors, replacing any a key already has. Rows need not be unit length:
        the metric is cosine, and exact scoring normalises them too."""
        k = _keys(keys)
        v = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(k), self.dim)
        with self._lock:
            _upsert(self._index, k, v)
            if self._journal is not None:
                self._journal.append(("add", k, v))

    def remove(self, keys: Iterable[int]) -> int:
        """Remove keys (absent ones are ignored); how many were present."""
        k = _keys(keys)
        with self._lock:
            n = int(self._index.remove(k)) if len(k) else 0
            if self._journal is not None:
                self._journal.append(("remove", k, None))
        return n

    def save(self) -> None:
        """Write the index atomically (tmp file, fsync, rename, fsync the directory). The
        lock is held only to serialise it into memory (~15 MB per 10k 384-d vectors)."""
        with self._saving:
            with self._lock:
                data = self._index.save()
            if not self.sidecar.exists():       # lost meanwhile: this instance knows what built it
                _atomic_write(self.sidecar, json.dumps(self._meta).encode())
            _atomic_write(self.path, data)

    # -- reads -------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def contains(self, key: int) -> bool:
        with self._lock:
            return int(key) in self._index

    def keys(self) -> set[int]:
        with self._lock:
            return {int(k) for k in np.asarray(self._index.keys)}

    @property
    def deleted_fraction(self) -> float:
        """Share of the index's slots that hold removed vectors (0 when empty)."""
        with self._lock:
            slots = self._index.stats.nodes    # live + deleted slots (a re-add reuses one)
            return max(0.0, 1.0 - len(self._index) / slots) if slots else 0.0

    def search(self, vector: np.ndarray, k: int, allowed: Collection[int] | None = None) -> list[tuple[int, float]]:
        """The k nearest keys to `vector` by cosine similarity (1 = same direction), best
        first, among `allowed` when given (None: every key in the index)."""
        q = np.asarray(vector, dtype=np.float32).reshape(self.dim)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        if k <= 0 or (allowed is not None and not allowed):
            return []
        if allowed is not None and len(allowed) <= EXACT_MAX:
            return self._exact(q, k, allowed)
        if allowed is not None and not isinstance(allowed, (set, frozenset)):
            allowed = set(allowed)
        with self._lock:
            total = len(self._index)
            if not total:
                return []
            want = k if allowed is None else max(4 * k, int(2 * k * total / len(allowed)))
            while True:
                want = min(want, total)
                # Asked for a quarter of the index or more, brute force is cheaper than the
                # graph (measured: 10k x 384-d, 2,000 results: 1.7 ms exact, 3.3 ms HNSW) and exact.
                m = self._index.search(q, want, exact=4 * want >= total)
                hits = [(key, 1.0 - d) for key, d in zip(m.keys.tolist(), m.distances.tolist())
                        if allowed is None or key in allowed]
                if len(hits) >= k or want >= total:
                    return hits[:k]
                want *= 4

    def _exact(self, q: np.ndarray, k: int, allowed: Collection[int]) -> list[tuple[int, float]]:
        keys = _keys(allowed)
        with self._lock:
            present = keys[self._index.contains(keys)]
            if not len(present):
                return []
            got = self._index.get(present)
        rows = np.stack(got) if isinstance(got, tuple) else np.asarray(got).reshape(-1, self.dim)
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        sims = rows @ q
        top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
        top = top[np.lexsort((present[top], -sims[top]))]
        return [(int(present[i]), float(sims[i])) for i in top]

    # -- compaction --------------------------------------------------------------------
    def compact(self) -> bool:
        """Rebuild the index without its deleted slots and save it; searches and writes go
        on meanwhile. False if another compaction is already running."""
        if not self._compacting.acquire(blocking=False):
            return False
        try:
            with self._lock:
                keys = np.asarray(self._index.keys, dtype=np.uint64).copy()
                self._journal = []
            try:
                fresh = self._new()
                for i in range(0, len(keys), _COPY_BATCH):
                    batch = keys[i:i + _COPY_BATCH]
                    with self._lock:            # removed meanwhile: get gives None
                        got = self._index.get(batch)
                    got = got if isinstance(got, tuple) else (got,)
                    live = [j for j, g in enumerate(got) if g is not None]
                    if live:                    # the slow part, outside the lock (releases the GIL)
                        fresh.add(batch[live], np.stack([got[j] for j in live]))
                with self._saving:              # no other save may land between swap and write
                    with self._lock:
                        for op, k, v in self._journal:
                            if op == "add":
                                _upsert(fresh, k, v)
                            else:
                                fresh.remove(k)
                        self._index, self._journal = fresh, None
                        data = fresh.save()
                    _atomic_write(self.path, data)
            finally:
                with self._lock:
                    self._journal = None
            return True
        finally:
            self._compacting.release()

    def start_compaction(self) -> threading.Thread:
        t = threading.Thread(target=self.compact, name="rag-compact", daemon=True)
        t.start()
        return t


def _upsert(index: Index, keys: np.ndarray, vectors: np.ndarray) -> None:
    if not len(keys):
        return
    old = keys[index.contains(keys)]
    if len(old):
        index.remove(old)
    index.add(keys, vectors)
