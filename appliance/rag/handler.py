"""The RAG worker's handler for the shared worker loop (appliance/worker.py).

It serves the broker's `rag` service: rag_ingest (batch priority: ingestion never
starves interactive work), rag_search and rag_docs (high priority, from the API's
/v1/rag resources) and rag_answer (retrieve, then a chat task for the model the
caller named, see children.py). Every failure is a Done with a stable code, which
the API turns into its HTTP status.

Progress of an ingestion streams as text lines "indexed DONE/TOTAL": a task's
streamed text is what status (`text_so_far`) and the SSE stream already show.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import msgspec

from .. import protocol as P
from ..broker_client import BrokerClient
from ..config import Settings, ensure_dirs
from ..logs import exception_summary
from . import answer, embedder as emb
from .children import ChildFailed, result_of, run_child
from .library import Library, LibraryError, NewDocument, Stopped
from .store import FilterError
from .vectors import IndexMismatch

log = logging.getLogger("appliance.rag")


class RagHandler:
    name = "rag"
    model = P.RAG_SERVICE
    gpu = -1

    def __init__(self, settings: Settings):
        self.s = settings
        self.slots = settings.rag_slots
        self.reserved = settings.rag_reserved
        self.starts = 1
        self.endpoint = ""
        self.library: Library | None = None
        self._client: BrokerClient | None = None
        self._stops: dict[str, threading.Event] = {}
        self.closing = threading.Event()
        self._task = threading.local()  # the running task's priority, for the embeddings it asks for

    # ------------------------------------------------------------ life
    def start(self) -> None:
        ensure_dirs(self.s)
        directory = Path(self.s.data_dir) / "rag"
        t0 = time.monotonic()
        kind, _, model = self.s.rag_embedder.partition(":")
        embed_fn = self._embed_with_llama(model) if kind == "llama" else None
        embedder = emb.load(self.s.rag_embedder, threads=self.s.rag_threads, embed_fn=embed_fn)
        self.library = Library(directory, embedder, self.s.rag_chunk_tokens, self.s.rag_chunk_overlap,
                               self.s.rag_compact_pct)
        self.endpoint = f"file://{directory}"
        rec = self.library.recovered
        log.info("rag: ready in %.2fs: embedder %s (%d dims), %d chunks indexed in %s; recovered: %s",
                 time.monotonic() - t0, embedder.id, embedder.dim, len(self.library.vectors), directory, rec)
        threading.Thread(target=self._background, name="rag-resume", daemon=True).start()

    def _background(self) -> None:
        """Finish what a crash left half-indexed, then load the configured sample."""
        try:
            finished = self.library.resume(self.closing.is_set)
            if finished:
                log.info("rag: %d half-indexed documents finished after a restart", finished)
            if self.s.rag_sample:
                from .samples import load_sample
                load_sample(self.library, self.s.rag_sample, self.closing.is_set)
        except Exception as exc:  # never the worker's end: tasks go on
            log.error("rag: background indexing failed: %s", exception_summary(exc))

    def client(self) -> BrokerClient:
        if self._client is None:
            self._client = BrokerClient(self.s.broker_front, self.s.broker_timeout_s, self.s.broker_events)
        return self._client

    def healthy(self) -> bool:
        return self.library is not None

    def abort(self, task_id: str, reason: str) -> None:
        stop = self._stops.get(task_id)
        if stop is not None:
            stop.set()

    def close(self) -> None:
        self.closing.set()
        for stop in list(self._stops.values()):
            stop.set()
        if self.library is not None:
            self.library.close()

    # ------------------------------------------------------------ tasks
    def run(self, task_id: str, spec: P.TaskSpec, deadline: float, on_text: Callable[[str], None],
            tenant: str = "") -> P.Done:
        stop = self._stops[task_id] = threading.Event()
        self._task.priority = "batch" if isinstance(spec, P.RagIngestTask) else "high"
        try:
            data, text, extra = self._run(task_id, spec, deadline, on_text, tenant, stop)
            return P.Done(task_id, result=P.TaskResult(text=text, data=data, **extra))
        except LibraryError as exc:
            return P.Done(task_id, error=P.TaskError(exc.code, exc.message))
        except FilterError as exc:
            return P.Done(task_id, error=P.TaskError("invalid_field", f"filter.{exc.field}: {exc.message}"))
        except IndexMismatch as exc:
            return P.Done(task_id, error=P.TaskError("embedder_mismatch", str(exc)))
        except ChildFailed as exc:
            return P.Done(task_id, error=P.TaskError(exc.code, exc.message))
        except Stopped as exc:
            code = "timeout" if time.time() >= deadline else "cancelled"
            return P.Done(task_id, error=P.TaskError(code, f"indexing stopped: {exc}; the next attempt resumes"))
        except emb.EmbedderError as exc:
            return P.Done(task_id, error=P.TaskError("embedder_failed", str(exc)))
        finally:
            self._stops.pop(task_id, None)

    def _run(self, task_id, spec, deadline, on_text, tenant, stop):
        lib = self.library

        def should_stop() -> bool:
            return stop.is_set() or self.closing.is_set() or time.time() >= deadline

        if isinstance(spec, P.RagSearchTask):
            t0 = time.perf_counter()
            hits = lib.search(spec.query, spec.k, tenant, spec.filter, spec.mode)
            return {"hits": msgspec.to_builtins(hits), "mode": spec.mode, "embedder": lib.embedder.id,
                    "search_ms": round((time.perf_counter() - t0) * 1000, 3)}, "", {}
        if isinstance(spec, P.RagIngestTask):
            def progress(done: int, total: int) -> None:
                on_text(f"indexed {done}/{total}\n")
            docs = lib.ingest([NewDocument(d.document_id, d.title, d.text, d.metadata, d.shared)
                               for d in spec.documents], tenant, progress, should_stop)
            if not docs:
                raise LibraryError("not_found", "the document was deleted while it was being indexed")
            # the API's one document: its summary; a batch (the ICD-10-CM loader): all of them
            return (docs[0] if len(spec.documents) == 1 else {"documents": docs}), "", {}
        if isinstance(spec, P.RagDocsTask):
            if spec.op == "list":
                return {"documents": lib.list(tenant, spec.limit, spec.offset), "index": lib.index_stats()}, "", {}
            if spec.op == "get":
                return lib.describe(lib.visible(spec.document_id, tenant)), "", {}
            return lib.delete(spec.document_id, tenant, spec.admin), "", {}
        if isinstance(spec, P.RagAnswerTask):
            return self._answer(task_id, spec, deadline, on_text, tenant, stop)
        raise LibraryError("invalid_field", f"type: {spec.type} is not a RAG task")

    def _answer(self, task_id, spec: P.RagAnswerTask, deadline, on_text, tenant, stop):
        hits = self.library.search(spec.question, spec.k, tenant, spec.filter, spec.mode)
        chat = P.ChatTask(model=spec.model, priority=spec.priority, timeout_s=max(1.0, deadline - time.time()),
                          max_tokens=spec.max_tokens, temperature=spec.temperature, seed=spec.seed,
                          messages=answer.messages(spec.question, hits))
        rec = run_child(self.client(), chat, tenant, f"rag_answer:{task_id}", deadline, stop, on_text)
        result = result_of(rec)
        cited, unsupported = answer.citations(result.text, hits)
        data = {"answer": result.text, "citations": msgspec.to_builtins(cited), "unsupported_refs": unsupported,
                "sources": [{"n": i, "chunk_id": h.chunk_id, "document_id": h.document_id, "title": h.title,
                             "start": h.start, "end": h.end, "score": h.score} for i, h in enumerate(hits, 1)],
                "generation_task_id": rec.task_id}
        extra = {"finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                 "completion_tokens": result.completion_tokens, "model": result.model, "timings": result.timings,
                 "provenance": result.provenance}
        return data, result.text, extra

    # ------------------------------------------------------------ llama.cpp embeddings
    def _embed_with_llama(self, model: str) -> Callable[[list[str]], list[list[float]]]:
        """RAG_EMBEDDER=llama:MODEL: each call is an `embed` task of that model through
        the broker, at batch priority for an ingestion and high for a query."""
        def embed(texts: list[str]) -> list[list[float]]:
            priority = getattr(self._task, "priority", "batch")  # not a task thread (ingestion, probe): batch
            spec = P.EmbedTask(model=model, priority=priority, timeout_s=60.0, texts=texts)
            # no idempotency key: a re-run embeds again (cheap), and the broker keeps no entry per call
            rec = run_child(self.client(), spec, "rag", None, time.time() + 60.0, self.closing)
            return result_of(rec).embeddings or []
        return embed


def main(settings: Settings) -> None:
    import signal

    from ..worker import WorkerLoop

    handler = RagHandler(settings)
    loop = WorkerLoop(handler, settings.broker_back, settings.worker_liveness_s, settings.drain_grace_s)
    signal.signal(signal.SIGTERM, loop.stop)
    signal.signal(signal.SIGINT, loop.stop)
    try:
        handler.start()
        loop.serve()
    finally:
        handler.close()
        loop.close()
