"""Token-aware chunking of a document into overlapping windows.

Why windows of *tokens* rather than characters: the embedder truncates its input at
`max_tokens`, so a window measured in characters either wastes the model's context or
loses its tail silently. The caller passes the embedder's own token spans
(`Embedder.token_spans(text)`), so a window here is exactly what the model will see.

Why overlap: a sentence cut in two at a window edge would otherwise be findable in
neither half; `overlap` tokens shared between neighbours keep every short passage whole
in at least one window.

Why prefer boundaries: a window that ends mid-sentence gives a worse embedding and a
worse citation. When a paragraph break (preferred) or a sentence end lies in the last
quarter of a full window, the window ends there instead; the next one still starts
exactly `overlap` tokens before that end.

`start`/`end` are character offsets into the original text (`text[start:end] ==
chunk.text`), so a citation can point into the stored document. A window runs from its
first token up to the next window-external token, so punctuation between tokens is kept
(with a regex `\\w+` tokenizer "metformin." keeps its period); leading and trailing
whitespace is trimmed. Every non-whitespace character of the text lies in some chunk.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

__all__ = ["Chunk", "chunk"]

_PARAGRAPH = re.compile(r"\n[^\S\n]*\n")
# Terminal punctuation, optional closing quotes/brackets, then whitespace; or a newline.
_SENTENCE = re.compile(r"(?:[.!?\u2026\u3002][\"'\u2019\u201d)\]]*\s|\n)\s*$")


class Chunk(NamedTuple):
    start: int
    end: int
    text: str


def _trimmed(text: str, lo: int, hi: int) -> Chunk | None:
    while lo < hi and text[lo].isspace():
        lo += 1
    while hi > lo and text[hi - 1].isspace():
        hi -= 1
    return Chunk(lo, hi, text[lo:hi]) if hi > lo else None


def chunk(text: str, spans: Sequence[tuple[int, int]], max_tokens: int = 200,
          overlap: int = 40) -> list[Chunk]:
    """Split `text` into windows of at most `max_tokens` of its tokens (`spans`).

    Neighbouring windows share exactly `overlap` tokens. A text of at most `max_tokens`
    tokens is one chunk; a whitespace-only text gives []. Empty spans (special tokens
    with offsets (0, 0)) are ignored. Pure function.
    """
    if max_tokens < 1 or not 0 <= overlap < max_tokens:
        raise ValueError(f"need max_tokens >= 1 and 0 <= overlap < max_tokens "
                         f"(got {max_tokens}, {overlap})")
    if not text.strip():
        return []
    toks = sorted((s, e) for s, e in spans if 0 <= s < e <= len(text))
    n = len(toks)
    if n <= max_tokens:
        whole = _trimmed(text, 0, len(text))
        return [whole] if whole else []

    def lo(i: int) -> int:          # where a window starting at token i begins
        return 0 if i == 0 else toks[i][0]

    def hi(j: int) -> int:          # where a window ending before token j ends
        return len(text) if j >= n else toks[j][0]

    out: list[Chunk] = []
    i = 0
    while True:
        j = min(i + max_tokens, n)
        if j < n:
            j = _best_end(text, toks, i, j, max_tokens, overlap)
        c = _trimmed(text, lo(i), hi(j))
        if c:
            out.append(c)
        if j >= n:
            return out
        i = j - overlap


def _best_end(text: str, toks: Sequence[tuple[int, int]], i: int, j: int,
              max_tokens: int, overlap: int) -> int:
    """The window [i, j) is full; move its end back to a boundary in its last quarter.

    A boundary "before token e" is judged on the previous token plus the gap after it:
    a blank line is a paragraph end; terminal punctuation followed by whitespace (or a
    newline) is a sentence end. Checking the previous token matters for tokenizers that
    make "." a token of its own (WordPiece), where the gap itself is just a space.
    The end never moves to or before i + overlap, so every window makes progress.
    """
    first = max(j - max_tokens // 4, i + overlap + 1)
    sentence = None
    for e in range(j, first - 1, -1):
        gap = text[toks[e - 1][1]:toks[e][0]]
        if _PARAGRAPH.search(gap):
            return e
        if sentence is None and _SENTENCE.search(text[toks[e - 1][0]:toks[e][0]]):
            sentence = e
    return sentence if sentence is not None else j
