"""Chunking: windows cover the text, hold at most max_tokens tokens, overlap exactly."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from appliance.rag.chunking import Chunk, chunk


def spans(text):
    return [m.span() for m in re.finditer(r"\w+", text)]


def tokens_in(c, sp):
    return [s for s in sp if c.start <= s[0] and s[1] <= c.end]


pieces = st.sampled_from(["alpha", "beta", "E11.9", "metformin", "co-amoxiclav", "7", "x",
                          " ", " ", "  ", ".", ". ", "! ", "\n", "\n\n", ", ", "(", ")", "\t", "é"])
texts = st.lists(pieces, max_size=300).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts, st.integers(1, 40), st.data())
def test_windows_cover_text_and_respect_limits(text, max_tokens, data):
    overlap = data.draw(st.integers(0, max_tokens - 1))
    sp = spans(text)
    out = chunk(text, sp, max_tokens, overlap)
    if not text.strip():
        assert out == []
        return
    assert out
    covered = set()
    for c in out:
        assert 0 <= c.start < c.end <= len(text)
        assert text[c.start:c.end] == c.text
        assert c.text == c.text.strip()
        covered.update(range(c.start, c.end))
        assert len(tokens_in(c, sp)) <= max_tokens
    # every non-whitespace character is in some chunk
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
    if len(sp) <= max_tokens:
        assert len(out) == 1
    # neighbours share exactly `overlap` tokens, and windows move forward
    for a, b in zip(out, out[1:]):
        ta, tb = tokens_in(a, sp), tokens_in(b, sp)
        assert len(set(ta) & set(tb)) == overlap
        assert tb[0] > ta[0] and tb[-1] > ta[-1]
    # the windows together hold every token
    assert {s for c in out for s in tokens_in(c, sp)} == set(sp)


def test_short_text_is_one_chunk_and_blank_is_none():
    text = "  Metformin 500 mg twice daily.  "
    assert chunk(text, spans(text), 200, 40) == [Chunk(2, 31, "Metformin 500 mg twice daily.")]
    assert chunk(" \n\t ", [], 10, 2) == []


def test_prefers_paragraph_then_sentence_end_in_last_quarter():
    words = " ".join(f"w{i}" for i in range(17))
    para = words + ".\n\n" + " ".join(f"v{i}" for i in range(30))   # paragraph end after 17 tokens
    out = chunk(para, spans(para), max_tokens=20, overlap=4)
    assert out[0].text.endswith("w16.")                               # 17 tokens, not 20
    sent = " ".join(f"w{i}" for i in range(16)) + ". " + " ".join(f"v{i}" for i in range(30))
    out = chunk(sent, spans(sent), max_tokens=20, overlap=4)
    assert out[0].text.endswith("w15.")
    early = "w0 w1. " + " ".join(f"v{i}" for i in range(40))        # boundary too early: ignored
    out = chunk(early, spans(early), max_tokens=20, overlap=4)
    assert len(tokens_in(out[0], spans(early))) == 20


def test_wordpiece_style_period_token_counts_as_sentence_end():
    # a tokenizer that makes "." a token of its own (WordPiece): the gap after it is a space
    text = " ".join(f"a{i}" for i in range(16)) + ". " + " ".join(f"b{i}" for i in range(30))
    sp = [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]
    out = chunk(text, sp, max_tokens=20, overlap=2)
    assert out[0].text.endswith("a15.")


def test_bad_arguments():
    with pytest.raises(ValueError):
        chunk("a b", [(0, 1), (2, 3)], max_tokens=4, overlap=4)
    with pytest.raises(ValueError):
        chunk("a b", [(0, 1), (2, 3)], max_tokens=0, overlap=0)
