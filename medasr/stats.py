"""Paired bootstrap intervals for corpus WER: is a fine-tune's gain larger than the test set's sampling noise?

The units resampled are the scored units of a test set: utterances, or whole recordings for a long-form set. One
resample draws as many units as the set has, with replacement, and computes corpus WER the way `medasr.scoring`
does (the sum of the drawn units' errors over the sum of their reference words), for both models on the SAME draw,
so the reduction's interval reflects that both models heard the same audio.

What the 95 % interval means: the range in which corpus WER (or the reduction) would fall for 95 % of other draws of
the same number of units of the same kind of audio: same speakers, microphones, domain and transcription style as
the test set. It does not cover a shift in any of those (new speakers, another microphone or clinic, another
transcriber's conventions); a set that samples one setting says nothing about another. Units of one speaker are not
independent, so with few speakers the interval is narrower than the truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Resamples are drawn in blocks so memory stays bounded (about this many drawn indices at once) on large sets.
_BLOCK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class PairedIntervals:
    """95 % percentile intervals (low, high) of corpus WER per model and of base - finetuned."""

    base: tuple[float, float]
    finetuned: tuple[float, float]
    reduction: tuple[float, float]


def paired_bootstrap(
    base_errors: Sequence[int], finetuned_errors: Sequence[int], words: Sequence[int], resamples: int, seed: int
) -> PairedIntervals | None:
    """Percentile 95 % intervals from `resamples` paired resamples of the units (seeded: same inputs and seed give
    the same intervals). `*_errors[i]` are unit i's word errors (substitutions + deletions + insertions) and
    `words[i]` its reference words; units with no reference words cannot be scored and are left out (as corpus WER
    leaves them out). None when no unit is left. The minimum number of resamples is a params rule, not enforced here.
    """
    base, tuned, ref = (np.asarray(x, dtype=np.float64) for x in (base_errors, finetuned_errors, words))
    if not base.shape == tuned.shape == ref.shape:
        raise ValueError("base_errors, finetuned_errors and words must have one entry per unit")
    keep = ref > 0
    base, tuned, ref = base[keep], tuned[keep], ref[keep]
    n = len(ref)
    if n == 0 or resamples < 1:
        return None
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // n)
    base_wer, tuned_wer = np.empty(resamples), np.empty(resamples)
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        total = ref[idx].sum(axis=1)
        base_wer[start:stop] = base[idx].sum(axis=1) / total
        tuned_wer[start:stop] = tuned[idx].sum(axis=1) / total
    return PairedIntervals(_interval(base_wer), _interval(tuned_wer), _interval(base_wer - tuned_wer))


def _interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)
