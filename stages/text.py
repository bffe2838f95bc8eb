"""Transcript cleaning shared by the data stages."""

from __future__ import annotations

import re
import unicodedata

_SPACE = re.compile(r"\s+")


def clean_text(text: str | None) -> str:
    """NFC-normalise and collapse whitespace. Casing, punctuation and non-ASCII letters are kept: canary-qwen emits
    them, and NFC (not NFKC) leaves symbols such as the micro sign in "µg" alone."""
    if text is None:
        return ""
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()
