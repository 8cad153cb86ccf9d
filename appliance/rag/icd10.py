"""ICD-10-CM as documents: a real medical vocabulary for a reference knowledge base and
for retrieval-quality tests.

Data: PyPI `simple-icd-10-cm` 1.5.0 (code MIT; data CDC/NCHS ICD-10-CM April 2026, US
public domain). Its 98,505 items include the 22 chapters and 258 blocks (a few names
twice: a block holding one category bears its name); the codes (categories and
subcategories, 7th-character extensions included) number 98,186, of which 74,719 are
billable (leaves of the tree) and 6,805 carry inclusion terms (clinical synonyms such as
"Myocardial infarction (acute) NOS" under I21.9). The terms stay out of document() so
that tests can use them as queries the index has not seen.

Cost, measured here: importing simple_icd_10_cm parses a 9.7 MB XML file (~1.4 s), so it
is imported on first use, not with this module (importing this module costs nothing
beyond appliance.rag's onnxruntime); the code list is built once (~0.4 s) and kept. The
process then holds ~175 MB more (mostly the package's own tree, which it never frees):
use it in an ingestion job or a test, not in a long-lived API worker.
"""
from __future__ import annotations

import functools
import random
import warnings
from typing import Iterator, NamedTuple, Sequence


class Code(NamedTuple):
    code: str                   # with its dot, e.g. "E11.9"
    description: str
    chapter: str                # the package's chapter id, "1".."22"
    inclusion_terms: list[str]  # a fresh copy each time: mutating it changes nothing here
    billable: bool              # a leaf: valid on a claim


@functools.cache
def _tables() -> tuple[tuple[tuple[str, str], ...], tuple[Code, ...]]:
    with warnings.catch_warnings():  # 1.5.0 loads its data with importlib.resources.read_text,
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated: noise, not our concern
        import simple_icd_10_cm as cm  # slow: see the module docstring

    chaps, out, seen = [], [], set()
    for item in cm.get_all_codes():  # pre-order: a chapter, then everything under it
        if cm.is_chapter(item):
            chaps.append((item, cm.get_description(item)))
        # a block that holds one category has the category's name (e.g. B99): the
        # package's lookups by name then answer for the category, so it comes out once
        elif item not in seen and cm.is_category_or_subcategory(item):
            seen.add(item)
            out.append(Code(item, cm.get_description(item), chaps[-1][0],
                            tuple(cm.get_inclusion_term(item)), cm.is_leaf(item)))
    return tuple(chaps), tuple(out)


def chapters() -> list[tuple[str, str]]:
    """(chapter id, description), e.g. ("4", "Endocrine, nutritional and metabolic diseases (E00-E89)")."""
    return list(_tables()[0])


def codes(chapters: Sequence[str] | None = None, only_billable: bool = False) -> Iterator[Code]:
    """Every code in the classification's order, optionally of some chapters or billable only."""
    known = dict(_tables()[0])
    wanted = None if chapters is None else set(chapters)
    if wanted is not None and not wanted <= known.keys():
        raise ValueError(f"unknown ICD-10-CM chapter(s) {sorted(wanted - known.keys())}; "
                         f"chapters are {', '.join(known)}")
    for c in _tables()[1]:
        if (wanted is None or c.chapter in wanted) and (c.billable or not only_billable):
            yield c._replace(inclusion_terms=list(c.inclusion_terms))


def document(code: Code) -> tuple[str, str, dict]:
    """(title, text, metadata) for indexing; the inclusion terms are left out on purpose
    (they are the retrieval benchmark's queries). The text starts with the code: a
    search for "E11.9" finds it by keyword, and the 726 descriptions that several codes
    share (e.g. "Other viral enteritis") stay distinct documents (ids derive from text)."""
    text = f"{code.code} {code.description}"
    return (text, text,
            {"code": code.code, "chapter": code.chapter, "billable": code.billable, "source": "icd10cm"})


def sample(n: int = 200, seed: int = 7) -> list[Code]:
    """A fixed small sample (for `make run`'s demo knowledge base): codes with inclusion
    terms first, so that retrieval can be tried with their synonyms; same n and seed,
    same codes, returned in the classification's order."""
    rng = random.Random(seed)
    every = list(codes())
    rich = [c for c in every if c.inclusion_terms]
    picked = rng.sample(rich, min(n, len(rich)))
    if n > len(picked):
        rest = [c for c in every if not c.inclusion_terms]
        picked += rng.sample(rest, min(n - len(picked), len(rest)))
    keep = {c.code for c in picked}
    return [c for c in every if c.code in keep]
