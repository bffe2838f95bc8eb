"""Transcript cleaning shared by the data stages.

The rules, in the order the manifest stage applies them (each is a `manifest.*` param, tested in test_text.py):
1. `text_normalization: unicode`: NFC and collapsed whitespace (casing and punctuation kept).
2. `annotation_tags: strip`: transcribers' markup is not speech. Paired uncertainty tags keep their words
   (`<UNSURE>chest</UNSURE>` -> `chest`: the annotator's best reading); every other tag is dropped with what it
   marks (`<INAUDIBLE>`, `<INAUDIBLE_SPEECH/>`, `<UNIN/>`, `[inaudible]`, `[laughter]`, `(noise)` is kept: round
   brackets are ordinary punctuation).
3. `all_caps: sentence_case`: a transcript with letters but no lowercase letter (OSCE-style references) becomes
   sentence case: lower case, then a capital at the start, after `.`, `?` or `!`, and for the pronoun "I" and its
   contractions. Otherwise the model would learn to drop the casing it emits. Acronyms (COPD, ECG) come out lower
   case: WER is scored on Whisper-normalised text, where case does not count, so only raw WER sees them.
"""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")
# <TAG>, </TAG>, <TAG/>, [tag]: names of letters, digits, _ and -, as transcription guidelines use them
_KEEP_WORDS_TAGS = re.compile(r"</?\s*(UNSURE|UNCERTAIN|GUESS)\s*>", re.IGNORECASE)
_OTHER_TAGS = re.compile(r"<\s*/?\s*[A-Za-z][\w-]*\s*/?\s*>|\[[A-Za-z][\w -]*\]")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:?!])")
_SENTENCE_START = re.compile(r"(^|[.?!]\s+)([a-z])")
_PRONOUN_I = re.compile(r"\bi\b(?=('(m|ve|ll|d|s))?\b)")


def clean_text(text: str | None) -> str:
    """NFC-normalise and collapse whitespace. Casing, punctuation and non-ASCII letters are kept: canary-qwen emits
    them, and NFC (not NFKC) leaves symbols such as the micro sign in "µg" alone."""
    if text is None:
        return ""
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def strip_tags(text: str) -> str:
    """Rule 2: drop annotation markup (uncertainty tags keep their words)."""
    text = _KEEP_WORDS_TAGS.sub(" ", text)
    text = _OTHER_TAGS.sub(" ", text)
    return _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACE.sub(" ", text)).strip()


def is_all_caps(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and not any(c.islower() for c in letters)


def sentence_case(text: str) -> str:
    """Rule 3, for an all-caps transcript (anything else is returned unchanged)."""
    if not is_all_caps(text):
        return text
    lowered = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text.lower())
    return _PRONOUN_I.sub("I", lowered)


def training_text(text: str, normalization: str, tags: str, all_caps: str) -> str:
    """A training target or reference, per the manifest params (see the module docstring)."""
    if normalization == "unicode":
        text = clean_text(text)
    if tags == "strip":
        text = strip_tags(text)
    if all_caps == "sentence_case":
        text = sentence_case(text)
    return text
