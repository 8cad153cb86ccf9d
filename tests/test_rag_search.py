"""Retrieval: RRF, the three modes, filters, tenant isolation, crash reconciliation."""
import hashlib
import re

import numpy as np
import pytest

from appliance.rag.chunking import chunk
from appliance.rag.search import Retriever, reconcile, rrf
from appliance.rag.store import DocStore, FilterError
from appliance.rag.vectors import VectorIndex


class BowEmbedder:
    """Deterministic stand-in for the model: hashed bag of words, 64 dims, unit rows."""
    id, dim, max_tokens = "test:bow64", 64, 64

    def token_spans(self, text):
        return [m.span() for m in re.finditer(r"\w+", text)]

    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, int(hashlib.blake2s(w.encode(), digest_size=4).hexdigest(), 16) % self.dim] += 1
            out[i] /= max(np.linalg.norm(out[i]), 1e-12)
        return out


EMB = BowEmbedder()


def ingest(store, vectors, doc_id, text, tenant="t1", shared=False, metadata=None, finish=True):
    """What the RAG worker does: chunk, store, embed pending chunks, index, publish."""
    chunks = chunk(text, EMB.token_spans(text), max_tokens=24, overlap=4)
    store.add_document(doc_id, tenant, shared, doc_id.title(), hashlib.sha256(text.encode()).hexdigest(),
                       metadata or {}, len(text), chunks)
    if finish:
        resume(store, vectors, doc_id)


def resume(store, vectors, doc_id):
    todo = store.pending(doc_id)
    if todo:
        vectors.add([k for k, _ in todo], EMB.embed([t for _, t in todo]))
        store.mark_embedded([k for k, _ in todo])
    vectors.save()
    store.mark_ready(doc_id)


@pytest.fixture
def parts(tmp_path):
    store = DocStore(tmp_path / "rag.db")
    vectors = VectorIndex(tmp_path / "rag.usearch", EMB.dim, EMB.id)
    ingest(store, vectors, "diabetes", "Type 2 diabetes mellitus without complications is coded E11.9. "
           "First line treatment is metformin with lifestyle advice.", metadata={"ward": "endo", "year": 2024})
    ingest(store, vectors, "sepsis", "Sepsis bundle: take blood cultures, give broad spectrum antibiotics "
           "within one hour, measure lactate.", metadata={"ward": "icu", "year": 2023})
    ingest(store, vectors, "falls", "Falls prevention: assess gait, review sedative medication, "
           "provide non slip footwear.", metadata={"ward": "geriatrics", "year": 2024, "draft": True})
    ingest(store, vectors, "policy", "Hand hygiene policy applies to every ward and every visitor.",
           tenant="admin", shared=True, metadata={"ward": "all"})
    ingest(store, vectors, "secret", "Confidential: metformin trial protocol E11.9 sepsis lactate.",
           tenant="t2", metadata={"ward": "endo", "trial": True})
    yield store, vectors, Retriever(store, vectors, EMB)
    store.close()


def docs(hits):
    return [h.document_id for h in hits]


