"""WER/CER scoring: Whisper's English normaliser (the Open ASR leaderboard's) with medical fixes, then jiwer.

Canary-qwen emits casing and punctuation; references may be ALL CAPS. Scores are computed on normalised text;
raw WER is reported beside it. Each utterance is aligned once (`align`): its error counts, its medical-term errors
and the corpus WER (the sum of the utterances' errors over the sum of their reference words, which is how jiwer
scores a corpus) all come from that one alignment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from medasr.terms import medical_terms  # the lexicon lives in medasr.terms; kept importable from here

# Whisper's number normaliser turns a spoken "oh" into 0 ("oh I see" -> "0 i see"). In clinical talk "oh" is
# almost always the interjection, so it is protected. The folds below map spellings of the same words onto one form,
# after Whisper's normaliser (which already folds gonna, wanna, kinda, sorta, gotta, dunno, cause and most British
# spellings): each is an equivalence, never a judgement about meaning. docs/normalisation.md lists and justifies
# every one, and what is deliberately not folded.
_PROTECT_OH = re.compile(r"\boh\b", re.IGNORECASE)
_OH_MARK = "ohmedasrinterjection"
_FOLD = {
    "ok": "okay",
    "mum": "mom",
    "mums": "moms",
    "alright": "all right",
    "cos": "because",
    "coz": "because",
    "cuz": "because",
    "lemme": "let me",
    "gimme": "give me",
    "outta": "out of",
    "lotta": "lot of",
    "oughta": "ought to",
    "til": "till",
    "xray": "x ray",
    "xrays": "x rays",
    "coeliac": "celiac",
    "melaena": "melena",
    "catheterisation": "catheterization",
    "microgramme": "microgram",  # Whisper folds milligramme and kilogramme, not this one
    "microgrammes": "micrograms",
}
# Unit abbreviations, read out as the word: "5 mg" is said "5 milligrams". Plural unless the number is one (Whisper
# writes a lone 1 as "one"), as the word would be said; "mls" is always plural.
_UNIT = {"mg": "milligram", "mcg": "microgram", "ml": "milliliter", "kg": "kilogram"}
_PLURAL_UNIT = {"mls": "milliliters"}
# British medical spellings Whisper's word list lacks (oedema, haematuria, ischaemia, dyspnoea ...), by stem.
_BRITISH_MEDICAL = (
    (re.compile(r"^haem"), "hem"),  # haematuria, haematoma, haemoptysis, haemodialysis
    (re.compile(r"aem(?=i)"), "em"),  # ischaemia, hypoglycaemia, septicaemia, glycaemic, leukaemic
    (re.compile(r"^oe(?=soph|dem|str)"), "e"),  # oesophagitis, oesophageal, oedema, oedematous, oestradiol
    (re.compile(r"^leuc(?=ocyt|open)"), "leuk"),  # leucocyte(s), leucocytosis, leucopenia; not leucovorin
    (re.compile(r"(rrh|pn)oe"), r"\1e"),  # amenorrhoea, diarrhoeal, dyspnoea, apnoea, dyspnoeic
)


def _fold(word: str) -> str:
    for pattern, american in _BRITISH_MEDICAL:
        word = pattern.sub(american, word)
    return _FOLD.get(word, word)


@lru_cache(maxsize=1)
def _whisper():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    words = _whisper()(_PROTECT_OH.sub(_OH_MARK, text or "")).replace(_OH_MARK, "oh").split()
    return " ".join(_unit(word, before) for before, word in zip(["", *words], words, strict=False))


def _unit(word: str, before: str) -> str:
    if word in _UNIT:
        return _UNIT[word] + ("" if before == "one" else "s")
    return _PLURAL_UNIT.get(word) or _fold(word)


@dataclass(frozen=True)
class Alignment:
    """One utterance's word errors against its reference (both normalised)."""

    substitutions: int
    deletions: int
    insertions: int
    reference_words: int
    medical_terms: int  # lexicon words in the reference
    medical_term_errors: int  # of those, the ones not recognised exactly
    ref_terms: tuple[str, ...] = ()  # lexicon words in the reference, in order
    missed_terms: tuple[str, ...] = ()  # of those, the ones not recognised exactly, in order
    inserted_terms: tuple[str, ...] = ()  # lexicon words in the hypothesis not aligned to an equal reference word


