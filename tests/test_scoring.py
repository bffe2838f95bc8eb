"""Scoring: Whisper's English normaliser on its upstream test cases, our medical fixes, and the term metric."""

from __future__ import annotations

import pytest

from medasr.scoring import medical_term_errors, medical_terms, normalize, score, utterance_errors

# Cases from OpenAI Whisper's own tests (openai/whisper, tests/test_normalizer.py): the normaliser we use must
# behave as the one the Open ASR leaderboard uses.
UPSTREAM = [
    ("two", "2"),
    ("thirty one", "31"),
    ("nineteen ninety nine", "1999"),
    ("two point five million", "2500000"),
    ("forty three thousand two hundred and sixty", "43260"),
    ("thirty first", "31st"),
    ("ninety percent", "90%"),
    ("seventy six per cent", "76%"),
    ("nine one one", "911"),
    ("minus 500", "-500"),
    ("two dollars and seventy cents", "$2.70"),
    ("3 point 14", "3.14"),
    ("Let's", "let us"),
    ("he's like", "he is like"),
    ("she's been like", "she has been like"),
    ("10km", "10 km"),
    ("10mm", "10 mm"),
    ("Mr. Park visited Assoc. Prof. Kim Jr.", "mister park visited associate professor kim junior"),
]


@pytest.mark.parametrize(("text", "expected"), UPSTREAM)
def test_upstream_whisper_normaliser_cases(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Oh, I see.", "oh i see"),  # Whisper alone would give "0 i see"
        ("OK", "okay"),
        ("Okay", "okay"),
        ("Mum said", "mom said"),
        ("PATIENT HAS A FEVER", "patient has a fever"),  # all-caps references score like cased hypotheses
        ("Take 5 mg.", "take 5 mg"),
    ],
)
def test_medical_fixes(text, expected):
    assert normalize(text) == expected


def test_scoring_is_casing_and_punctuation_blind_and_counts_errors():
    result = score(["The patient has a fever.", "TAKE AMOXICILLIN"], ["the patient has fever", "take amoxicillin"])
    assert result["wer"] == pytest.approx(1 / 7)
    assert (result["substitutions"], result["deletions"], result["insertions"]) == (0, 1, 0)
    assert result["raw_wer"] > result["wer"]  # raw text differs in case and punctuation


def test_empty_references_and_hypotheses_are_counted_not_fatal():
    result = score(["", "hello there", "um"], ["anything", "", "x"])
    assert result["utterances"] == 3
    # "" cannot be scored, and Whisper's normaliser removes fillers, so "um" is empty after normalising too
    assert result["empty_references"] == 2
    assert result["empty_hypotheses"] == 1 and result["wer"] == 1.0  # "hello there" vs nothing


def test_medical_term_errors_count_reference_terms_not_recognised():
    assert {"amoxicillin", "pneumonia", "metformin"} <= medical_terms()
    ref = normalize("Start amoxicillin for the pneumonia, continue metformin.")
    hyp = normalize("start a moxicillin for the pneumonia continue metformin")
    assert medical_term_errors(ref, hyp) == (1, 3)
    assert medical_term_errors(ref, "") == (3, 3)
    assert medical_term_errors(normalize("see you next week"), "") == (0, 0)


def test_utterance_errors():
    assert utterance_errors("a b c", "a x c d") == {
        "substitutions": 1,
        "deletions": 0,
        "insertions": 1,
        "reference_words": 3,
    }
    assert utterance_errors("", "extra words") == {
        "substitutions": 0,
        "deletions": 0,
        "insertions": 2,
        "reference_words": 0,
    }