def test_rrf_arithmetic():
    got = rrf([[1, 2, 3], [3, 1]], k=60)
    assert [k for k, _ in got] == [1, 3, 2]
    assert got[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert got[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert got[2][1] == pytest.approx(1 / 62)
    assert rrf([[5, 6], [6, 5]], k=1) == [(5, pytest.approx(1 / 2 + 1 / 3)), (6, pytest.approx(1 / 3 + 1 / 2))]
    assert rrf([]) == [] and rrf([[], [9]]) == [(9, pytest.approx(1 / 61))]


def test_modes(parts):
    _, _, r = parts
    v = r.search("metformin diabetes treatment", 3, "t1", mode="vector")
    assert docs(v)[0] == "diabetes" and v[0].vector_rank == 1 and v[0].keyword_rank is None
    assert 0 < v[0].score <= 1.0 + 1e-6
    k = r.search("E11.9", 3, "t1", mode="keyword")
    assert docs(k) == ["diabetes"] and k[0].keyword_rank == 1 and k[0].score > 0
    h = r.search("lactate within one hour", 2, "t1", mode="hybrid")
    assert docs(h)[0] == "sepsis" and h[0].vector_rank == 1 and h[0].keyword_rank == 1
    assert h[0].score == pytest.approx(2 / 61)
    hit = h[0]
    text = parts[0].chunk_rows([hit.chunk_id])[hit.chunk_id].text
    assert hit.text == text and hit.title == "Sepsis" and hit.metadata == {"ward": "icu", "year": 2023}
    assert hit.end > hit.start >= 0
    with pytest.raises(ValueError):
        r.search("x", 3, "t1", mode="fuzzy")
    with pytest.raises(ValueError):
        r.search("x", 0, "t1")


def test_filters(parts):
    _, _, r = parts
    for mode in ("vector", "keyword", "hybrid"):
        got = r.search("ward medication metformin sepsis hygiene", 10, "t1", {"year": 2024}, mode=mode)
        assert set(docs(got)) <= {"diabetes", "falls"} and got
        got = r.search("ward medication metformin sepsis hygiene", 10, "t1",
                       {"ward": {"in": ["icu", "all"]}}, mode=mode)
        assert set(docs(got)) == {"sepsis", "policy"}
        assert docs(r.search("falls gait", 10, "t1", {"draft": True}, mode=mode)) == ["falls"]
        with pytest.raises(FilterError) as e:
            r.search("falls", 10, "t1", {"wards": "icu"}, mode=mode)
        assert e.value.field == "wards"
        with pytest.raises(FilterError):
            r.search("", 10, "t1", {"no such": 1}, mode=mode)


def test_tenant_isolation_and_shared_docs(parts):
    _, _, r = parts
    secret = "Confidential: metformin trial protocol E11.9 sepsis lactate."
    for mode in ("vector", "keyword", "hybrid"):
        for tenant in ("t1", "t3"):
            hits = r.search(secret, 50, tenant, mode=mode)
            assert "secret" not in docs(hits) and all("Confidential" not in h.text for h in hits)
        assert docs(r.search(secret, 1, "t2", mode=mode)) == ["secret"]
        assert "policy" in docs(r.search("hand hygiene visitor", 3, "t3", mode=mode))   # shared: everyone
        assert "policy" in docs(r.search("hand hygiene visitor", 3, "t2", mode=mode))
    for mode in ("vector", "keyword", "hybrid"):           # nor do t2's metadata fields
        with pytest.raises(FilterError):
            r.search("metformin", 5, "t1", {"trial": True}, mode=mode)
    assert docs(r.search("metformin", 5, "t2", {"trial": True})) == ["secret"]


def test_indexing_documents_are_never_returned(parts):
    store, vectors, r = parts
    ingest(store, vectors, "halfway", "Warfarin dosing nomogram for anticoagulation clinic.", finish=False)
    keys = [k for k, _ in store.pending("halfway")]
    vectors.add(keys, EMB.embed([t for _, t in store.pending("halfway")]))   # embedded, not yet ready
    store.mark_embedded(keys)
    for mode in ("vector", "keyword", "hybrid"):
        assert "halfway" not in docs(r.search("warfarin nomogram anticoagulation", 10, "t1", mode=mode))
    store.mark_ready("halfway")
    assert docs(r.search("warfarin nomogram", 1, "t1", mode="hybrid")) == ["halfway"]


@pytest.mark.parametrize("q", ['"a" OR b* NEAR(', "text:sepsis", "sepsis) OR (1", "^*", "", "   ",
                               "'; DELETE FROM chunks; --", 'NEAR("x" "y", 2)', "\x00\x01"])
def test_injection_looking_queries_are_safe(parts, q):
    store, _, r = parts
    before = store.chunk_keys()
    for mode in ("vector", "keyword", "hybrid"):
        hits = r.search(q, 5, "t1", mode=mode)
        assert "secret" not in docs(hits)
    assert store.chunk_keys() == before


def test_deleted_document_disappears(parts):
    store, vectors, r = parts
    assert "sepsis" in docs(r.search("sepsis lactate antibiotics", 10, "t1", mode="vector"))  # cached allow-list
    vectors.remove(store.delete("sepsis"))
    for mode in ("vector", "keyword", "hybrid"):
        assert "sepsis" not in docs(r.search("sepsis lactate antibiotics", 10, "t1", mode=mode))


def test_embedder_must_match_index(parts):
    store, vectors, _ = parts

    class Other(BowEmbedder):
        id = "test:other"
    with pytest.raises(ValueError, match="does not match"):
        Retriever(store, vectors, Other())


def test_reconcile_after_crash(parts, tmp_path):
    store, vectors, _ = parts

    def embed_pending(doc_id, mark=True):
        todo = store.pending(doc_id)
        vectors.add([k for k, _ in todo], EMB.embed([t for _, t in todo]))
        if mark:
            store.mark_embedded([k for k, _ in todo])
        return todo
    # 1. vectors added and saved, then the crash came before mark_embedded
    ingest(store, vectors, "unmarked", "Vancomycin trough levels and dosing.", finish=False)
    todo_unmarked = embed_pending("unmarked", mark=False)
    vectors.save()
    # 2. embedded and marked, but the index was not saved again before the crash
    ingest(store, vectors, "lost", "Insulin sliding scale for inpatients.", finish=False)
    todo_lost = embed_pending("lost")
    # 3. a document deleted from the store; the process died before the index's remove
    orphan_keys = store.delete("falls")
    # crash; start-up opens the index from disk and reconciles
    reopened = VectorIndex(tmp_path / "rag.usearch", EMB.dim, EMB.id)
    rep = reconcile(store, reopened)
    assert rep.unembedded == len(todo_lost)
    assert rep.marked == len(todo_unmarked)
    assert rep.removed == len(orphan_keys)
    assert rep.resume == ["unmarked", "lost"]               # oldest first
    assert store.embedder() == (EMB.id, EMB.dim)
    assert not any(reopened.contains(k) for k in orphan_keys)
    assert store.pending("lost") == todo_lost and store.pending("unmarked") == []
    assert not any(k in VectorIndex(tmp_path / "rag.usearch", EMB.dim, EMB.id).keys() for k in orphan_keys)
    for doc in rep.resume:                                  # the worker resumes them
        resume(store, reopened, doc)
    again = reconcile(store, VectorIndex(tmp_path / "rag.usearch", EMB.dim, EMB.id))
    assert again == (0, 0, 0, [])
    r = Retriever(store, reopened, EMB)
    assert docs(r.search("insulin sliding scale", 1, "t1", mode="vector")) == ["lost"]
    assert docs(r.search("vancomycin trough", 1, "t1", mode="hybrid")) == ["unmarked"]


def test_new_embedder_reembeds_everything(parts, tmp_path):
    store, vectors, _ = parts
    VectorIndex.discard(tmp_path / "rag.usearch")           # after IndexMismatch: a fresh index
    fresh = VectorIndex(tmp_path / "rag.usearch", EMB.dim, EMB.id)
    rep = reconcile(store, fresh)
    assert rep.unembedded == len(store.chunk_keys()) and set(rep.resume) == {
        "diabetes", "sepsis", "falls", "policy", "secret"}
