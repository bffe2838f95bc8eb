"""The medical-term lexicon, by category, and the per-category term metrics eval reports.

Each category is one file, `medasr/resources/terms/<category>.txt`: one normalised word per line (a word as
`medasr.scoring.normalize` outputs it), `#` comments. The files say where their words come from and under what licence
they ship. A word belongs to one category only, so per-category counts add up to the whole lexicon's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any, Protocol

from medasr import StageError

CATEGORIES = ("drugs", "conditions", "procedures_tests", "anatomy")


class Alignment(Protocol):
    """What category_metrics reads of a `medasr.scoring.Alignment` (scoring imports this module, so the class is
    described here rather than imported back)."""

    @property
    def ref_terms(self) -> tuple[str, ...]: ...
    @property
    def missed_terms(self) -> tuple[str, ...]: ...
    @property
    def inserted_terms(self) -> tuple[str, ...]: ...


@lru_cache(maxsize=1)
def term_categories() -> dict[str, frozenset[str]]:
    """{category: its words}, read from the shipped category files. An empty or missing file is a StageError: a
    category with no words would report nothing and look like a perfect score."""
    folder = resources.files("medasr.resources").joinpath("terms")
    out = {}
    for category in CATEGORIES:
        name = f"medasr/resources/terms/{category}.txt"
        path = folder.joinpath(f"{category}.txt")
        if not path.is_file():
            raise StageError(f"medical-term category file {name} is missing")
        words = frozenset(
            w for w in (line.strip() for line in path.read_text(encoding="utf-8").splitlines()) if w and w[0] != "#"
        )
        if not words:
            raise StageError(f"medical-term category file {name} lists no words")
        out[category] = words
    return out


@lru_cache(maxsize=1)
def medical_terms() -> frozenset[str]:
    """The whole lexicon: the union of the categories (what medical_term_wer counts)."""
    return frozenset().union(*term_categories().values())


def category_metrics(alignments: Sequence[Alignment]) -> dict[str, dict[str, Any]]:
    """Per category, over the utterances' alignments: `terms` (category words in the references), `term_error_rate`
    ((missed + inserted) / terms), `term_recall` (recognised exactly / terms), both None without terms, and
    `insertions` (category words in the hypotheses not aligned to an equal reference word: likely hallucinated)."""
    out = {}
    for category, words in term_categories().items():
        terms = sum(1 for a in alignments for w in a.ref_terms if w in words)
        missed = sum(1 for a in alignments for w in a.missed_terms if w in words)
        inserted = sum(1 for a in alignments for w in a.inserted_terms if w in words)
        out[category] = {
            "terms": terms,
            "term_error_rate": (missed + inserted) / terms if terms else None,
            "term_recall": (terms - missed) / terms if terms else None,
            "insertions": inserted,
        }
    return out