_COUNTS = ("substitutions", "deletions", "insertions", "reference_words")


def align(reference_norm: str, hypothesis_norm: str) -> Alignment:
    import jiwer

    ref, hyp = reference_norm.split(), (hypothesis_norm or "").split()
    terms = medical_terms()
    if not ref:
        return Alignment(0, 0, len(hyp), 0, 0, 0, inserted_terms=tuple(w for w in hyp if w in terms))
    words = jiwer.process_words(reference_norm, hypothesis_norm or "")
    equal_ref: set[int] = set()  # word positions the alignment matched exactly
    equal_hyp: set[int] = set()
    for chunk in words.alignments[0]:
        if chunk.type == "equal":
            equal_ref.update(range(chunk.ref_start_idx, chunk.ref_end_idx))
            equal_hyp.update(range(chunk.hyp_start_idx, chunk.hyp_end_idx))
    ref_terms = tuple(w for w in ref if w in terms)
    missed = tuple(w for i, w in enumerate(ref) if w in terms and i not in equal_ref)
    inserted = tuple(w for i, w in enumerate(hyp) if w in terms and i not in equal_hyp)
    return Alignment(
        words.substitutions,
        words.deletions,
        words.insertions,
        len(ref),
        len(ref_terms),
        len(missed),
        ref_terms,
        missed,
        inserted,
    )


def utterance_errors(reference_norm: str, hypothesis_norm: str) -> dict[str, int]:
    a = align(reference_norm, hypothesis_norm)
    return {k: getattr(a, k) for k in _COUNTS}


def medical_term_errors(reference_norm: str, hypothesis_norm: str) -> tuple[int, int]:
    """(lexicon words in the reference that were not recognised exactly, lexicon words in the reference)."""
    a = align(reference_norm, hypothesis_norm)
    return a.medical_term_errors, a.medical_terms


def score_aligned(
    references: list[str], hypotheses: list[str], normalized: list[tuple[str, str]], alignments: list[Alignment]
) -> dict[str, Any]:
    """Corpus metrics from per-utterance alignments: WER and CER on normalised text, raw WER, error counts.
    Utterances whose normalised reference is empty cannot be scored and are counted instead."""
    import jiwer

    scored = [i for i, (ref, _) in enumerate(normalized) if ref]
    result: dict[str, Any] = {"utterances": len(normalized), "empty_references": len(normalized) - len(scored)}
    if not scored:
        return result | {"wer": None, "cer": None, "raw_wer": None}
    counts = {k: sum(getattr(alignments[i], k) for i in scored) for k in ("substitutions", "deletions", "insertions")}
    words = sum(alignments[i].reference_words for i in scored)
    return result | {
        "wer": sum(counts.values()) / words,
        "cer": jiwer.cer([normalized[i][0] for i in scored], [normalized[i][1] for i in scored]),
        "raw_wer": jiwer.wer([references[i] for i in scored], [hypotheses[i] or "" for i in scored]),
        **counts,
        "reference_words": words,
        "empty_hypotheses": sum(1 for i in scored if not normalized[i][1]),
    }


def score_utterances(
    references: list[str], hypotheses: list[str]
) -> tuple[dict[str, Any], list[tuple[str, str]], list[Alignment]]:
    """Corpus metrics (see `score_aligned`) with what they came from: each utterance's normalised (reference,
    hypothesis) and its alignment."""
    normalized = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True)]
    alignments = [align(r, h) for r, h in normalized]
    return score_aligned(references, hypotheses, normalized, alignments), normalized, alignments


