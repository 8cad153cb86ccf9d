"""A rag_answer's prompt and its citations: pure functions, tested without a model.

The prompt numbers the retrieved chunks [1]..[n] and asks for bracketed citations.
What the model writes is then checked: a number that names no retrieved source is
not a citation (it is reported apart, as `unsupported_refs`), so an answer can only
ever cite what was retrieved for it.
"""
from __future__ import annotations

import re
from typing import Sequence

import msgspec

from .. import protocol as P

SYSTEM = ("You answer questions from a hospital's own documents. Use only the numbered sources the user "
          "gives. Cite every statement with its source's number in square brackets, e.g. [2]. If the sources "
          "do not contain the answer, say that they do not.")
SOURCE_CHARS = 2000  # of each chunk in the prompt: a chunk is ~200 tokens, this only guards odd ones

# [1], [1, 3], [2][4]: one or more numbers in one pair of brackets
_REFS = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")


class Citation(msgspec.Struct):
    n: int             # the number the answer uses
    chunk_id: int
    document_id: str
    title: str
    start: int         # character offsets of the chunk in its document
    end: int


def messages(question: str, hits: Sequence) -> list[P.ChatMessage]:
    """The chat a model answers: the sources, numbered from 1 in rank order, then the question."""
    if hits:
        sources = "\n\n".join(f"[{i}] {h.title}\n{h.text[:SOURCE_CHARS]}" for i, h in enumerate(hits, 1))
    else:
        sources = "(no source matched the question)"
    return [P.ChatMessage("system", SYSTEM),
            P.ChatMessage("user", f"Sources:\n\n{sources}\n\nQuestion: {question}")]


def citations(answer: str, hits: Sequence) -> tuple[list[Citation], list[int]]:
    """(the sources the answer cites, in order of first mention; numbers it uses that
    name no retrieved source)."""
    cited: list[Citation] = []
    seen: set[int] = set()
    unsupported: list[int] = []
    for group in _REFS.finditer(answer):
        for raw in group.group(1).split(","):
            n = int(raw)
            if n in seen:
                continue
            seen.add(n)
            if 1 <= n <= len(hits):
                h = hits[n - 1]
                cited.append(Citation(n, h.chunk_id, h.document_id, h.title, h.start, h.end))
            else:
                unsupported.append(n)
    return cited, unsupported
