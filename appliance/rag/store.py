"""The RAG document store: documents, their chunks and a full-text index, in SQLite.

API (`DocStore(path)`; every method is safe to call from any thread):
    add_document(id, tenant, shared, title, sha256, metadata, chars, chunks) -> list[int]
    find_by_hash(tenant, sha256) -> Document | None
    pending(doc_id) -> list[(key, text)]          chunks not yet embedded, in order
    mark_embedded(keys); mark_unembedded(keys); mark_ready(doc_id)
    get(doc_id) -> Document | None
    list_documents(tenant, limit=50, offset=0) -> list[Document]   own + shared, newest first
    delete(doc_id) -> list[int]                   the chunk keys removed (drop them from the index)
    keyword(query, k, tenant, filters=None) -> list[(key, score)]  BM25, higher is better
    visible_keys(tenant, filters=None) -> frozenset[int] (cached until a document turns ready or goes)
    chunk_rows(keys) -> {key: ChunkRow}
    embedded_keys() / chunk_keys() -> set[int]; resumable() -> list[doc_id]
    embedder() -> (id, dim) | None; set_embedder(id, dim)
    close()

Visibility: a tenant sees its own documents and the shared (site-wide) ones; search
(`keyword`, `visible_keys`) sees only documents in state 'ready', so a half-embedded
document never answers. `list_documents` and `get` show 'indexing' ones too, so an
operator can watch ingestion.

Concurrency: SQLite in WAL mode, so readers never wait for the writer. A read borrows an
idle reader connection from a small pool (one per concurrent reader, whatever the thread,
so short-lived threads leak nothing); writes go through one connection under a lock,
each in one `BEGIN IMMEDIATE` transaction (an ingested document is all there or not at
all). synchronous=FULL: a document acknowledged as added survives a power cut. Each
method is one statement or one transaction; a search that spans several calls
(visible_keys, then chunk_rows) may see a delete in between, and drops what vanished.

Keys: chunks.key is INTEGER PRIMARY KEY AUTOINCREMENT, so a key is never reused after a
delete. The vector index is keyed by it; were keys reused, a vector left behind by a
crash between `delete` and the index's `remove` would be taken for a new chunk's.

Full text: an FTS5 table with external content (content='chunks') kept in step by
triggers. Not contentless: SQLite < 3.43 cannot delete from a contentless table, and the
text is stored once either way. Tokenizer `unicode61 remove_diacritics 2` (case and
accents folded, "Ménière" finds "meniere") with the default separators, deliberately:
adding '.' or '-' to tokenchars would glue sentence ends to words ("metformin." would
no longer match "metformin"). Codes and hyphenated drug names are handled on the query
side instead: every user term is one quoted FTS5 phrase, so "E11.9" is the phrase
e11+9 (it matches "E11.9" exactly, not E11.65), "co-amoxiclav" is co+amoxiclav, and a
bare "E11" still finds the whole E11 category.
"""
from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import msgspec

from .chunking import Chunk

__all__ = ["DocStore", "Document", "ChunkRow", "FilterError", "DuplicateDocument", "StoreError",
           "fts_query"]

SCHEMA_VERSION = 1
MAX_TERMS = 64        # query terms ORed together; a pasted paragraph is cut here
MAX_IN = 1000         # values of one {"in": [...]} filter
STOPWORDS = frozenset(("a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "in", "into", "is", "it",
                       "its", "of", "on", "or", "than", "that", "the", "their", "this", "to", "was", "were",
                       "which", "with"))
VISIBLE_CACHE = 256   # (tenant, filters) allow-lists kept for vector search
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
# A term: letters/digits, possibly joined by . - / ' + (E11.9, co-amoxiclav, 5-FU, Crohn's)
_TERM = re.compile(r"\w+(?:[.\-/'+]\w+)*")


class StoreError(RuntimeError):
    """The store cannot be opened or used (no FTS5, a newer schema...)."""