def score(references: list[str], hypotheses: list[str]) -> dict[str, Any]:
    """Corpus-level WER and CER on normalised text, raw WER, and the error counts (see `score_aligned`)."""
    return score_utterances(references, hypotheses)[0]


# Likely hallucination, judged on the hypothesis alone. In PriMock57's published consultation transcripts (55
# consultations, both channels, normalised) the longest back-to-back repeats people actually said are a word 6
# times ("okay okay ..."), a 2-gram 4 times ("it is it is ..."), a 3-gram 3 times, and any 4- to 30-gram twice; a
# decoder stuck in a loop repeats until its token limit. 8 repeats of a 1- to 4-gram, or 3 of a 5- to 30-gram (a
# sentence said over and over), is past all of that. (A 3- or 4-gram repeated 6 times is also a 6- or 8-gram
# repeated 3 times, so it counts from there.)
_LOOP_REPEATS = ((range(1, 5), 8), (range(5, 31), 3))
# Fast conversational speech is about 4-5 words per second (PriMock57's fastest intervals: 6.7 words/s over a couple of
# seconds, under 6 over 5 s and more). More words than 6 per second of audio plus 10 (short clips, number words that
# the normaliser expands) is more than anyone said in the audio.
_MAX_WORDS_PER_S = 6.0
_SLACK_WORDS = 10


def hallucination_flags(hypothesis_norm: str, duration_s: float) -> list[str]:
    """Flags for a likely hallucinated hypothesis (normalised): "repeated_ngram" (a 1- to 4-gram repeated back to
    back at least 8 times, or a 5- to 30-gram at least 3 times), "too_long" (more words than 6 per second of audio
    plus 10). Empty when neither."""
    words = hypothesis_norm.split()
    flags = []
    if _has_loop(words):
        flags.append("repeated_ngram")
    if len(words) > _MAX_WORDS_PER_S * max(duration_s, 0.0) + _SLACK_WORDS:
        flags.append("too_long")
    return flags


def _has_loop(words: list[str]) -> bool:
    for sizes, repeats in _LOOP_REPEATS:
        for n in sizes:
            # positions where the word equals the one n places later; a run of n * (R - 1) of them is R repeats
            run = 0
            for i in range(len(words) - n):
                run = run + 1 if words[i] == words[i + n] else 0
                if run >= n * (repeats - 1):
                    return True
    return False


# an aligned diff shows at most this many words; runs of correct words longer than KEEP_RUN are cut to their ends
DIFF_WORDS = 150
KEEP_RUN = 12


def word_diff(reference_norm: str, hypothesis_norm: str) -> str:
    """The reference with the hypothesis's differences inline (jiwer's alignment): `[a->b]` substituted,
    `[-a]` deleted, `[+b]` inserted; correct runs longer than KEEP_RUN keep their ends; at most DIFF_WORDS words."""
    ref, hyp = reference_norm.split(), (hypothesis_norm or "").split()
    if not ref:
        tokens = [f"[+{w}]" for w in hyp]
    else:
        import jiwer

        tokens = []
        for chunk in jiwer.process_words(reference_norm, hypothesis_norm or "").alignments[0]:
            r, h = ref[chunk.ref_start_idx : chunk.ref_end_idx], hyp[chunk.hyp_start_idx : chunk.hyp_end_idx]
            if chunk.type == "equal":
                tokens += _shorten(r)
            elif chunk.type == "substitute":
                tokens += [f"[{a}->{b}]" for a, b in zip(r, h, strict=True)]
            elif chunk.type == "delete":
                tokens += [f"[-{a}]" for a in r]
            else:
                tokens += [f"[+{b}]" for b in h]
    if len(tokens) > DIFF_WORDS:
        tokens = [*tokens[:DIFF_WORDS], f"... ({len(tokens) - DIFF_WORDS} more)"]
    return " ".join(tokens)


def _shorten(words: list[str]) -> list[str]:
    half = KEEP_RUN // 2
    return words if len(words) <= KEEP_RUN else [*words[:half], "...", *words[-half:]]
