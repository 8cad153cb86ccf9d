"""The RAG document store: schema, ingestion states, full text, filters, visibility."""
import sqlite3
import threading

import pytest

from appliance.rag import store as store_mod
from appliance.rag.chunking import Chunk
from appliance.rag.store import DocStore, DuplicateDocument, FilterError, StoreError, fts_query


def chunks_of(*texts):
    out, pos = [], 0
    for t in texts:
        out.append(Chunk(pos, pos + len(t), t))
        pos += len(t) + 1
    return out


def add(st, doc_id, texts, tenant="t1", shared=False, metadata=None, ready=True, sha=None):
    keys = st.add_document(doc_id, tenant, shared, f"title {doc_id}", sha or f"sha-{doc_id}",
                           metadata or {}, sum(map(len, texts)), chunks_of(*texts))
    if ready:
        st.mark_embedded(keys)
        st.mark_ready(doc_id)
    return keys


@pytest.fixture
def st(tmp_path):
    s = DocStore(tmp_path / "rag.db")
    yield s
    s.close()


def test_schema_wal_and_version(st, tmp_path):
    db = sqlite3.connect(tmp_path / "rag.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == store_mod.SCHEMA_VERSION
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert {"documents", "chunks", "chunks_fts", "meta", "chunks_doc", "chunks_pending"} <= names
    db.close()


def test_reopen_keeps_data_and_newer_schema_is_refused(tmp_path):
    s = DocStore(tmp_path / "a.db")
    add(s, "d1", ["metformin dose"])
    s.set_embedder("test:x", 64)
    s.close()
    s = DocStore(tmp_path / "a.db")
    assert s.get("d1").state == "ready" and s.embedder() == ("test:x", 64)
    s.close()
    db = sqlite3.connect(tmp_path / "a.db")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match="schema 99"):
        DocStore(tmp_path / "a.db")


def test_missing_fts5_fails_clearly(tmp_path, monkeypatch):
    class NoFts:
        def execute(self, sql, *a):
            raise sqlite3.OperationalError("no such module: fts5")

        def close(self):
            pass
    monkeypatch.setattr(store_mod.sqlite3, "connect", lambda *a, **k: NoFts())
    with pytest.raises(StoreError, match="FTS5"):
        DocStore(tmp_path / "x.db")


def test_ingestion_states(st):
    keys = add(st, "d1", ["one", "two", "three"], ready=False, metadata={"ward": "icu"})
    assert keys == sorted(keys) and len(keys) == 3
    d = st.get("d1")
    assert (d.state, d.n_chunks, d.metadata, d.shared) == ("indexing", 3, {"ward": "icu"}, False)
    assert st.pending("d1") == [(keys[0], "one"), (keys[1], "two"), (keys[2], "three")]
    assert st.keyword("one", 5, "t1") == [] and st.visible_keys("t1") == set()   # not searchable yet
    st.mark_embedded(keys[:2])
    assert st.pending("d1") == [(keys[2], "three")]
    with pytest.raises(StoreError, match="1 chunks"):
        st.mark_ready("d1")
    st.mark_embedded(keys[2:])
    st.mark_ready("d1")
    assert st.get("d1").state == "ready" and st.visible_keys("t1") == set(keys)
    assert st.resumable() == []
    assert st.embedded_keys() == set(keys) == st.chunk_keys()


def test_duplicates(st):
    add(st, "d1", ["x"], sha="h")
    with pytest.raises(DuplicateDocument) as e:
        add(st, "d2", ["y"], sha="h")
    assert e.value.existing_id == "d1"
    with pytest.raises(DuplicateDocument, match="id taken"):
        add(st, "d1", ["y"], sha="other")
    add(st, "d3", ["x"], sha="h", tenant="t2")           # another tenant may hold the same file
    assert st.find_by_hash("t1", "h").id == "d1" and st.find_by_hash("t2", "h").id == "d3"
    assert st.get("d2") is None