class FilterError(ValueError):
    """A metadata filter the store refuses; the API answers 422 invalid_field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"filter {field!r}: {message}")
        self.field, self.message = field, message


class DuplicateDocument(ValueError):
    """The tenant already has this content (same sha256), or the id is taken."""

    def __init__(self, existing_id: str, why: str):
        super().__init__(f"document {existing_id!r} already exists ({why})")
        self.existing_id, self.why = existing_id, why


class Document(msgspec.Struct, frozen=True):
    id: str
    tenant: str
    shared: bool
    title: str
    sha256: str
    metadata: dict[str, Any]
    chars: int
    n_chunks: int
    state: str          # 'indexing' | 'ready'
    created_at: float


class ChunkRow(NamedTuple):
    doc_id: str
    title: str
    seq: int
    start: int
    end: int
    text: str
    metadata: dict[str, Any]


def _v1(db: sqlite3.Connection) -> None:
    for sql in (
        """CREATE TABLE documents (
             id TEXT PRIMARY KEY, tenant TEXT NOT NULL, shared INTEGER NOT NULL DEFAULT 0,
             title TEXT NOT NULL, sha256 TEXT NOT NULL,
             metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_type(metadata) = 'object'),
             chars INTEGER NOT NULL, n_chunks INTEGER NOT NULL,
             state TEXT NOT NULL CHECK (state IN ('indexing', 'ready')),
             created_at REAL NOT NULL, UNIQUE (tenant, sha256))""",
        "CREATE INDEX documents_shared ON documents(shared) WHERE shared = 1",
        "CREATE INDEX documents_listing ON documents(tenant, created_at)",
        """CREATE TABLE chunks (
             key INTEGER PRIMARY KEY AUTOINCREMENT,
             doc_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
             seq INTEGER NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
             text TEXT NOT NULL, embedded INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX chunks_doc ON chunks(doc_id, seq)",
        "CREATE INDEX chunks_pending ON chunks(doc_id) WHERE embedded = 0",
        """CREATE VIRTUAL TABLE chunks_fts USING fts5(text, content='chunks', content_rowid='key',
             tokenize='unicode61 remove_diacritics 2')""",
        """CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
             INSERT INTO chunks_fts(rowid, text) VALUES (new.key, new.text); END""",
        """CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
             INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.key, old.text); END""",
        """CREATE TRIGGER chunks_au AFTER UPDATE OF text ON chunks BEGIN
             INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.key, old.text);
             INSERT INTO chunks_fts(rowid, text) VALUES (new.key, new.text); END""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ):
        db.execute(sql)


# Version N's function takes the schema from N-1 to N. Never edit a shipped one: add N+1.
_MIGRATIONS = {1: _v1}


def _require_fts5() -> None:
    probe = sqlite3.connect(":memory:")
    try:
        probe.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='unicode61 remove_diacritics 2')")
        probe.execute("SELECT json_extract('{\"a\":1}', '$.a')")
    except sqlite3.OperationalError as e:
        raise StoreError(f"this Python's SQLite {sqlite3.sqlite_version} lacks FTS5 or JSON ({e}); "
                         f"the RAG store needs both (any SQLite >= 3.38 built with FTS5)") from None
    finally:
        probe.close()


def fts_query(text: str) -> str:
    """Free text -> a safe FTS5 MATCH expression, or '' when it has no terms.

    User text is never parsed as FTS5 syntax: terms are extracted by a regex (which drops
    quotes, parentheses, '*', ':' and '^') and each is written as a double-quoted string,
    so OR/NEAR/NOT in the text are plain words. The terms are ORed, not ANDed, so a long
    query (a list of inclusion terms) still finds chunks that match part of it; BM25's
    IDF keeps common words from dominating the ranking. Function words ("of", "the")
    are left out unless nothing else is left: each matches nearly every chunk, which
    BM25 then has to score (16-19 ms of a search at 10k chunks) for no ranking gain.
    Negations ("no", "not", "without") are kept: in clinical text they carry meaning.
    """
    seen: dict[str, str] = {}
    for term in _TERM.findall(text):
        seen.setdefault(term.casefold(), term)
        if len(seen) >= MAX_TERMS:
            break
    terms = [t for key, t in seen.items() if key not in STOPWORDS] or list(seen.values())
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def _json_list(keys: Iterable[int]) -> str:
    return json.dumps([int(k) for k in keys])


class DocStore:
    def __init__(self, path: str | Path):
        _require_fts5()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conns: list[sqlite3.Connection] = []     # all, to close them
        self._idle: list[sqlite3.Connection] = []      # readers not in use
        self._conns_lock = threading.Lock()
        self._wlock = threading.Lock()
        self._tx = threading.local()  # this thread's open transaction, which nested writes join
        self._closed = False
        self._w = self._connect()
        self._w.execute("PRAGMA journal_mode=WAL")
        self._migrate()
        self._visibility = 0  # bumped when what a search may see changes (a document ready or deleted)
        self._visible_cache: dict[tuple[str, str], tuple[int, frozenset[int]]] = {}

    # -- connections -------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                             timeout=10.0)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        with self._conns_lock:
            if self._closed:
                db.close()
                raise StoreError("store is closed")
            self._conns.append(db)
        return db

    def _query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        """Run a read on an idle reader connection (one is made when none is idle, so there
        are as many as concurrent readers, whichever threads they come from)."""
        with self._conns_lock:
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = self._connect()
        try:
            return db.execute(sql, params).fetchall()
        finally:
            with self._conns_lock:
                if not self._closed:
                    self._idle.append(db)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a write inside this thread's open transaction joins it."""
        if getattr(self._tx, "db", None) is not None:
            yield self._tx.db
            return
        with self._wlock:
            if self._closed:
                raise StoreError("store is closed")
            db = self._w
            db.execute("BEGIN IMMEDIATE")
            self._tx.db, self._tx.visible_changed = db, False
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:       # also after a failed COMMIT (disk full, I/O error)
                    db.execute("ROLLBACK")
                raise
            finally:
                self._tx.db = None
            if self._tx.visible_changed:    # after the commit: a reader never caches the old state anew
                self._visibility += 1

    def transaction(self):
        """Several writes, one commit (one fsync): an ingestion of 64 small documents
        made 128 commits, each an fsync on the disk the broker's journal shares."""
        return self._write()

    def close(self) -> None:
        with self._wlock, self._conns_lock:
            self._closed = True
            for db in self._conns:
                db.close()
            self._conns.clear()
            self._idle.clear()

    def _migrate(self) -> None:
        version = self._w.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"RAG store {self.path} has schema {version}; this build knows up to "
                             f"{SCHEMA_VERSION} (a newer appliance wrote it)")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            with self._write() as db:
                _MIGRATIONS[v](db)
                db.execute(f"PRAGMA user_version={v}")

    # -- ingestion ---------------------------------------------------------------------
    def add_document(self, id: str, tenant: str, shared: bool, title: str, sha256: str,
                     metadata: Mapping[str, Any], chars: int, chunks: Sequence[Chunk]) -> list[int]:
        """Insert a document (state 'indexing') and its chunks in one transaction; the
        chunk keys in order. DuplicateDocument if the id is taken or the tenant already
        has a document with this sha256 (check `find_by_hash` first to answer nicely)."""
        meta = json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False)
        try:
            with self._write() as db:
                db.execute("INSERT INTO documents VALUES (?,?,?,?,?,?,?,?,'indexing',?)",
                           (id, tenant, int(bool(shared)), title, sha256, meta, chars, len(chunks),
                            time.time()))
                return [db.execute('INSERT INTO chunks(doc_id, seq, start, "end", text) '
                                   "VALUES (?,?,?,?,?) RETURNING key", (id, i, c.start, c.end, c.text)
                                   ).fetchone()[0] for i, c in enumerate(chunks)]
        except sqlite3.IntegrityError:
            dup = self.find_by_hash(tenant, sha256)
            if dup is not None:
                raise DuplicateDocument(dup.id, "same content") from None
            if self.get(id) is not None:
                raise DuplicateDocument(id, "id taken") from None
            raise

    def pending(self, doc_id: str) -> list[tuple[int, str]]:
        return self._query("SELECT key, text FROM chunks WHERE doc_id = ? AND embedded = 0 ORDER BY seq",
                           (doc_id,))

    def _set_embedded(self, keys: Iterable[int], value: int) -> None:
        with self._write() as db:
            db.execute("UPDATE chunks SET embedded = ? WHERE key IN (SELECT value FROM json_each(?))",
                       (value, _json_list(keys)))

    def mark_embedded(self, keys: Iterable[int]) -> None:
        """Call after the vectors are in the index (the index's save may come later:
        `search.reconcile` repairs the difference after a crash)."""
        self._set_embedded(keys, 1)

    def mark_unembedded(self, keys: Iterable[int]) -> None:
        self._set_embedded(keys, 0)

    def mark_ready(self, doc_id: str) -> None:
        """Make a document searchable. Refused while chunks are still pending, so a bug in
        the caller cannot publish a document that vector search half-misses."""
        with self._write() as db:
            left = db.execute("SELECT count(*) FROM chunks WHERE doc_id = ? AND embedded = 0",
                              (doc_id,)).fetchone()[0]
            if left:
                raise StoreError(f"document {doc_id!r} still has {left} chunks to embed")
            if db.execute("UPDATE documents SET state = 'ready' WHERE id = ?", (doc_id,)).rowcount != 1:
                raise KeyError(doc_id)
            self._tx.visible_changed = True

    def delete(self, doc_id: str) -> list[int]:
        """Remove a document, its chunks and their FTS rows; the keys to drop from the
        vector index ([] if there was no such document)."""
        with self._write() as db:
            keys = [k for (k,) in db.execute("DELETE FROM chunks WHERE doc_id = ? RETURNING key", (doc_id,))]
            db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
            self._tx.visible_changed = True
        return sorted(keys)

    # -- documents ---------------------------------------------------------------------
    _DOC = "SELECT id, tenant, shared, title, sha256, metadata, chars, n_chunks, state, created_at FROM documents"

    @staticmethod
    def _doc(row: tuple) -> Document:
        return Document(row[0], row[1], bool(row[2]), row[3], row[4], json.loads(row[5]), *row[6:])

    def get(self, doc_id: str) -> Document | None:
        rows = self._query(self._DOC + " WHERE id = ?", (doc_id,))
        return self._doc(rows[0]) if rows else None

    def find_by_hash(self, tenant: str, sha256: str) -> Document | None:
        rows = self._query(self._DOC + " WHERE tenant = ? AND sha256 = ?", (tenant, sha256))
        return self._doc(rows[0]) if rows else None

    def list_documents(self, tenant: str, limit: int = 50, offset: int = 0) -> list[Document]:
        rows = self._query(self._DOC + " WHERE tenant = ? OR shared = 1 "
                           "ORDER BY created_at DESC, id LIMIT ? OFFSET ?", (tenant, limit, offset))
        return [self._doc(r) for r in rows]

    # -- search ------------------------------------------------------------------------
    def _visible(self, tenant: str, filters: Mapping[str, Any] | None) -> tuple[str, list]:
        """SQL (over `documents d`) for: ready, the tenant's own or shared, matching filters."""
        sql, params = ["d.state = 'ready' AND (d.tenant = ? OR d.shared = 1)"], [tenant]
        for field, cond in (filters or {}).items():
            clause, p = self._filter(tenant, field, cond)
            sql.append(clause)
            params += p
        return " AND ".join(sql), params

    def _filter(self, tenant: str, field: Any, cond: Any) -> tuple[str, list]:
        """One filter as SQL. The JSON path is a bound parameter built from a field name
        that matched _FIELD; values are compared by JSON type (True is not 1, "5" is not 5)."""
        if not isinstance(field, str) or not _FIELD.match(field):
            raise FilterError(str(field), "field names are letters, digits and _ (at most 64, not starting with a digit)")
        if isinstance(cond, dict):
            if set(cond) != {"in"} or not isinstance(cond["in"], list):
                raise FilterError(field, 'a condition is a value or {"in": [values]}')
            values = cond["in"]
            if len(values) > MAX_IN:
                raise FilterError(field, f"at most {MAX_IN} values in 'in'")
        else:
            values = [cond]
        groups: dict[str, list] = {"text": [], "number": [], "true": [], "false": []}
        for v in values:
            if isinstance(v, bool):
                groups["true" if v else "false"].append(v)
            elif isinstance(v, (int, float)) and math.isfinite(v):
                groups["number"].append(v)
            elif isinstance(v, str):
                groups["text"].append(v)
            else:
                raise FilterError(field, f"values are strings, numbers or booleans, not {type(v).__name__}")
        path = "$." + field
        if not self._query("SELECT 1 FROM documents WHERE (tenant = ? OR shared = 1) "
                           "AND json_type(metadata, ?) IS NOT NULL LIMIT 1", (tenant, path)):
            raise FilterError(field, "no document has this metadata field")
        ors, params = [], []
        if groups["text"]:
            ors.append("(json_type(d.metadata, ?) = 'text' AND json_extract(d.metadata, ?) IN "
                       "(SELECT value FROM json_each(?)))")
            params += [path, path, json.dumps(groups["text"])]
        if groups["number"]:
            ors.append("(json_type(d.metadata, ?) IN ('integer', 'real') AND json_extract(d.metadata, ?) IN "
                       "(SELECT value FROM json_each(?)))")
            params += [path, path, json.dumps(groups["number"])]
        for t in ("true", "false"):
            if groups[t]:
                ors.append("json_type(d.metadata, ?) = ?")
                params += [path, t]
        return ("(" + " OR ".join(ors) + ")" if ors else "0"), params

    def keyword(self, query: str, k: int, tenant: str,
                filters: Mapping[str, Any] | None = None) -> list[tuple[int, float]]:
        """BM25 over the visible chunks: [(key, score)] best first; score = -bm25, so
        higher is better (SQLite's bm25 is lower-is-better)."""
        where, params = self._visible(tenant, filters)    # validates the filters first
        expr = fts_query(query)
        if not expr or k <= 0:
            return []
        rows = self._query(
            "SELECT c.key, bm25(chunks_fts) AS r FROM chunks_fts JOIN chunks c ON c.key = chunks_fts.rowid "
            f"JOIN documents d ON d.id = c.doc_id WHERE chunks_fts MATCH ? AND {where} ORDER BY r LIMIT ?",
            [expr, *params, k])
        return [(key, -r) for key, r in rows]

    def visible_keys(self, tenant: str, filters: Mapping[str, Any] | None = None) -> frozenset[int]:
        """Keys of every chunk the tenant may retrieve (the allow-list for vector search).

        Cached per (tenant, filters) until a document turns ready or is deleted (the only
        writes that change what is visible): reading 12,000 keys costs ~12 ms, most of a
        search's time, and a tenant's searches mostly ask for the same set. A cached
        answer was valid when made, and only a delete can make a filter field unknown."""
        cache_key = (tenant, json.dumps(filters, sort_keys=True) if filters else "")
        generation = self._visibility
        hit = self._visible_cache.get(cache_key)
        if hit is not None and hit[0] == generation:
            return hit[1]
        where, params = self._visible(tenant, filters)
        keys = frozenset(k for (k,) in self._query(
            f"SELECT c.key FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE {where}", params))
        if len(self._visible_cache) >= VISIBLE_CACHE:
            self._visible_cache.clear()
        self._visible_cache[cache_key] = (generation, keys)
        return keys

    def chunk_rows(self, keys: Iterable[int]) -> dict[int, ChunkRow]:
        """The rows of `keys` that still exist (a key deleted meanwhile is simply absent)."""
        rows = self._query(
            'SELECT c.key, c.doc_id, d.title, c.seq, c.start, c."end", c.text, d.metadata '
            "FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE c.key IN (SELECT value FROM json_each(?))",
            (_json_list(keys),))
        return {r[0]: ChunkRow(*r[1:7], json.loads(r[7])) for r in rows}

    # -- reconciliation ----------------------------------------------------------------
    def embedded_keys(self) -> set[int]:
        return {k for (k,) in self._query("SELECT key FROM chunks WHERE embedded = 1")}

    def chunk_keys(self) -> set[int]:
        return {k for (k,) in self._query("SELECT key FROM chunks")}

    def resumable(self) -> list[str]:
        """Documents the worker must (re)embed or publish: 'indexing' ones, and any with
        chunks not embedded (after `mark_unembedded` by reconciliation), oldest first."""
        return [i for (i,) in self._query(
            "SELECT id FROM documents WHERE state = 'indexing' OR id IN "
            "(SELECT doc_id FROM chunks WHERE embedded = 0) ORDER BY created_at, id")]

    def embedder(self) -> tuple[str, int] | None:
        rows = dict(self._query("SELECT key, value FROM meta WHERE key IN ('embedder_id', 'embedder_dim')"))
        return (rows["embedder_id"], int(rows["embedder_dim"])) if len(rows) == 2 else None

    def set_embedder(self, embedder_id: str, dim: int) -> None:
        with self._write() as db:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [("embedder_id", embedder_id), ("embedder_dim", str(int(dim)))])
