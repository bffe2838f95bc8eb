"""WER/CER scoring: Whisper's English normaliser (the Open ASR leaderboard's) with medical fixes, then jiwer.

Canary-qwen emits casing and punctuation; references may be ALL CAPS. Scores are computed on normalised text;
raw WER is reported beside it. Each utterance is aligned once (`align`): its error counts, its medical-term errors
and the corpus WER (the sum of the utterances' errors over the sum of their reference words, which is how jiwer
scores a corpus) all come from that one alignment.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

# Whisper's number normaliser turns a spoken "oh" into 0 ("oh I see" -> "0 i see"). In clinical talk "oh" is
# almost always the interjection, so it is protected. ok/okay and mum/mom are folded so spelling variants of the
# same word are not counted as errors (the fixes a published medical ASR benchmark applies).
_PROTECT_OH = re.compile(r"\boh\b", re.IGNORECASE)
_OH_MARK = "ohmedasrinterjection"
_FOLD = {"ok": "okay", "mum": "mom", "mums": "moms"}


@lru_cache(maxsize=1)
def _whisper():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    out = _whisper()(_PROTECT_OH.sub(_OH_MARK, text or "")).replace(_OH_MARK, "oh")
    return " ".join(_FOLD.get(word, word) for word in out.split())


@lru_cache(maxsize=1)
def medical_terms() -> frozenset[str]:
    """The medical-term lexicon (normalised words), shipped in medasr/resources/medical_terms.txt."""
    text = resources.files("medasr.resources").joinpath("medical_terms.txt").read_text(encoding="utf-8")
    return frozenset(w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#"))


@dataclass(frozen=True)
class Alignment:
    """One utterance's word errors against its reference (both normalised)."""

    substitutions: int
    deletions: int
    insertions: int
    reference_words: int
    medical_terms: int  # lexicon words in the reference
    medical_term_errors: int  # of those, the ones not recognised exactly


def align(reference_norm: str, hypothesis_norm: str) -> Alignment:
    import jiwer

    ref = reference_norm.split()
    if not ref:
        return Alignment(0, 0, len(hypothesis_norm.split()), 0, 0, 0)
    words = jiwer.process_words(reference_norm, hypothesis_norm or "")
    terms = medical_terms()
    total = sum(1 for w in ref if w in terms)
    correct = sum(
        1
        for chunk in words.alignments[0]
        if chunk.type == "equal"
        for w in ref[chunk.ref_start_idx : chunk.ref_end_idx]
        if w in terms
    )
    return Alignment(words.substitutions, words.deletions, words.insertions, len(ref), total, total - correct)


def utterance_errors(reference_norm: str, hypothesis_norm: str) -> dict[str, int]:
    a = align(reference_norm, hypothesis_norm)
    return {k: v for k, v in asdict(a).items() if not k.startswith("medical")}


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
