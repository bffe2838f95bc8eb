"""Scoring: Whisper's English normaliser on its upstream test cases, our folds and medical fixes, the term metric,
the terms each alignment records, and the hallucination flags."""

from __future__ import annotations

import pytest

from medasr.scoring import (
    align,
    hallucination_flags,
    medical_term_errors,
    medical_terms,
    normalize,
    score,
    utterance_errors,
)

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
        ("Take 5 mg.", "take 5 milligrams"),
    ],
)
def test_medical_fixes(text, expected):
    assert normalize(text) == expected


# One case per fold we add on top of Whisper's normaliser (docs/normalisation.md lists each and why).
FOLDS = [
    ("Alright, see you", "all right see you"),
    ("it's all right", "it is all right"),  # the folded form is a fixed point
    ("cos it hurts", "because it hurts"),
    ("'cos it hurts", "because it hurts"),
    ("coz it hurts", "because it hurts"),
    ("cuz it hurts", "because it hurts"),
    ("lemme see", "let me see"),
    ("gimme a minute", "give me a minute"),
    ("outta breath", "out of breath"),
    ("a lotta pain", "a lot of pain"),
    ("you oughta rest", "you ought to rest"),
    ("til Monday", "till monday"),
    ("an xray", "an x ray"),
    ("an X-ray", "an x ray"),
    ("two xrays", "2 x rays"),
    ("coeliac disease", "celiac disease"),
    ("melaena", "melena"),
    ("catheterisation", "catheterization"),
    ("haematuria and a haematoma", "hematuria and a hematoma"),
    ("ischaemia, hypoglycaemia, septicaemia", "ischemia hypoglycemia septicemia"),
    ("ischaemic hypoglycaemic", "ischemic hypoglycemic"),
    ("oedema, oesophagitis", "edema esophagitis"),
    ("dyspnoea, apnoea, amenorrhoea", "dyspnea apnea amenorrhea"),
    ("5mg of ramipril", "5 milligrams of ramipril"),
    ("5 milligrams of ramipril", "5 milligrams of ramipril"),
    ("1 mg", "one milligram"),  # Whisper writes a lone 1 as "one"; said "one milligram"
    ("500 mcg", "500 micrograms"),
    ("500 microgrammes", "500 micrograms"),
    ("10 ml, 10 mls", "10 milliliters 10 milliliters"),
    ("10 millilitres", "10 milliliters"),  # Whisper's own fold, the form the abbreviation goes to
    ("70 kg", "70 kilograms"),
    ("oestradiol and oestrogens", "estradiol and estrogens"),
    ("leucocytes, a leucocyte", "leukocytes a leukocyte"),
    ("leucopenia", "leukopenia"),
]


@pytest.mark.parametrize(("text", "expected"), FOLDS)
def test_folds_map_spellings_of_the_same_words_onto_one(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("word", ["shoe", "canoe", "phoenix", "academia", "bohemian", "poem", "leucovorin"])
def test_british_medical_stems_leave_other_words_alone(word):
    assert normalize(word) == word


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


def test_alignment_records_which_terms_were_missed_and_inserted():
    ref = normalize("Start amoxicillin for the pneumonia, continue metformin.")
    hyp = normalize("start ampicillin for the pneumonia continue metformin and insulin")
    a = align(ref, hyp)
    assert a.ref_terms == ("amoxicillin", "pneumonia", "metformin")
    assert a.missed_terms == ("amoxicillin",)
    # a drug substituted by another is a missed term and an inserted one; "insulin" is inserted outright
    assert a.inserted_terms == ("ampicillin", "insulin")
    assert (a.medical_terms, a.medical_term_errors) == (3, 1)  # the older counts keep their meaning
    assert align(ref, ref).missed_terms == align(ref, ref).inserted_terms == ()
    empty = align("", "take aspirin")
    assert (empty.ref_terms, empty.missed_terms, empty.inserted_terms) == ((), (), ("aspirin",))


def test_repeated_ngram_loops_are_flagged_but_speech_repeats_are_not():
    # the longest back-to-back repeats in PriMock57's human transcripts: a word 6 times, a 2-gram 4, a 3-gram 3
    for said in ("okay " * 6, "it is " * 4, "it is not " * 3, "no no no i said no no no no"):
        assert hallucination_flags(normalize(said), 10.0) == []
    assert hallucination_flags("thank you " * 8, 30.0) == ["repeated_ngram"]
    assert hallucination_flags("take the tablet " + "every day at noon " * 8, 60.0) == ["repeated_ngram"]
    assert hallucination_flags("yes " * 7, 10.0) == []  # one short of the threshold


def test_a_sentence_repeated_three_times_is_a_loop_but_said_twice_is_not():
    # PriMock57's human transcripts never repeat a 5- to 30-gram back to back more than twice
    sentence = "i have had this pain in my chest since yesterday "
    assert hallucination_flags(normalize(sentence * 5), 30.0) == ["repeated_ngram"]
    assert hallucination_flags(normalize(sentence * 3), 30.0) == ["repeated_ngram"]
    assert hallucination_flags(normalize(sentence * 2), 30.0) == []
    assert hallucination_flags("a b c d e " * 2 + "a b c d", 30.0) == []  # 5-gram: one short of three
    thirty = " ".join(f"w{i}" for i in range(30)) + " "
    assert hallucination_flags(thirty * 3, 60.0) == ["repeated_ngram"]
    assert hallucination_flags("it is not " * 3 + "it is not it", 30.0) == []  # a 3-gram stays at 8 repeats


def test_hypotheses_far_longer_than_the_audio_allows_are_flagged():
    words = " ".join(f"w{i}" for i in range(70))
    assert hallucination_flags(words, 10.0) == []  # 6 words/s * 10 s + 10 words of slack
    assert hallucination_flags(words + " w70", 10.0) == ["too_long"]
    assert hallucination_flags(" ".join(f"w{i}" for i in range(11)), 0.0) == ["too_long"]
    assert hallucination_flags("", 0.0) == []
    assert hallucination_flags("a b " * 40, 2.0) == ["repeated_ngram", "too_long"]


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
