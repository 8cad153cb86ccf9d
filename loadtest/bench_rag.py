"""Retrieval benchmarks: quality on ICD-10-CM, ingestion speed, search latency, chat under ingestion.

    .venv/bin/python loadtest/bench_rag.py                  # both parts, ~10 min on 2 cores
    .venv/bin/python loadtest/bench_rag.py --parts quality  # in-process, ~3 min
    .venv/bin/python loadtest/bench_rag.py --parts appliance --ingest 10000

quality (in-process: the RAG worker's own Library, the real MiniLM embedder, SQLite +
FTS5 and usearch, in a temp dir): an index of N ICD-10-CM codes (default 12,000: every
code that has inclusion terms, then a fixed random sample of the others), one document
per code (code + description). Queries: one inclusion term (a clinical synonym, never
part of the indexed text) of each of a fixed random sample of 1,000 indexed codes; a
hit is the query's own code among the results. recall@1, recall@10 and MRR@10 for
vector, keyword and hybrid; then ingestion of ~100-word passages (chunks/s).

appliance (a real appliance it starts in a temp home: broker, one tiny-model instance,
the RAG worker): chat p50/p95 on an idle appliance; then `appliance rag load-icd10cm
--limit N` submits N one-chunk documents at batch priority and chat p95 is measured
again while they are indexed (goal: within 20 % of idle); the ingestion's documents/s
through the broker; then POST /v1/rag/search p50/p99 (query embedding included) idle
and with chat load running (goal: p99 <= 20 ms). Results are printed as tables and
saved as JSON under /tmp/bench-rag.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("vector", "keyword", "hybrid")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# ---------------------------------------------------------------- quality
def quality(n_codes: int, n_queries: int, threads: int, seed: int) -> dict:
    from appliance.rag import embedder as emb
    from appliance.rag import icd10
    from appliance import protocol as P
    from appliance.rag.library import Library, NewDocument

    rng = random.Random(seed)
    every = list(icd10.codes())
    rich = [c for c in every if c.inclusion_terms]
    others = [c for c in every if not c.inclusion_terms]
    indexed = rich + rng.sample(others, max(0, n_codes - len(rich)))
    indexed = indexed[:n_codes]
    targets = rng.sample([c for c in indexed if c.inclusion_terms], n_queries)
    queries = [(rng.choice(c.inclusion_terms), c.code) for c in targets]
    with tempfile.TemporaryDirectory(prefix="bench-rag-") as tmp:
        lib = Library(Path(tmp), emb.load("minilm", threads=threads))
        t0 = time.perf_counter()
        docs = [NewDocument(P.document_id("site", text), title, text, meta, True)
                for title, text, meta in map(icd10.document, indexed)]
        for i in range(0, len(docs), 64):  # as `appliance rag load-icd10cm` sends them: 64 codes a task
            lib.ingest(docs[i:i + 64], "site", lambda d, t: None, lambda: False)
        ingest_s = time.perf_counter() - t0
        print(f"indexed {len(indexed)} codes in {ingest_s:.1f} s ({len(indexed) / ingest_s:.0f} documents/s)",
              flush=True)
        out = {"codes": len(indexed), "queries": len(queries), "documents_per_s": len(indexed) / ingest_s}
        for mode in MODES:
            at1 = at10 = 0
            rr = 0.0
            ms = []
            for query, code in queries:
                t = time.perf_counter()
                hits = lib.search(query, 10, "bench", None, mode)
                ms.append((time.perf_counter() - t) * 1000)
                codes = [h.metadata.get("code") for h in hits]
                if codes[:1] == [code]:
                    at1 += 1
                if code in codes:
                    at10 += 1
                    rr += 1 / (codes.index(code) + 1)
            out[mode] = {"recall@1": at1 / len(queries), "recall@10": at10 / len(queries),
                         "mrr@10": rr / len(queries), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99)}
        out["passages"] = passages(lib, rng)
        lib.close()
    return out


def passages(lib, rng) -> dict:
    """~100-word passages of real clinical vocabulary (ICD descriptions strung together),
    one document of 120 of them: chunks/s as an ingestion sees it."""
    from appliance.rag import icd10

    words = " ".join(c.description for c in icd10.codes(["9", "10", "4"])).split()
    paras = []
    for _ in range(120):
        i = rng.randrange(0, len(words) - 100)
        paras.append(" ".join(words[i:i + 100]) + ".")
    text = "\n\n".join(paras)
    t0 = time.perf_counter()
    from appliance.rag.library import NewDocument

    [doc] = lib.ingest([NewDocument("f" * 32, "passages", text, {}, False)], "bench", lambda d, t: None,
                       lambda: False)
    s = time.perf_counter() - t0
    return {"chunks": doc["chunks"], "words": len(text.split()), "seconds": s, "chunks_per_s": doc["chunks"] / s,
            "words_per_s": len(text.split()) / s}


def print_quality(q: dict) -> None:
    print(f"\nRetrieval on ICD-10-CM: {q['codes']} codes indexed, {q['queries']} inclusion-term queries")
    print(f"{'mode':<8} {'recall@1':>9} {'recall@10':>10} {'MRR@10':>7} {'p50 ms':>7} {'p99 ms':>7}")
    for mode in MODES:
        r = q[mode]
        print(f"{mode:<8} {r['recall@1']:>9.3f} {r['recall@10']:>10.3f} {r['mrr@10']:>7.3f} {r['p50_ms']:>7.2f} "
              f"{r['p99_ms']:>7.2f}")
    p = q["passages"]
    print(f"ingestion: {q['documents_per_s']:.0f} one-chunk documents/s; {p['chunks']} chunks of ~100-word "
          f"passages at {p['chunks_per_s']:.1f} chunks/s ({p['words_per_s']:.0f} words/s)")


# ---------------------------------------------------------------- appliance
def appliance_part(n_ingest: int, n_chat: int, n_search: int) -> dict:
    import requests

    from bench_api import BIN, Appliance
    from appliance.rag import icd10
    from appliance.security import mint_token

    app = Appliance(LLAMA_INSTANCES=1, LLAMA_SLOTS=2, API_WORKERS=2, QUEUE_MAX_SIZE=20000)
    token = mint_token(app.settings, "bench", ["tasks:read", "tasks:write", "rag:read", "rag:write"], 7200)
    h = {"Authorization": f"Bearer {token}"}
    s = requests.Session()
    terms = [t for c in icd10.sample(400) for t in c.inclusion_terms][:n_search]
    out: dict = {}
    model = s.get(app.url + "/v1/models", headers=h, timeout=10).json()["data"][0]["id"]
    errors: list[str] = []

    def chat(samples: list[float], stop: threading.Event | None = None, n: int = 0) -> None:
        sess = requests.Session()
        i = 0
        while (stop is None and i < n) or (stop is not None and not stop.is_set()):
            t = time.perf_counter()
            r = sess.post(app.url + "/v1/chat/completions", headers=h, timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": f"Summarise the discharge plan {i}."}],
                "max_tokens": 32, "temperature": 0})
            if r.status_code == 200:
                samples.append((time.perf_counter() - t) * 1000)
            else:
                errors.append(f"chat {r.status_code}: {r.text[:120]}")
            i += 1

    def chats(n: int) -> list[float]:
        samples: list[float] = []
        ts = [threading.Thread(target=chat, args=(samples, None, n // 2)) for _ in range(2)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        return samples

    def searches(label: str) -> None:
        ms, worker_ms = [], []
        for q in terms:
            t = time.perf_counter()
            r = s.post(app.url + "/v1/rag/search", headers=h, json={"query": q, "k": 10}, timeout=30)
            ms.append((time.perf_counter() - t) * 1000)
            if r.status_code == 200:
                worker_ms.append(r.json()["search_ms"])
            else:
                errors.append(f"search {r.status_code}: {r.text[:120]}")
        out[label] = {"n": len(ms), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99),
                      "worker_p50_ms": pct(worker_ms, 50), "worker_p99_ms": pct(worker_ms, 99)}

    try:
        chats(20)  # warm-up
        idle = chats(n_chat)
        out["chat_idle"] = {"n": len(idle), "p50_ms": pct(idle, 50), "p95_ms": pct(idle, 95)}
        env = dict(os.environ, APPLIANCE_HOME=str(app.home))
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "appliance"), "rag", "load-icd10cm", "--limit", str(n_ingest), "--no-wait"],
                       env=env, check=True, capture_output=True, timeout=600)
        submit_s = time.perf_counter() - t0
        during: list[float] = []
        stop = threading.Event()
        ts = [threading.Thread(target=chat, args=(during, stop)) for _ in range(2)]
        [t.start() for t in ts]

        def rag_queued() -> int:
            st = s.get(app.url + "/v1/async/stats", headers=h, timeout=10).json()
            return st["depth_by_model"].get("rag", 0) + sum(w["running"] for w in st["rag_workers"])
        while rag_queued() > 0:
            time.sleep(0.5)
        ingest_s = time.perf_counter() - t0
        stop.set()
        [t.join() for t in ts]
        out["chat_during_ingestion"] = {"n": len(during), "p50_ms": pct(during, 50), "p95_ms": pct(during, 95)}
        listed = s.get(app.url + "/v1/rag/documents?limit=1", headers=h, timeout=10).json()["index"]
        out["ingestion"] = {"documents": n_ingest, "submit_s": submit_s, "seconds": ingest_s,
                            "documents_per_s": n_ingest / ingest_s, "index_chunks": listed["chunks"]}
        searches("search_idle")
        stop = threading.Event()
        load: list[float] = []
        ts = [threading.Thread(target=chat, args=(load, stop)) for _ in range(2)]
        [t.start() for t in ts]
        searches("search_under_chat_load")
        stop.set()
        [t.join() for t in ts]
    finally:
        app.stop()
    out["errors"] = len(errors)
    if errors:
        print(f"{len(errors)} requests failed, e.g. {errors[:3]}", flush=True)
    return out


def print_appliance(a: dict) -> None:
    idle, busy = a["chat_idle"], a["chat_during_ingestion"]
    print(f"\nChat (2 clients, 32 tokens): idle p50 {idle['p50_ms']:.1f} ms p95 {idle['p95_ms']:.1f} ms (n={idle['n']}); "
          f"during ingestion p50 {busy['p50_ms']:.1f} ms p95 {busy['p95_ms']:.1f} ms (n={busy['n']}): "
          f"p95 {100 * (busy['p95_ms'] / idle['p95_ms'] - 1):+.0f} %")
    ing = a["ingestion"]
    print(f"Ingestion through the broker: {ing['documents']} documents in {ing['seconds']:.1f} s "
          f"({ing['documents_per_s']:.0f}/s; submitted in {ing['submit_s']:.1f} s); index holds {ing['index_chunks']}")
    print(f"{'search (HTTP, k=10, hybrid)':<30} {'p50 ms':>7} {'p99 ms':>7} {'worker p50':>10} {'worker p99':>10}")
    for label in ("search_idle", "search_under_chat_load"):
        r = a[label]
        print(f"{label:<30} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['worker_p50_ms']:>10.2f} "
              f"{r['worker_p99_ms']:>10.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="quality,appliance")
    ap.add_argument("--codes", type=int, default=12000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads (RAG_THREADS)")
    ap.add_argument("--ingest", type=int, default=10000, help="documents the appliance part indexes")
    ap.add_argument("--chats", type=int, default=200)
    ap.add_argument("--searches", type=int, default=300)
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    results: dict = {"machine": f"{os.cpu_count()} cores", "args": vars(args)}
    if "quality" in parts:
        results["quality"] = quality(args.codes, args.queries, args.threads, args.seed)
        print_quality(results["quality"])
    if "appliance" in parts:
        results["appliance"] = appliance_part(args.ingest, args.chats, args.searches)
        print_appliance(results["appliance"])
    Path("/tmp/bench-rag.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