def test_keyword_codes_drug_names_and_diacritics(st):
    k = add(st, "d1", ["Type 2 diabetes mellitus without complications, E11.9. Start metformin.",
                       "Type 2 diabetes with hyperglycemia E11.65",
                       "Ménière disease: vertigo, tinnitus",
                       "Amoxicillin for otitis media",
                       "Co-amoxiclav 625 mg three times daily"])
    assert st.keyword("E11.9", 5, "t1")[0][0] == k[0]
    assert [key for key, _ in st.keyword("E11.9", 5, "t1")] == [k[0]]          # not E11.65
    assert {key for key, _ in st.keyword("E11", 5, "t1")} == {k[0], k[1]}       # the category
    assert [key for key, _ in st.keyword("METFORMIN", 5, "t1")] == [k[0]]      # the period is no part of it
    assert [key for key, _ in st.keyword("meniere", 5, "t1")] == [k[2]]
    assert [key for key, _ in st.keyword("co-amoxiclav", 5, "t1")] == [k[4]]
    assert [key for key, _ in st.keyword("amoxicillin", 5, "t1")] == [k[3]]
    hits = st.keyword("diabetes hyperglycemia", 5, "t1")
    assert hits[0][0] == k[1] and {key for key, _ in hits} == {k[0], k[1]}      # ORed, best first
    assert hits[0][1] > hits[1][1]                                              # higher is better
    long = "acute " * 10 + "vertigo nausea vomiting dizziness unsteadiness giddiness"
    assert [key for key, _ in st.keyword(long, 5, "t1")] == [k[2]]              # partial match is enough


@pytest.mark.parametrize("q", ['"a" OR b* NEAR(', "text:metformin", "^metformin", 'metformin"', "NOT",
                               "AND OR NEAR", "(", "*", '""', "-metformin", "a AND", "{text}: x",
                               "metformin)", "'; DROP TABLE chunks; --", "\x00", "e11.9*"])
def test_injection_looking_queries_are_plain_text(st, q):
    k = add(st, "d1", ["metformin and a NEAR note", "text AND more"])
    got = st.keyword(q, 5, "t1")                     # never an FTS5 syntax error
    assert all(key in k for key, _ in got)
    assert st.chunk_keys() == set(k)


def test_fts_query_quotes_every_term():
    assert fts_query('"x" OR b* NEAR(') == '"x" OR "b" OR "NEAR"'  # "or": a function word, left out
    assert fts_query("fracture of the neck of the femur") == '"fracture" OR "neck" OR "femur"'
    assert fts_query("without complications, not on insulin") == '"without" OR "complications" OR "not" OR "insulin"'
    assert fts_query("of the") == '"of" OR "the"'  # nothing else: kept
    assert fts_query("E11.9 e11.9 co-amoxiclav") == '"E11.9" OR "co-amoxiclav"'
    assert fts_query("  ()*:^ ") == ""
    assert fts_query(" ".join(f"w{i}" for i in range(500))).count(" OR ") == store_mod.MAX_TERMS - 1


def test_visibility_and_listing(st):
    own = add(st, "own", ["shared secret alpha"], tenant="t1")
    other = add(st, "other", ["shared secret alpha"], tenant="t2", sha="x")
    site = add(st, "site", ["site alpha policy"], tenant="admin", shared=True)
    add(st, "pending", ["alpha pending"], tenant="t1", ready=False)
    assert {key for key, _ in st.keyword("alpha", 10, "t1")} == set(own + site)
    assert {key for key, _ in st.keyword("alpha", 10, "t2")} == set(other + site)
    assert st.visible_keys("t1") == set(own + site)
    assert st.visible_keys("nobody") == set(site)
    assert [d.id for d in st.list_documents("t1")] == ["pending", "site", "own"]    # newest first
    assert [d.id for d in st.list_documents("t1", limit=1, offset=1)] == ["site"]
    assert [d.id for d in st.list_documents("t2")] == ["site", "other"]
    assert st.resumable() == ["pending"]


