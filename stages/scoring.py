"""WER/CER scoring: Whisper's English normaliser (the Open ASR leaderboard's) with medical fixes, then jiwer.

Canary-qwen emits casing and punctuation; references may be ALL CAPS. Scores are computed on normalised text;
raw WER is reported beside it.
"""

from __future__ import annotations

import re
from functools import lru_cache
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


def score(references: list[str], hypotheses: list[str]) -> dict[str, Any]:
    """Corpus-level WER and CER on normalised text, raw WER, and the error counts. Utterances whose normalised
    reference is empty cannot be scored and are counted instead."""
    import jiwer

    pairs = [(normalize(r), normalize(h), r, h) for r, h in zip(references, hypotheses, strict=True)]
    scored = [x for x in pairs if x[0]]
    result: dict[str, Any] = {"utterances": len(pairs), "empty_references": len(pairs) - len(scored)}
    if not scored:
        return result | {"wer": None, "cer": None, "raw_wer": None}
    refs, hyps = [x[0] for x in scored], [x[1] or "" for x in scored]
    words = jiwer.process_words(refs, hyps)
    result |= {
        "wer": words.wer,
        "cer": jiwer.cer(refs, hyps),
        "raw_wer": jiwer.wer([x[2] for x in scored], [x[3] or "" for x in scored]),
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "reference_words": sum(len(r.split()) for r in refs),
        "empty_hypotheses": sum(1 for x in scored if not x[1]),
    }
    return result
