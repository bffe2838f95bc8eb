"""The paired bootstrap: what its intervals cover on known cases, and that they are reproducible."""

from __future__ import annotations

import pytest

from medasr.stats import PairedIntervals, paired_bootstrap


def test_identical_models_give_a_zero_reduction_interval():
    errors, words = [0, 2, 1, 5, 3, 0, 4, 1], [10, 12, 8, 20, 15, 9, 11, 7]
    ci = paired_bootstrap(errors, errors, words, resamples=1000, seed=0)
    assert isinstance(ci, PairedIntervals)
    assert ci.reduction == (0.0, 0.0)
    assert ci.base == ci.finetuned
    low, high = ci.base
    assert low < sum(errors) / sum(words) < high


def test_a_model_better_on_every_utterance_has_an_interval_excluding_zero():
    words = [20] * 60
    base = [1 + (i * 7) % 10 for i in range(60)]  # utterances differ a lot in difficulty
    tuned = [b - 1 for b in base]
    ci = paired_bootstrap(base, tuned, words, resamples=1000, seed=0)
    assert ci is not None and 0 < ci.reduction[0] <= ci.reduction[1]
    # the same models scored unpaired would overlap heavily; pairing is what makes the gain visible
    assert ci.base[0] < ci.finetuned[1]


def test_mixed_results_give_an_interval_around_zero():
    words = [10] * 40
    base = [2, 4] * 20
    tuned = [4, 2] * 20  # better on half the utterances, worse on the other half
    ci = paired_bootstrap(base, tuned, words, resamples=1000, seed=0)
    assert ci is not None and ci.reduction[0] < 0 < ci.reduction[1]


def test_same_seed_same_intervals_other_seed_other_intervals():
    base, tuned, words = [1, 3, 0, 2, 5, 1] * 5, [0, 2, 1, 2, 3, 1] * 5, [9, 12, 7, 10, 14, 8] * 5
    first = paired_bootstrap(base, tuned, words, resamples=1000, seed=7)
    assert first == paired_bootstrap(base, tuned, words, resamples=1000, seed=7)
    assert first != paired_bootstrap(base, tuned, words, resamples=1000, seed=8)


def test_more_units_give_narrower_intervals():
    def width(n: int) -> float:
        ci = paired_bootstrap([1, 3, 0, 2] * n, [0, 2, 1, 1] * n, [10] * (4 * n), resamples=2000, seed=0)
        assert ci is not None
        return ci.reduction[1] - ci.reduction[0]

    assert width(100) < width(25) < width(5)


def test_units_without_reference_words_are_left_out_and_nothing_left_is_none():
    with_empty = paired_bootstrap([1, 3, 2, 9], [0, 2, 1, 9], [10, 10, 10, 0], resamples=1000, seed=0)
    without = paired_bootstrap([1, 3, 2], [0, 2, 1], [10, 10, 10], resamples=1000, seed=0)
    assert with_empty == without
    assert paired_bootstrap([4], [4], [0], resamples=1000, seed=0) is None
    assert paired_bootstrap([], [], [], resamples=1000, seed=0) is None


def test_large_sets_are_resampled_in_blocks_with_the_same_result_shape():
    n = 5_000  # 1000 resamples of 5000 units do not fit one block
    ci = paired_bootstrap([1] * n, [0] * n, [10] * n, resamples=1000, seed=0)
    assert ci == PairedIntervals((0.1, 0.1), (0.0, 0.0), (0.1, 0.1))


def test_mismatched_lengths_are_a_programming_error():
    with pytest.raises(ValueError, match="one entry per unit"):
        paired_bootstrap([1, 2], [1], [3, 4], resamples=1000, seed=0)
