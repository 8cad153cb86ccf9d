"""ICD-10-CM as documents (appliance/rag/icd10.py), on the real CDC data."""
from __future__ import annotations

import pytest

from appliance.rag import icd10


@pytest.fixture(scope="module")
def by_code():
    return {c.code: c for c in icd10.codes()}


def test_counts(by_code):
    assert len(by_code) > 98_000  # categories and subcategories, each once
    assert sum(c.billable for c in by_code.values()) > 70_000
    assert sum(bool(c.inclusion_terms) for c in by_code.values()) > 6_000
    assert not any(icd10_id in by_code for icd10_id, _ in icd10.chapters())  # no chapters
    assert "A00-A09" not in by_code  # nor blocks


def test_a_known_code(by_code):
    c = by_code["E11.9"]
    assert c == icd10.Code("E11.9", "Type 2 diabetes mellitus without complications", "4", [], True)
    assert by_code["E11"].billable is False  # it has subcategories
    assert by_code["S72.001A"].description.startswith("Fracture of unspecified part of neck of right femur")


def test_inclusion_terms(by_code):
    assert by_code["I21.9"].inclusion_terms == ["Myocardial infarction (acute) NOS"]
    by_code["I21.9"].inclusion_terms.append("changed by a caller")
    assert next(c for c in icd10.codes(["9"]) if c.code == "I21.9").inclusion_terms == [
        "Myocardial infarction (acute) NOS"]  # callers get copies


def test_chapters_and_the_chapter_filter():
    chs = dict(icd10.chapters())
    assert len(chs) == 22 and chs["4"].startswith("Endocrine, nutritional and metabolic diseases")
    circ = list(icd10.codes(["9"]))
    assert circ and {c.chapter for c in circ} == {"9"} and all(c.code.startswith("I") for c in circ)
    billable = list(icd10.codes(["9", "4"], only_billable=True))
    assert {c.chapter for c in billable} == {"4", "9"} and all(c.billable for c in billable)
    assert len([c for c in billable if c.chapter == "9"]) < len(circ)
    with pytest.raises(ValueError, match="unknown ICD-10-CM chapter"):
        list(icd10.codes(["I"]))


def test_sample_is_fixed_and_prefers_inclusion_terms():
    s = icd10.sample()
    assert len(s) == 200 and len({c.code for c in s}) == 200
    assert all(c.inclusion_terms for c in s)
    assert [c.code for c in s] == [c.code for c in icd10.sample()]
    assert [c.code for c in icd10.sample(10, seed=8)] != [c.code for c in icd10.sample(10)]
    big = icd10.sample(7_000)  # more than the codes with terms: the rest fills up
    assert len(big) == 7_000 and 6_000 < sum(bool(c.inclusion_terms) for c in big) < 7_000


def test_document_keeps_inclusion_terms_out_of_the_text(by_code):
    c = by_code["I21.9"]
    title, text, meta = icd10.document(c)
    assert title == "I21.9 Acute myocardial infarction, unspecified"
    assert text == title  # the code leads the text: codes sharing a description stay distinct documents
    assert meta == {"code": "I21.9", "chapter": "9", "billable": True, "source": "icd10cm"}
    for term in c.inclusion_terms:
        assert term not in title and term not in text and term not in str(meta)


def test_every_code_is_a_distinct_document():
    from appliance import protocol as P

    texts = [icd10.document(c)[1] for c in icd10.codes()]
    assert len({P.document_id("site", t) for t in texts}) == len(texts)
