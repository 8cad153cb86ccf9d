"""The embedders (appliance/rag/embedder.py): the real MiniLM model, and the caller side of
the llama.cpp backend with a plain function in place of the broker."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from appliance.rag import embedder as E


@pytest.fixture(scope="module")
def minilm():
    return E.MiniLmEmbedder(threads=1)


def cos(a, b) -> float:
    return float(np.dot(a, b))  # rows are unit vectors


def test_shape_dtype_and_unit_rows(minilm):
    v = minilm.embed(["Type 2 diabetes mellitus", "", "x " * 600])  # empty and over-long too
    assert v.shape == (3, 384) == (3, minilm.dim) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert minilm.embed([]).shape == (0, 384)
    assert minilm.id.startswith("onnx:all-MiniLM-L6-v2-int8:") and minilm.id.endswith(E.EXPECTED_SHA256[:12])
    assert minilm.max_tokens == 256


def test_similar_meanings_score_higher(minilm):
    mi, heart, femur = minilm.embed(["myocardial infarction", "heart attack", "fractured femur"])
    assert cos(mi, heart) > cos(mi, femur) + 0.1, (cos(mi, heart), cos(mi, femur))


def test_token_spans_are_character_offsets_into_the_text(minilm):
    text = "Café patient, naïve to metformin: 5 mg/kg — résumé of myocardial infarction."
    spans = minilm.token_spans(text)
    assert spans and all(0 <= s < e <= len(text) for s, e in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # in order, no overlap
    # every character but spaces belongs to a token, and nothing else does (no [CLS]/[SEP])
    assert "".join(text[s:e] for s, e in spans) == text.replace(" ", "")
    assert any(text[s:e] == "naïve" for s, e in spans)  # characters, not UTF-8 bytes


def test_input_is_cut_at_max_tokens(minilm):
    words = ("the quick brown fox jumps over the lazy dog " * 60).split()
    text = " ".join(words)
    spans = minilm.token_spans(text)
    assert len(spans) == len(words) > minilm.max_tokens
    head = text[:spans[minilm.max_tokens - 1][1]]
    full, cut, shorter = minilm.embed([text, head, text[:spans[minilm.max_tokens - 2][1]]])
    assert np.abs(full - cut).max() < 1e-5
    assert np.abs(full - shorter).max() > 1e-4  # one token fewer is seen


def test_a_batch_equals_its_rows_embedded_alone(minilm):
    texts = ["heart attack", "Acute myocardial infarction, unspecified, of the inferior wall " * 3,
             "", "Fracture of unspecified part of neck of right femur", "short"] * 5  # > one BATCH
    batch = minilm.embed(texts)
    alone = np.vstack([minilm.embed([t]) for t in texts])
    assert np.abs(batch - alone).max() < 1e-5


def test_an_altered_model_file_is_refused_naming_both_hashes(tmp_path):
    good = E._default_model_path()
    bad = tmp_path / "model.onnx"
    shutil.copyfile(good, bad)
    with open(bad, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    import hashlib
    found = hashlib.sha256(bad.read_bytes()).hexdigest()
    with pytest.raises(E.EmbedderError) as err:
        E.MiniLmEmbedder(model_path=bad)
    assert E.EXPECTED_SHA256 in str(err.value) and found in str(err.value)
    with pytest.raises(E.EmbedderError, match="missing"):
        E.MiniLmEmbedder(model_path=tmp_path / "absent.onnx")


def fake_llama(dim: int = 48, calls: list | None = None):
    """Fixed-size, unnormalised vectors, as a llama.cpp /v1/embeddings answer gives them."""
    def embed_fn(texts):
        if calls is not None:
            calls.append(list(texts))
        return [[float(len(t) % 7 + 1)] + [0.5 * (i + 1) for i in range(dim - 1)] for t in texts]
    return embed_fn


def test_llama_backend_normalises_and_learns_its_dim(minilm):
    calls = []
    emb = E.LlamaEmbedder("nomic-embed", fake_llama(48, calls), tokenizer_from=minilm)
    assert calls == [["dim probe"]]
    assert emb.id == "llama:nomic-embed" and emb.dim == 48
    v = emb.embed(["a", "bb", "ccc"])
    assert v.shape == (3, 48) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    assert emb.embed([]).shape == (0, 48) and len(calls) == 2  # [] costs no call
    text = "Acute myocardial infarction"
    assert emb.token_spans(text) == minilm.token_spans(text)
    assert E.LlamaEmbedder("m", fake_llama(8)).token_spans(text) == minilm.token_spans(text)


def test_llama_backend_refuses_a_wrong_answer():
    answers = iter([[[1.0] * 48], [[1.0] * 32]])
    emb = E.LlamaEmbedder("m", lambda texts: next(answers))
    with pytest.raises(E.EmbedderError, match="wrong dimension from llama.cpp: 32, expected 48"):
        emb.embed(["x"])
    with pytest.raises(E.EmbedderError, match="shape"):  # one vector per token (pooling none)
        E.LlamaEmbedder("m", lambda texts: [[[1.0] * 8] * 3 for _ in texts])
    with pytest.raises(E.EmbedderError, match="shape"):  # rows missing
        E.LlamaEmbedder("m", lambda texts: [])
    with pytest.raises(E.EmbedderError, match="zero"):
        E.LlamaEmbedder("m", lambda texts: [[0.0] * 8 for _ in texts])

    def down(texts):
        raise TimeoutError("no answer from llama-0")
    with pytest.raises(E.EmbedderError, match="embed_fn failed: TimeoutError: no answer from llama-0"):
        E.LlamaEmbedder("m", down)


def test_load_accepts_two_forms_and_names_them_otherwise():
    with pytest.raises(E.EmbedderError, match=r"'minilm' or 'llama:<model id>'"):
        E.load("bogus")
    with pytest.raises(E.EmbedderError, match="llama:<model id>"):
        E.load("llama:")
    with pytest.raises(E.EmbedderError, match="embed_fn"):
        E.load("llama:nomic")
    assert E.load("llama:nomic", embed_fn=fake_llama(16)).dim == 16
    assert isinstance(E.load("minilm"), E.MiniLmEmbedder)
