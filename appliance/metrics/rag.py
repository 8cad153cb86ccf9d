"""Metrics of the RAG worker (appliance/rag/), one process: `livesum` gauges are its own.

Its task counts, slots and health are the worker loop's appliance_instance_* series
with instance="rag"; these add what only retrieval has.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CHUNKS = Gauge("appliance_rag_index_chunks", "Vectors in the index (chunks searchable by meaning)",
               multiprocess_mode="livesum")
DELETED = Gauge("appliance_rag_index_deleted_ratio", "Share of the index's slots held by deleted chunks "
                "(RAG_COMPACT_PCT rebuilds it)", multiprocess_mode="livesum")
EMBEDDED = Counter("appliance_rag_embedded_chunks_total", "Chunks embedded and indexed (ingestion and resumes)")
DOCUMENTS = Counter("appliance_rag_documents_total", "Documents by what happened to them (indexed, deleted)",
                    ["event"])
COMPACTIONS = Counter("appliance_rag_compactions_total", "Rebuilds of the vector index without its deleted slots")
SEARCH = Histogram("appliance_rag_search_seconds", "Retrieval time in the worker (query embedding included), by mode",
                   ["mode"], buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))


def index(chunks: int, deleted_ratio: float) -> None:
    CHUNKS.set(chunks)
    DELETED.set(deleted_ratio)
