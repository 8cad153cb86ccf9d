"""RAG_SAMPLE=icd10cm (what `make run` sets): the sample is indexed once, site-wide, and found."""
from __future__ import annotations

from appliance.rag import embedder as emb
from appliance.rag.library import Library
from appliance.rag.samples import SAMPLE_SIZE, SITE, load_sample


def test_the_sample_is_indexed_once_and_every_tenant_finds_it(tmp_path):
    lib = Library(tmp_path, emb.load("minilm"))
    try:
        assert load_sample(lib, "icd10cm", lambda: False) == SAMPLE_SIZE
        assert load_sample(lib, "icd10cm", lambda: False) == 0  # a restart adds nothing
        docs = lib.list("some-tenant", 1000, 0)
        assert len(docs) == SAMPLE_SIZE and all(d["shared"] and d["state"] == "ready" for d in docs)
        assert all(lib.store.get(d["document_id"]).tenant == SITE for d in docs)
        hits = lib.search("diabetes", 3, "some-tenant", None, "keyword")
        assert hits and all("diabetes" in h.title.lower() and h.metadata["source"] == "icd10cm" for h in hits)
    finally:
        lib.close()