def test_metadata_filters(st):
    a = add(st, "a", ["alpha text"], metadata={"ward": "icu", "year": 2024, "draft": False, "score": 1.5})
    b = add(st, "b", ["alpha text"], metadata={"ward": "er", "year": 2023, "draft": True})
    c = add(st, "c", ["alpha text"], metadata={"ward": "2024", "year": "2024"})
    kw = lambda f: {key for key, _ in st.keyword("alpha", 10, "t1", f)}
    assert kw({"ward": "icu"}) == set(a) == st.visible_keys("t1", {"ward": "icu"})
    assert kw({"year": 2024}) == set(a)                  # the number, not the string "2024"
    assert kw({"year": "2024"}) == set(c)
    assert kw({"year": 2024.0}) == set(a)
    assert kw({"draft": True}) == set(b) and kw({"draft": False}) == set(a)
    assert kw({"score": 1.5}) == set(a)
    assert kw({"ward": {"in": ["icu", "er"]}}) == set(a + b)
    assert kw({"year": {"in": [2023, "2024"]}}) == set(b + c)
    assert kw({"ward": {"in": []}}) == set()
    assert kw({"ward": "icu", "year": 2023}) == set()
    with pytest.raises(FilterError) as e:
        st.keyword("alpha", 10, "t1", {"wardd": "icu"})
    assert e.value.field == "wardd" and "no document" in e.value.message
    with pytest.raises(FilterError):
        st.visible_keys("t1", {"wardd": "icu"})
    for bad in ({"ward') OR 1=1 --": "x"}, {"$.ward": "x"}, {"1ward": "x"}, {"w" * 65: "x"},
                {"ward": None}, {"ward": ["icu"]}, {"ward": {"eq": "icu"}}, {"ward": {"in": "icu"}},
                {"ward": {"in": [{"x": 1}]}}, {"score": float("nan")}):
        with pytest.raises(FilterError):
            st.keyword("alpha", 10, "t1", bad)
    add(st, "x", ["beta"], tenant="t2", metadata={"secret_field": 1})
    with pytest.raises(FilterError):                     # another tenant's field is unknown here
        st.keyword("alpha", 10, "t1", {"secret_field": 1})


def test_delete_removes_chunks_and_fts_rows_and_keys_are_not_reused(st):
    k1 = add(st, "d1", ["metformin one", "metformin two"])
    assert st.delete("d1") == k1
    assert st.delete("d1") == []
    assert st.get("d1") is None and st.keyword("metformin", 5, "t1") == [] and st.chunk_keys() == set()
    fts = st._query("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH 'metformin'")[0][0]
    assert fts == 0
    k2 = add(st, "d2", ["metformin three"])
    assert min(k2) > max(k1)


def test_chunk_rows(st):
    k = add(st, "d1", ["first", "second"], metadata={"ward": "icu"})
    rows = st.chunk_rows(k + [999999])
    assert set(rows) == set(k)
    r = rows[k[1]]
    assert (r.doc_id, r.title, r.seq, r.start, r.end, r.text, r.metadata) == \
        ("d1", "title d1", 1, 6, 12, "second", {"ward": "icu"})


def test_reads_from_threads_during_writes(st):
    add(st, "base", ["alpha base"])
    errors, stop = [], threading.Event()

    def reader():
        try:
            while not stop.is_set():
                keys = {key for key, _ in st.keyword("alpha", 50, "t1")}
                assert keys <= st.chunk_keys() | keys
                st.visible_keys("t1")
        except Exception as e:      # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(30):
        add(st, f"d{i}", [f"alpha {i}", "beta"])
        if i % 3 == 0:
            st.delete(f"d{i}")
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(st.keyword("alpha", 100, "t1")) == 1 + 20


def test_writes_in_one_transaction_commit_together_or_not_at_all(st):
    with st.transaction():
        add(st, "a", ["alpha one"])
        add(st, "b", ["beta two"])
        assert st.get("a") is None  # readers see a transaction only once it commits
    assert st.get("a").state == st.get("b").state == "ready"
    assert len(st.visible_keys("t1")) == 2  # the allow-list cache saw the commit
    with pytest.raises(RuntimeError):
        with st.transaction():
            add(st, "c", ["gamma three"])
            raise RuntimeError("the ingestion failed half-way")
    assert st.get("c") is None and len(st.visible_keys("t1")) == 2
