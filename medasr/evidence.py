"""How sure eval's numbers are: paired-bootstrap intervals per set and the pooled summary a stakeholder reads.

Pure functions over prediction rows (`metrics/predictions.jsonl`'s: `set`, `id`, `model`, error counts and
`reference_words`). The unit of resampling is a row: an utterance, or a whole recording for a long-form set. Corpus
WER here is computed the way `medasr.scoring` computes it (the sum of errors over the sum of reference words, rows
without reference words left out), so a pooled WER equals the set WERs' words-weighted mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medasr.stats import PairedIntervals, paired_bootstrap

MODELS = ("finetuned", "base")
KINDS = ("medical", "general")
# Below this many units a 95 % percentile-bootstrap interval holds the truth far less often than 95 % (simulated with
# two equal models: 84 % of intervals held zero at 5 units, 88 % at 10, 91 % at 30, 96 % at 200), so no verdict is
# drawn from it: the interval is still reported, `excludes_zero` is None and the report says the set is too small.
MIN_UNITS = 20


def errors(row: dict[str, Any]) -> int:
    return row["substitutions"] + row["deletions"] + row["insertions"]


def paired_units(rows: Sequence[dict[str, Any]]) -> tuple[list[int], list[int], list[int]]:
    """(base errors, fine-tuned errors, reference words) per unit, the two models' rows of the same audio paired.
    Both models decode the same rows in the same order, so pairing is by position; a mismatch is a bug."""
    base = [r for r in rows if r["model"] == "base"]
    tuned = [r for r in rows if r["model"] == "finetuned"]
    if [(r["set"], r["id"]) for r in base] != [(r["set"], r["id"]) for r in tuned]:
        raise ValueError("base and fine-tuned predictions do not cover the same units in the same order")
    return [errors(r) for r in base], [errors(r) for r in tuned], [r["reference_words"] for r in base]


def intervals(rows: Sequence[dict[str, Any]], resamples: int, seed: int) -> PairedIntervals | None:
    return paired_bootstrap(*paired_units(rows), resamples, seed)


def add_intervals(block: dict[str, Any], rows: Sequence[dict[str, Any]], resamples: int, seed: int) -> dict[str, Any]:
    """`block` (one set's) with `wer_ci` in each model's entry and `wer_reduction_ci`; None where nothing scores."""
    ci = intervals(rows, resamples, seed)
    block["base"]["wer_ci"] = _pair(ci.base) if ci else None
    block["finetuned"]["wer_ci"] = _pair(ci.finetuned) if ci else None
    block["wer_reduction_ci"] = _pair(ci.reduction) if ci else None
    return block


def excludes_zero(interval: Sequence[float] | None, units: int) -> bool | None:
    """Whether the interval excludes zero; None (no verdict) without an interval or from fewer than MIN_UNITS units
    with reference words."""
    if interval is None or units < MIN_UNITS:
        return None
    return interval[0] > 0 or interval[1] < 0


SOURCE_KEYS = ("dataset", "config", "split", "revision")  # what a test set read: the same four, the same audio


def summary(tests: dict[str, dict[str, Any]], rows: Sequence[dict[str, Any]], resamples: int, seed: int) -> dict:
    """`summary`: the test sets pooled by kind (never val or the training sample: pass only test sets' blocks and
    rows, in eval.test_sets' order), each with its interval. A source scored twice (by utterance and long-form)
    is pooled once, as the first set that reads it: the others are named in `left_out`, not counted twice."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        names = [name for name, block in tests.items() if block["kind"] == kind]
        first: dict[tuple, str] = {}
        left_out = {}
        for name in names:
            source = tuple(tests[name].get(k) for k in SOURCE_KEYS) if "dataset" in tests[name] else (name,)
            if source in first:
                left_out[name] = f"same source as {first[source]}"
            else:
                first[source] = name
        kept = list(first.values())
        pooled_rows = [r for r in rows if r["set"] in kept]
        entry = pooled(kept, pooled_rows, resamples, seed, change=kind == "general") if names else None
        out[kind] = None if entry is None else entry | {"left_out": left_out}
    return out


def pooled(
    names: list[str], rows: Sequence[dict[str, Any]], resamples: int, seed: int, change: bool = False
) -> dict[str, Any]:
    """Corpus WER of both models over the sets' units together, and the reduction (base - fine-tuned), or with
    `change` the change (fine-tuned - base: positive = forgetting), with its paired-bootstrap interval."""
    base, tuned, words = paired_units(rows)
    total = sum(words)
    base_wer = sum(e for e, w in zip(base, words, strict=True) if w) / total if total else None
    tuned_wer = sum(e for e, w in zip(tuned, words, strict=True) if w) / total if total else None
    ci = paired_bootstrap(base, tuned, words, resamples, seed)
    reduction = None if base_wer is None or tuned_wer is None else base_wer - tuned_wer
    interval = _pair(ci.reduction) if ci else None
    entry: dict[str, Any] = {
        "sets": names,
        "utterances": len(words),
        "base_wer": base_wer,
        "finetuned_wer": tuned_wer,
    }
    if change:
        interval = None if interval is None else [-interval[1], -interval[0]]
        entry |= {"wer_change": None if reduction is None else -reduction, "wer_change_ci": interval}
    else:
        entry |= {"wer_reduction": reduction, "wer_reduction_ci": interval}
    return entry | {"excludes_zero": excludes_zero(interval, sum(1 for w in words if w))}


def headline(summary: dict[str, Any]) -> str:
    """One sentence from eval.json's `summary`: the medical gain and the forgetting check, each with its interval and
    what it says. Rendered where people read it (report.md, the terminal), never stored: a long string in a DVC
    metric makes `dvc metrics show` and `dvc exp show` unreadable."""
    medical, general = summary.get("medical"), summary.get("general")
    if medical is None or medical["wer_reduction"] is None:
        gain = "Medical WER: no medical test set was scored, so there is no evidence of a gain"
    else:
        verdict = _verdict(
            medical, medical["wer_reduction"] > 0, ("a real gain", "a real loss"), "not distinguishable from no change"
        )
        gain = (
            f"Medical WER ({_count(medical['sets'], 'test set')}, {medical['utterances']} units): "
            f"{_pct(medical['base_wer'])} base vs {_pct(medical['finetuned_wer'])} fine-tuned, a reduction of "
            f"{_points(medical['wer_reduction'], medical['wer_reduction_ci'])}: {verdict}"
        )
    if general is None or general["wer_change"] is None:
        forgetting = "general speech: no general set was scored, so forgetting is unchecked"
    else:
        verdict = _verdict(
            general, general["wer_change"] > 0, ("forgetting", "general speech improved"), "no measurable forgetting"
        )
        forgetting = (
            f"general WER ({_count(general['sets'], 'set')}, {general['utterances']} units): "
            f"{_pct(general['base_wer'])} base vs {_pct(general['finetuned_wer'])} fine-tuned, a change of "
            f"{_points(general['wer_change'], general['wer_change_ci'])}: {verdict}"
        )
    return f"{gain}; {forgetting}."


def _verdict(pooled: dict[str, Any], positive: bool, changes: tuple[str, str], no_change: str) -> str:
    """What a pooled entry's interval says: `changes` is (the positive change, the negative one)."""
    if pooled["excludes_zero"] is None:
        return f"too few units to tell from noise (a verdict needs {MIN_UNITS})"
    if pooled["excludes_zero"]:
        return f"{changes[0] if positive else changes[1]}, the interval excludes zero"
    return f"{no_change}, the interval includes zero"


def _pair(interval: tuple[float, float]) -> list[float]:
    return [interval[0], interval[1]]


def _count(names: list[str], noun: str) -> str:
    return f"{len(names)} {noun}{'' if len(names) == 1 else 's'}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _points(value: float, interval: Sequence[float] | None) -> str:
    """Percentage points with the 95 % interval, e.g. `2.1 points (95% CI 0.4 to 3.9)`."""
    ci = "no interval" if interval is None else f"95% CI {_one(interval[0])} to {_one(interval[1])}"
    return f"{_one(value)} points ({ci})"


def _one(fraction: float) -> str:
    """Percentage points to one decimal, without the "-0.0" of a tiny negative."""
    return f"{100 * fraction:.1f}".replace("-0.0", "0.0")
