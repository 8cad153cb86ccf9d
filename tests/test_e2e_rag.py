"""Retrieval through the running appliance: the real embedder (MiniLM, ONNX), SQLite +
FTS5, usearch, the broker's `rag` service, and the tiny model writing the answers.

One appliance for the module; each test uses documents of its own tenants, so the
tests do not depend on one another's documents.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conftest import running_appliance, wait_until

DOCS = {
    "metformin": ("Type 2 diabetes: first-line therapy",
                  "Metformin is the first-line drug for type 2 diabetes mellitus (ICD-10-CM E11.9) unless the "
                  "eGFR is below 30 mL/min. Start with 500 mg once daily with the evening meal and increase "
                  "slowly to limit gastrointestinal side effects."),
    "heart": ("Acute coronary syndrome pathway",
              "A patient with crushing chest pain radiating to the left arm and ST elevation on the ECG is "
              "treated as a myocardial infarction: call the cardiac catheterisation team, give aspirin 300 mg "
              "and obtain troponin."),
    "fracture": ("Hip fracture in older adults",
                 "A fall with a shortened, externally rotated leg suggests a fracture of the neck of the femur. "
                 "Give analgesia, X-ray the hip and plan surgery within 36 hours."),
}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_appliance(tmp_path_factory, RAG_COMPACT_PCT="5", RAG_MAX_DOC_CHARS="60000",
                           RAG_CHUNK_TOKENS="64", RAG_CHUNK_OVERLAP="16") as a:
        a.writer = lambda tenant: a.auth(a.mint(tenant, "rag:read", "rag:write", "tasks:read", "tasks:write"))
        a.admin = a.auth(a.mint("root", "admin"))
        yield a


def ingest(app, headers, title, text, **extra) -> dict:
    """POST a document and wait for its task's end; the task's final record."""
    r = app.post("/v1/rag/documents", json={"title": title, "text": text, **extra}, headers=headers)
    assert r.status_code == 202, r.text
    body = r.json()
    rec = wait_until(lambda: _final(app, headers, body["task_id"]), 120, 0.1, f"ingestion of {title}")
    assert rec["state"] == "completed", rec
    return {**body, "record": rec}


def _final(app, headers, task_id):
    rec = app.get(f"/v1/async/result/{task_id}", headers=headers).json()
    return rec if rec.get("state") in ("completed", "failed", "cancelled", "expired") else None


def search(app, headers, query, mode="hybrid", k=3, **extra):
    r = app.post("/v1/rag/search", json={"query": query, "mode": mode, "k": k, **extra}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["hits"]


def titles(hits) -> list[str]:
    return [h["title"] for h in hits]


def test_ingestion_runs_through_the_queue_at_batch_priority_and_lists_the_document(app):
    h = app.writer("clinic-a")
    done = ingest(app, h, *DOCS["metformin"], metadata={"ward": "endocrinology", "year": 2026})
    status = app.get(f"/v1/async/status/{done['task_id']}", headers=h).json()
    assert (status["type"], status["priority"], status["model"]) == ("rag_ingest", "batch", "rag")
    doc = done["record"]["result"]["data"]
    assert doc["document_id"] == done["document_id"] and doc["state"] == "ready" and doc["chunks"] >= 1
    listed = app.get("/v1/rag/documents", headers=h).json()["documents"]
    assert [d["document_id"] for d in listed] == [done["document_id"]]
    one = app.get(f"/v1/rag/documents/{done['document_id']}", headers=h).json()
    assert one["metadata"] == {"ward": "endocrinology", "year": 2026} and one["title"] == DOCS["metformin"][0]
    again = app.post("/v1/rag/documents", json={"title": "again", "text": DOCS["metformin"][1]}, headers=h).json()
    assert again["document_id"] == done["document_id"]  # the same text is the same document
    wait_until(lambda: _final(app, h, again["task_id"]), 30, 0.1, "the repeated ingestion")
    assert len(app.get("/v1/rag/documents", headers=h).json()["documents"]) == 1


def test_a_long_document_shows_its_progress_in_the_task_status(app):
    h = app.writer("clinic-progress")
    text = " ".join(f"Paragraph {i}: the patient's blood pressure was recorded as {120 + i % 30}/80 mmHg "
                    f"on day {i} of admission." for i in range(400))
    r = app.post("/v1/rag/documents", json={"title": "Observations", "text": text}, headers=h)
    task_id = r.json()["task_id"]
    seen = []

    def progressed():
        st = app.get(f"/v1/async/status/{task_id}", headers=h).json()
        if st.get("progress"):
            seen.append(st["progress"])
        return st["state"] == "completed" and st
    wait_until(progressed, 120, 0.05, "the long ingestion")
    assert seen, "no progress was ever shown while the document was indexed"
    total = seen[-1]["chunks_total"]
    assert total > 16 and all(p["chunks_total"] == total and 0 <= p["chunks_done"] <= total for p in seen)
    doc = app.get(f"/v1/rag/documents/{r.json()['document_id']}", headers=h).json()
    assert doc["chunks"] == total and doc["state"] == "ready"


def test_search_in_all_three_modes(app):
    h = app.writer("clinic-search")
    for title, text in DOCS.values():
        ingest(app, h, title, text, metadata={"kind": "pathway" if "pathway" in title else "guide"})
    # an exact code: keywords catch it
    assert titles(search(app, h, "E11.9", mode="keyword"))[0] == DOCS["metformin"][0]
    # a paraphrase with none of the document's words: the embedding catches it
    assert titles(search(app, h, "heart attack", mode="vector"))[0] == DOCS["heart"][0]
    hybrid = search(app, h, "broken hip after a fall", mode="hybrid")
    assert titles(hybrid)[0] == DOCS["fracture"][0]
    top = hybrid[0]
    assert {"chunk_id", "document_id", "title", "score", "start", "end", "text"} <= set(top)
    assert top["text"] in DOCS["fracture"][1] and DOCS["fracture"][1][top["start"]:top["end"]] == top["text"]
    filtered = search(app, h, "treatment", filter={"kind": "pathway"}, k=5)
    assert titles(filtered) == [DOCS["heart"][0]]
    filtered_in = search(app, h, "treatment", filter={"kind": {"in": ["pathway", "guide"]}}, k=5)
    assert len(filtered_in) == 3


def test_rag_answer_cites_only_what_it_retrieved(app):
    h = app.writer("clinic-answer")
    for title, text in DOCS.values():
        ingest(app, h, title, text)
    r = app.post("/v1/async/submit", json={"type": "rag_answer", "question": "What is the first-line drug for "
                                           "type 2 diabetes?", "k": 2, "max_tokens": 24, "seed": 1,
                                           "temperature": 0}, headers=h)
    assert r.status_code == 202, r.text
    rec = wait_until(lambda: _final(app, h, r.json()["task_id"]), 60, 0.1, "the answer")
    assert rec["state"] == "completed", rec
    data = rec["result"]["data"]
    assert [s["title"] for s in data["sources"]][0] == DOCS["metformin"][0] and len(data["sources"]) == 2
    assert data["answer"] == rec["result"]["text"] and rec["result"]["completion_tokens"] > 0
    source_chunks = {s["chunk_id"] for s in data["sources"]}
    assert all(c["chunk_id"] in source_chunks for c in data["citations"])
    assert all(n > len(data["sources"]) or n < 1 for n in data["unsupported_refs"])
    # the generation was a task of its own, queued for the same tenant
    gen = app.get(f"/v1/async/status/{data['generation_task_id']}", headers=h).json()
    assert (gen["type"], gen["state"], gen["tenant"]) == ("chat", "completed", "clinic-answer")
    # rag_answer reads documents: tasks:write alone is not enough
    plain = app.auth(app.mint("clinic-answer", "tasks:write"))
    denied = app.post("/v1/async/submit", json={"type": "rag_answer", "question": "x"}, headers=plain)
    assert (denied.status_code, denied.json()["error"]["code"]) == (403, "insufficient_scope")


def test_tenants_see_only_their_own_documents_unless_an_admin_shares_one(app):
    a, b = app.writer("tenant-a"), app.writer("tenant-b")
    mine = ingest(app, a, "Tenant A's protocol", "Vancomycin trough levels are checked before the fourth dose.")
    assert app.get(f"/v1/rag/documents/{mine['document_id']}", headers=b).status_code == 404
    assert app.get("/v1/rag/documents", headers=b).json()["documents"] == []
    for mode in ("vector", "keyword", "hybrid"):
        assert search(app, b, "Vancomycin trough levels", mode=mode) == []
    r = app.request("DELETE", f"/v1/rag/documents/{mine['document_id']}", headers=b)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    # an admin's site-wide document: everyone finds it, only an admin deletes it
    denied = app.post("/v1/rag/documents", json={"title": "t", "text": "x y z", "shared": True}, headers=a)
    assert (denied.status_code, denied.json()["error"]["code"]) == (403, "insufficient_scope")
    shared = ingest(app, app.admin, "Site policy", "Hand hygiene before and after every patient contact.",
                    shared=True)
    for who in (a, b):
        assert titles(search(app, who, "hand hygiene", mode="keyword")) == ["Site policy"]
    r = app.request("DELETE", f"/v1/rag/documents/{shared['document_id']}", headers=b)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    assert app.request("DELETE", f"/v1/rag/documents/{shared['document_id']}", headers=app.admin).status_code == 200


def test_deletion_removes_the_chunks_and_compaction_rebuilds_the_index(app):
    h = app.writer("clinic-delete")
    docs = [ingest(app, h, f"Note {i}", f"Discharge note {i}: the patient with condition {i * 7} went home "
                   f"on day {i}.") for i in range(6)]
    # the index is shared by every tenant: a long document makes the deleted share pass 5 %
    docs.append(ingest(app, h, "Long note", " ".join(f"Entry {i}: wound dressing changed, no signs of infection."
                                                      for i in range(250))))
    before = app.get("/v1/rag/documents", headers=h).json()["index"]
    assert before["chunks"] >= 50
    for d in docs[:4] + docs[6:]:
        r = app.request("DELETE", f"/v1/rag/documents/{d['document_id']}", headers=h)
        assert r.status_code == 200 and r.json()["deleted"] is True, r.text
        assert app.get(f"/v1/rag/documents/{d['document_id']}", headers=h).status_code == 404
    assert {x["title"] for x in search(app, h, "discharge note patient went home", k=10)} == {"Note 4", "Note 5"}
    after = wait_until(lambda: (ix := app.get("/v1/rag/documents", headers=h).json()["index"])["compactions"]
                       > before["compactions"] and ix, 30, 0.2, "a compaction")
    assert after["deleted_fraction"] < 0.05 and after["chunks"] < before["chunks"]
    assert {x["title"] for x in search(app, h, "discharge note patient went home", k=10)} == {"Note 4", "Note 5"}


def test_bad_input_is_refused_with_stable_codes(app):
    h = app.writer("clinic-bad")
    cases = [
        ({"title": "empty", "text": "   \n"}, 422, "invalid_field"),
        ({"title": "big", "text": "x" * 60001}, 413, "document_too_large"),
        ({"title": "", "text": "t"}, 422, "invalid_field"),
        ({"text": "no title"}, 422, "invalid_field"),
        ({"title": "t", "text": "t", "metadata": {"bad key": 1}}, 422, "invalid_field"),
        ({"title": "t", "text": 5}, 422, "invalid_field"),
    ]
    for body, status, code in cases:
        r = app.post("/v1/rag/documents", json=body, headers=h)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
    r = app.post("/v1/rag/documents", data=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "malformed_json")
    for path in ("/v1/rag/documents/0123456789abcdef0123456789abcdef", "/v1/rag/documents/nope"):
        r = app.get(path, headers=h)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    limit = app.settings().max_prompt_chars
    searches = [
        ({"query": "q" * (limit + 1)}, 422, "invalid_field"),
        ({"query": "x", "mode": "psychic"}, 422, "invalid_field"),
        ({"query": "x", "k": 0}, 422, "invalid_field"),
        ({"query": "x", "filter": {"no_such_field": "y"}}, 422, "invalid_field"),
        ({"query": "x", "filter": {"a; DROP TABLE": 1}}, 422, "invalid_field"),
        ({"query": ""}, 422, "invalid_field"),
    ]
    for body, status, code in searches:
        r = app.post("/v1/rag/search", json=body, headers=h)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
    reader = app.auth(app.mint("clinic-bad", "rag:read"))
    r = app.post("/v1/rag/documents", json={"title": "t", "text": "t"}, headers=reader)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "insufficient_scope")
    forged = {"Authorization": "Bearer " + app.mint("clinic-bad", "rag:read")[:-4] + "AAAA"}
    assert app.post("/v1/rag/search", json={"query": "x"}, headers=forged).status_code == 401


def test_a_text_upload_is_a_document(app):
    h = app.writer("clinic-upload")
    md = "# Sepsis bundle\n\nTake blood cultures, give antibiotics within one hour, measure lactate.\n"
    r = app.post("/v1/rag/documents?title=Sepsis%20bundle", data=md.encode(),
                 headers={**h, "Content-Type": "text/markdown"})
    assert r.status_code == 202, r.text
    wait_until(lambda: _final(app, h, r.json()["task_id"]), 60, 0.1, "the upload's ingestion")
    assert titles(search(app, h, "lactate antibiotics", mode="keyword")) == ["Sepsis bundle"]
    r = app.post("/v1/rag/documents", data=md.encode(), headers={**h, "Content-Type": "text/plain"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_field")


def test_a_restart_reopens_the_index_and_a_crash_mid_ingestion_loses_nothing(app):
    h = app.writer("clinic-crash")
    ingest(app, h, *DOCS["heart"])
    text = " ".join(f"Line {i}: insulin glargine {10 + i % 20} units at night, glucose {5 + i % 9} mmol/L."
                    for i in range(600))
    r = app.post("/v1/rag/documents", json={"title": "Insulin chart", "text": text}, headers=h)
    task_id, doc_id = r.json()["task_id"], r.json()["document_id"]
    wait_until(lambda: (app.get(f"/v1/async/status/{task_id}", headers=h).json().get("progress") or {})
               .get("chunks_done", 0) >= 16, 60, 0.02, "the ingestion under way")
    rag_pid = int(app.ctl("pid", "rag").stdout.strip())
    os.kill(rag_pid, signal.SIGKILL)  # no chance to save anything
    rec = wait_until(lambda: _final(app, h, task_id), 180, 0.2, "the ingestion after the crash")
    assert rec["state"] == "completed", rec
    status = app.get(f"/v1/async/status/{task_id}", headers=h).json()
    assert status["attempts"] == 2  # the broker ran it again; it resumed the document
    doc = app.get(f"/v1/rag/documents/{doc_id}", headers=h).json()
    assert doc["state"] == "ready"
    assert titles(search(app, h, "insulin glargine at night", mode="keyword", k=1)) == ["Insulin chart"]
    # an orderly restart: the index is reopened from disk, every chunk still found
    before = app.get("/v1/rag/documents", headers=h).json()["index"]
    assert app.ctl("restart", "rag").returncode == 0
    app.wait_ready()
    after = app.get("/v1/rag/documents", headers=h).json()["index"]
    assert after["chunks"] == before["chunks"] and after["embedder"] == before["embedder"]
    assert titles(search(app, h, "heart attack", mode="vector", k=1)) == [DOCS["heart"][0]]


def test_the_icd10cm_loader_indexes_site_wide_codes_through_the_broker(app):
    """Last in this module: its 130 site-wide documents are seen by every tenant."""
    env = {**app.env, "APPLIANCE_HOME": str(app.home)}
    run = subprocess.run([str(app.bin / "appliance"), "rag", "load-icd10cm", "--limit", "130"], env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(run.stdout)
    assert summary["codes"] == 130 and summary["tasks"] == 3 and summary["completed"] == 3 and not summary["failed"]
    h = app.writer("any-tenant")
    hits = search(app, h, "cholera", mode="keyword", k=3)
    assert hits and all(x["title"].startswith("A00") for x in hits), titles(hits)
    assert hits[0]["metadata"]["source"] == "icd10cm"
    again = subprocess.run([str(app.bin / "appliance"), "rag", "load-icd10cm", "--limit", "130"], env=env,
                           capture_output=True, text=True, timeout=180)
    assert again.returncode == 0 and json.loads(again.stdout)["completed"] == 3
    index = app.get("/v1/rag/documents", headers=h).json()["index"]
    assert len([d for d in app.get("/v1/rag/documents?limit=1000", headers=h).json()["documents"]
                if d["metadata"].get("source") == "icd10cm"]) == 130  # loading twice adds nothing
    assert index["chunks"] >= 130
