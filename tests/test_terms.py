"""The medical-term lexicon by category: what the shipped files hold, how a broken one is refused, and the
per-category figures eval reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from medasr import StageError, terms
from medasr.scoring import align, normalize
from medasr.terms import CATEGORIES, category_metrics, medical_terms, term_categories

# A sample of each section of the earlier single list (medical_terms.txt): its words keep counting as terms.
EARLIER = {
    "amoxicillin", "metformin", "cefalexin", "cephalexin", "warfarin", "glargine", "pneumonia", "copd", "atrial",
    "shortness", "wheeze", "abdomen", "chest", "intravenous", "quadrant", "ct", "mri", "milligrams", "urinalysis",
}  # fmt: skip


def test_categories_are_the_four_disjoint_non_trivial_sets_of_normalised_words():
    cats = term_categories()
    assert tuple(cats) == CATEGORIES
    assert all(len(words) >= 60 for words in cats.values())
    assert sum(len(w) for w in cats.values()) == len(medical_terms())  # disjoint: counts add up
    # every word is written the way the normaliser outputs it, or it could never match
    assert [w for w in medical_terms() if normalize(w) != w] == []
    assert medical_terms() >= EARLIER
    assert "amoxicillin" in cats["drugs"] and "edema" in cats["conditions"] and "kidney" in cats["anatomy"]
    assert "creatinine" in cats["procedures_tests"]
    assert not {"pain", "back", "head", "heart", "blood"} & medical_terms()  # too common: see the file headers


@pytest.fixture
def lexicon_dir(tmp_path, monkeypatch):
    """A stand-in for the shipped resources folder, so a broken category file can be tried."""
    folder = tmp_path / "terms"
    folder.mkdir()
    for category in CATEGORIES:
        (folder / f"{category}.txt").write_text(f"# header\n{category}word\n")
    monkeypatch.setattr(terms.resources, "files", lambda package: tmp_path)
    terms.term_categories.cache_clear()
    terms.medical_terms.cache_clear()
    yield folder
    terms.term_categories.cache_clear()
    terms.medical_terms.cache_clear()


def test_an_empty_category_file_is_refused_naming_it(lexicon_dir: Path):
    assert term_categories()["drugs"] == {"drugsword"}
    terms.term_categories.cache_clear()
    (lexicon_dir / "anatomy.txt").write_text("# only a comment\n\n")
    with pytest.raises(StageError, match=r"medasr/resources/terms/anatomy\.txt lists no words") as err:
        term_categories()
    assert "\n" not in str(err.value)
    (lexicon_dir / "anatomy.txt").unlink()
    with pytest.raises(StageError, match=r"anatomy\.txt is missing"):
        term_categories()


def test_category_metrics_count_missed_and_inserted_terms_per_category():
    pairs = [
        ("start amoxicillin for the pneumonia", "start ampicillin for the pneumonia"),
        ("the kidney scan and a ct", "the kidney scan and a ct and insulin"),
        ("see you next week", "see you next week"),
    ]
    result = category_metrics([align(normalize(r), normalize(h)) for r, h in pairs])
    assert set(result) == set(CATEGORIES)
    # drugs: amoxicillin missed, ampicillin and insulin inserted, 1 drug in the references
    assert result["drugs"] == {"terms": 1, "term_error_rate": 3.0, "term_recall": 0.0, "insertions": 2}
    assert result["conditions"] == {"terms": 1, "term_error_rate": 0.0, "term_recall": 1.0, "insertions": 0}
    assert result["anatomy"] == {"terms": 1, "term_error_rate": 0.0, "term_recall": 1.0, "insertions": 0}
    assert result["procedures_tests"]["terms"] == 1
    assert category_metrics([align("see you", "see you")])["drugs"] == {
        "terms": 0,
        "term_error_rate": None,
        "term_recall": None,
        "insertions": 0,
    }
