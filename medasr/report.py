"""What eval shows people: the headline table for the terminal, `metrics/report.md`, and the rows of the WER plot.

Pure functions of `metrics/eval.json`'s content and `metrics/predictions.jsonl`'s rows. WERs print as percentages;
reductions (base WER - fine-tuned WER) as percentage points, positive when the fine-tune is better, each with its
95 % paired-bootstrap interval (`medasr.evidence`): an interval that excludes zero is a change larger than the
sampling noise of the set; one that includes zero is not distinguishable from no change.
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from medasr.evidence import KINDS, MIN_UNITS, MODELS, errors, excludes_zero, headline
from medasr.scoring import word_diff

WIDTH = 100  # the headline table fits a terminal this wide
WORST = 10  # utterances shown with their aligned diff
WORST_MIN_WORDS = 5  # below this a single error is a WER of 20 % or more: no fair ranking by WER
TOP_TERMS = 10


def set_blocks(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, block) of every scored set: val, the test sets, the training sample, in that order."""
    sets = [("val", metrics["val"])] if "val" in metrics else []
    sets += list(metrics.get("test", {}).items())
    return sets + ([("train_sample", metrics["train_sample"])] if "train_sample" in metrics else [])


def plot_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The WER plot's data: one row per set and model with a WER (dvc.yaml draws it grouped by set)."""
    return [
        {"set": name, "model": model, "wer": block[model]["wer"]}
        for name, block in set_blocks(metrics)
        for model in ("base", "finetuned")
        if block[model].get("wer") is not None
    ]


# --- the terminal -------------------------------------------------------------------------------------------------


def table_rows(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, block) per set, then one per pooled kind of `summary` shaped like a set's block (its `wer_change_ci`
    turned into a reduction's interval), so both tables read the same rows."""
    rows = set_blocks(metrics)
    for kind in KINDS:
        if pooled := (metrics.get("summary") or {}).get(kind):
            ci = pooled.get("wer_reduction_ci") or _negate(pooled.get("wer_change_ci"))
            models = {"base": pooled["base_wer"], "finetuned": pooled["finetuned_wer"]}
            block = {m: {"wer": wer, "utterances": pooled["utterances"]} for m, wer in models.items()}
            rows.append((f"{kind} (pooled)", block | {"kind": kind, "wer_reduction_ci": ci}))
    return rows


def headline_table(metrics: dict[str, Any]) -> str:
    """Plain text, at most WIDTH columns: per set its kind, units, both WERs and the reduction with its interval,
    then the pooled medical and general rows and the headline sentence."""
    summary = metrics.get("summary") or {}
    header = ("set", "kind", "utts", "base WER", "fine-tuned WER", "reduction [95% CI]")
    cells = [
        (name if len(name) <= 26 else name[:23] + "...", block.get("kind", ""), str(tuned["utterances"]),
         _pct(base["wer"]), _pct(tuned["wer"]),
         _reduction(_difference(base["wer"], tuned["wer"]), block.get("wer_reduction_ci"), _units(block)))
        for name, block in table_rows(metrics)
        for base, tuned in [(block["base"], block["finetuned"])]
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    right = (False, False, True, True, True, False)

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *(line(c) for c in cells), ""]
    out += textwrap.wrap(
        "reduction = base WER - fine-tuned WER in percentage points (positive: the fine-tune is better); "
        "* = its 95% interval excludes zero (a change beyond the sets' sampling noise); ? = fewer than "
        f"{MIN_UNITS} units, too few to judge.",
        WIDTH,
    )
    if summary:
        out += ["", *textwrap.wrap(headline(summary), WIDTH)]
    return "\n".join(out)


# --- metrics/report.md --------------------------------------------------------------------------------------------


