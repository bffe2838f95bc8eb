"""The transcript rules of stages/text.py, case by case (the module docstring states them)."""

from __future__ import annotations

import pytest

from medasr.text import is_all_caps, sentence_case, strip_tags, training_text


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("the <UNSURE>left</UNSURE> lung", "the left lung"),  # the annotator's best reading is kept
        ("pain <INAUDIBLE> since <inaudible/> monday", "pain since monday"),
        ("okay <UNIN/> , so", "okay, so"),  # no orphan space before punctuation
        ("[laughter] yes [cross talk] fine", "yes fine"),
        ("take 5 mg (twice daily) <b", "take 5 mg (twice daily) <b"),  # brackets and a lone < are text
        ("<INAUDIBLE_SPEECH/>", ""),
    ],
)
def test_strip_tags(raw, clean):
    assert strip_tags(raw) == clean


def test_sentence_case_only_touches_all_caps_text():
    assert sentence_case("I'VE HAD A COUGH. I'M TIRED! DO I NEED AN X-RAY? MAYBE") == (
        "I've had a cough. I'm tired! Do I need an x-ray? Maybe"
    )
    assert sentence_case("I have COPD, said Dr. Smith.") == "I have COPD, said Dr. Smith."
    assert is_all_caps("5 MG, BD") and not is_all_caps("5 mg") and not is_all_caps("123 .")
    assert sentence_case("IT IS ITCHY") == "It is itchy"  # "I" only as a whole word


def test_training_text_applies_each_rule_only_when_asked():
    raw = "PATIENT  <UNSURE>DENIES</UNSURE> FEVER"
    assert training_text(raw, "unicode", "strip", "sentence_case") == "Patient denies fever"
    assert training_text(raw, "unicode", "strip", "keep") == "PATIENT DENIES FEVER"
    assert training_text(raw, "none", "keep", "keep") == raw
