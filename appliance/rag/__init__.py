"""Retrieval over the site's own documents: embedder, chunking, document store, vector index, search.

Import order matters: usearch >= 2.26.2 imported before onnxruntime >= 1.24 segfaults
the process (../shared/FIELD-NOTES.md). onnxruntime is therefore imported here, first,
before any module of this package can import usearch; tests/test_rag_imports.py
checks it in a fresh interpreter.
"""
import onnxruntime  # noqa: F401  (must come before usearch, see above)
