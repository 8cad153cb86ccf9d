"""A rag_answer's prompt and citations (appliance/rag/answer.py): no model needed."""
from __future__ import annotations

from typing import NamedTuple

from hypothesis import given, strategies as st

from appliance.rag import answer


class Hit(NamedTuple):
    chunk_id: int
    document_id: str
    title: str
    start: int
    end: int
    text: str


HITS = [Hit(10 + i, f"doc{i}", f"Title {i}", i * 100, i * 100 + 50, f"text of source {i}") for i in range(3)]


def test_the_prompt_numbers_the_sources_in_rank_order_and_ends_with_the_question():
    system, user = answer.messages("What is the dose?", HITS)
    assert system.role == "system" and "[2]" in system.content
    body = user.content
    assert body.index("[1] Title 0") < body.index("[2] Title 1") < body.index("[3] Title 2")
    assert body.endswith("Question: What is the dose?")
    _, empty = answer.messages("anything?", [])
    assert "no source matched" in empty.content


def test_citations_name_the_retrieved_chunks_and_refuse_numbers_that_name_none():
    cited, unsupported = answer.citations("Give 500 mg [2]. Not in renal failure [1, 3]. See also [7] and [2].",
                                          HITS)
    assert [(c.n, c.chunk_id, c.document_id, c.title, c.start, c.end) for c in cited] == [
        (2, 11, "doc1", "Title 1", 100, 150), (1, 10, "doc0", "Title 0", 0, 50), (3, 12, "doc2", "Title 2", 200, 250)]
    assert unsupported == [7]
    assert answer.citations("[0] nothing", HITS) == ([], [0])
    assert answer.citations("no brackets at all", HITS) == ([], [])


@given(st.text(alphabet="[]0123456789, abc", max_size=80))
def test_whatever_the_model_writes_every_citation_is_a_retrieved_source(text):
    cited, unsupported = answer.citations(text, HITS)
    ids = {h.chunk_id for h in HITS}
    assert all(c.chunk_id in ids and HITS[c.n - 1].chunk_id == c.chunk_id for c in cited)
    assert all(not 1 <= n <= len(HITS) for n in unsupported)
    assert len({c.n for c in cited}) == len(cited)