def render(metrics: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> str:
    """The whole report as markdown."""
    summary = metrics.get("summary") or {}
    held_out = _held_out(metrics, predictions)
    parts = ["# Evaluation report", ""]
    if summary:
        parts += [f"**{_esc(headline(summary))}**", ""]
    parts += _sets_section(metrics) + _terms_section(metrics)
    parts += _term_counts_section(held_out) + _roles_section(predictions) + _worst_section(held_out)
    return "\n".join(parts).rstrip() + "\n"


def _sets_section(metrics: dict[str, Any]) -> list[str]:
    lines = [
        "## WER per set",
        "",
        "Corpus WER on normalised text, base model vs fine-tuned, each with its 95% interval from a paired bootstrap "
        "over the set's units (utterances; whole recordings for long-form sets). The reduction is base - fine-tuned "
        "in percentage points. If the same kind of audio were sampled again, 95% of such samples would give a "
        "value inside the interval; an interval that excludes zero is a change larger than the sampling noise. "
        "The pooled rows put the test sets of one kind together (never val or the training sample): medical is "
        "the gain, general the forgetting check (a negative reduction there is general WER rising).",
        "",
        "| set | kind | long-form | units | base WER [95% CI] | fine-tuned WER [95% CI] | reduction [95% CI] "
        "| what the interval says |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for name, block in table_rows(metrics):
        base, tuned, ci = block["base"], block["finetuned"], block.get("wer_reduction_ci")
        reduction = _difference(base["wer"], tuned["wer"])
        lines.append(
            f"| {_esc(name)} | {block.get('kind', '')} | {_YES_NO.get(block.get('long_form'), '')} "
            f"| {tuned['utterances']} | {_pct(base['wer'], base.get('wer_ci'))} "
            f"| {_pct(tuned['wer'], tuned.get('wer_ci'))} | {_reduction(reduction, ci, _units(block))} "
            f"| {_verdict(reduction, ci, _units(block))} |"
        )
    for kind in KINDS:
        for name, why in ((metrics.get("summary") or {}).get(kind) or {}).get("left_out", {}).items():
            lines.append(f"\n{_esc(name)} is left out of the {kind} pool: {_esc(why)} (its audio counts once).")
    lines += [
        "",
        "Decoding: windows decoded and utterances flagged as likely hallucination (repeated n-gram loops, "
        "or far more words than the audio's length allows).",
        "",
        "| set | windows (base / fine-tuned) | flagged (base / fine-tuned) |",
        "|---|---|---|",
    ]
    for name, block in set_blocks(metrics):
        windows = " / ".join(str(block[m].get("windows", "-")) for m in ("base", "finetuned"))
        flagged = " / ".join(str(block[m].get("hallucinated", "-")) for m in ("base", "finetuned"))
        lines.append(f"| {_esc(name)} | {windows} | {flagged} |")
    return [*lines, ""]


def _terms_section(metrics: dict[str, Any]) -> list[str]:
    lines = [
        "## Medical terms by category",
        "",
        "Term error rate = (missed + inserted category terms) / category terms in the references; recall = terms "
        "recognised exactly / terms; inserted = category terms in the hypothesis that the reference lacks there. "
        "A term recognised as another term counts twice, missed and inserted, so an error rate can pass 100%.",
        "",
        "| set | category | terms | error rate (base / fine-tuned) | recall (base / fine-tuned) "
        "| inserted (base / fine-tuned) |",
        "|---|---|---:|---|---|---|",
    ]
    for name, block in set_blocks(metrics):
        categories = block["finetuned"].get("term_categories") or {}
        for category, tuned in categories.items():
            base = block["base"].get("term_categories", {}).get(category, {})
            lines.append(
                f"| {_esc(name)} | {category} | {tuned['terms']} "
                f"| {_pct(base.get('term_error_rate'))} / {_pct(tuned['term_error_rate'])} "
                f"| {_pct(base.get('term_recall'))} / {_pct(tuned['term_recall'])} "
                f"| {base.get('insertions', '-')} / {tuned['insertions']} |"
            )
    return [*lines, ""]


def _term_counts_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for field, title in (("missed_terms", "Most-missed terms"), ("inserted_terms", "Most-hallucinated terms")):
        counts = {m: Counter(w for r in rows if r["model"] == m for w in r.get(field, ())) for m in MODELS}
        top = sorted(counts["finetuned"].items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TERMS]
        what = "missed" if field == "missed_terms" else "inserted"
        lines += [f"## {title} (held-out sets)", ""]
        if not top:
            lines += [f"The fine-tuned model {what} no lexicon term.", ""]
            continue
        lines += [f"| term | {what} by fine-tuned | {what} by base |", "|---|---:|---:|"]
        lines += [f"| {_esc(term)} | {n} | {counts['base'][term]} |" for term, n in top]
        lines.append("")
    return lines


def _roles_section(predictions: Sequence[dict[str, Any]]) -> list[str]:
    """WER per speaker role where the rows know one (PriMock57's doctor and patient channels)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in predictions:
        if row.get("role") and row["set"] != "train_sample":
            groups.setdefault((row["set"], row["role"]), []).append(row)
    if not groups:
        return []
    lines = [
        "## WER per speaker role",
        "",
        "| set | role | units | base WER | fine-tuned WER |",
        "|---|---|---:|---|---|",
    ]
    for (name, role), rows in sorted(groups.items()):
        wers = {m: _wer([r for r in rows if r["model"] == m]) for m in MODELS}
        units = sum(1 for r in rows if r["model"] == "finetuned")
        lines.append(f"| {_esc(name)} | {role} | {units} | {_pct(wers['base'])} | {_pct(wers['finetuned'])} |")
    return [*lines, ""]


def _worst_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The fine-tuned model's worst units by WER, ties by errors then id: utterances (long-form recordings have their
    own per-set figures), or the recordings when the held-out sets are all long-form."""
    tuned = [r for r in rows if r["model"] == "finetuned"]
    short = [r for r in tuned if not r.get("long_form")]
    unit = "utterances" if short or not tuned else "recordings"
    ranked = [r for r in (short or tuned) if errors(r) and r["reference_words"] >= WORST_MIN_WORDS]
    worst = sorted(ranked, key=lambda r: (-errors(r) / r["reference_words"], -errors(r), str(r["id"]), r["set"]))
    base = {(r["set"], r["id"]): r for r in rows if r["model"] == "base"}
    lines = [
        f"## The {WORST} worst {unit} (fine-tuned model, held-out sets)",
        "",
        f"By WER (errors / reference words, {WORST_MIN_WORDS} words or more). Aligned word diff of the normalised "
        "texts: `[ref->hyp]` a substitution, `[-ref]` a word missed, `[+hyp]` a word inserted; long runs of correct "
        "words are shortened to `...`.",
        "",
    ]
    for i, row in enumerate(worst[:WORST], 1):
        other = base.get((row["set"], row["id"]))
        base_note = f"; base: {_count(errors(other), 'error')}" if other else ""
        role = f", {row['role']}" if row.get("role") else ""
        lines += [
            f"### {i}. {_esc(row['set'])} / {_esc(str(row['id']))}{role}",
            "",
            f"{_count(errors(row), 'error')} in {_count(row['reference_words'], 'reference word')} "
            f"(WER {_pct(errors(row) / row['reference_words'])}){base_note}.",
            "",
            "~~~text",
            *(textwrap.wrap(word_diff(row["reference_norm"], row["hypothesis_norm"]), WIDTH) or [""]),
            "~~~",
            "",
        ]
    return lines


def _held_out(metrics: dict[str, Any], predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of audio training never saw: the test sets', or val's when there are none."""
    names = set(metrics.get("test", {})) or {"val"}
    return [r for r in predictions if r["set"] in names]


def _wer(rows: Iterable[dict[str, Any]]) -> float | None:
    scored = [r for r in rows if r["reference_words"]]
    words = sum(r["reference_words"] for r in scored)
    return sum(errors(r) for r in scored) / words if words else None


def _difference(base: float | None, tuned: float | None) -> float | None:
    return None if base is None or tuned is None else base - tuned


def _negate(interval: Sequence[float] | None) -> list[float] | None:
    return None if interval is None else [-interval[1], -interval[0]]


def _pct(value: float | None, interval: Sequence[float] | None = None) -> str:
    """A percentage, with its interval in brackets when there is one."""
    return "n/a" if value is None else f"{100 * value:.1f}%" + (f" {_ci(interval)}" if interval else "")


def _ci(interval: Sequence[float] | None, points: bool = False) -> str:
    if interval is None:
        return ""
    lo, hi = (f"{100 * v:+.1f}" if points else f"{100 * v:.1f}" for v in interval)
    return f"[{lo}, {hi}]"


def _units(block: dict[str, Any]) -> int:
    """Units with reference words: what the bootstrap resampled."""
    return block["finetuned"]["utterances"] - block["finetuned"].get("empty_references", 0)


def _reduction(value: float | None, interval: Sequence[float] | None, units: int) -> str:
    if value is None:
        return "n/a"
    mark = {True: " *", False: "", None: " ?" if interval else ""}[excludes_zero(interval, units)]
    return f"{100 * value:+.1f} {_ci(interval, points=True)}{mark}"


def _verdict(value: float | None, interval: Sequence[float] | None, units: int) -> str:
    if value is None or interval is None:
        return "nothing to score"
    if excludes_zero(interval, units) is None:
        return f"too few units to judge (a verdict needs {MIN_UNITS})"
    if not excludes_zero(interval, units):
        return "includes zero: no change beyond noise"
    return "excludes zero: " + ("fine-tuned lower" if interval[0] > 0 else "fine-tuned higher")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


_MARKDOWN = re.compile(r"([\\`*_\[\]<>#|~])")
_YES_NO: dict[Any, str] = {True: "yes", False: "no"}


def _esc(text: str) -> str:
    """Text safe in a markdown table cell or heading: markdown's punctuation backslash-escaped."""
    return _MARKDOWN.sub(r"\\\1", text)
