"""The evidence eval adds to its numbers (medasr.evidence) and what people read of them (medasr.report), on
hand-made prediction rows: intervals, the pooled summary and its headline, the headline table, report.md, the plot
rows."""

from __future__ import annotations

import re

import pytest

from medasr import evidence, report
from medasr.scoring import DIFF_WORDS, word_diff


def row(set_: str, id_: str, model: str, errors: int, words: int, **extra) -> dict:
    """A predictions.jsonl row: its errors as substitutions (the report reads only the total)."""
    return {
        "set": set_,
        "id": id_,
        "model": model,
        "substitutions": errors,
        "deletions": 0,
        "insertions": 0,
        "reference_words": words,
        **extra,
    }


def pair(set_: str, id_: str, base: int, tuned: int, words: int, **extra) -> list[dict]:
    return [row(set_, id_, "finetuned", tuned, words, **extra), row(set_, id_, "base", base, words, **extra)]


def block(kind: str, rows: list[dict], long_form: bool = False) -> dict:
    """A set's block as eval writes it, from its rows."""
    out: dict = {"kind": kind, "long_form": long_form}
    for model in evidence.MODELS:
        mine = [r for r in rows if r["model"] == model]
        words = sum(r["reference_words"] for r in mine)
        out[model] = {"utterances": len(mine), "wer": sum(evidence.errors(r) for r in mine) / words}
    out["wer_reduction"] = out["base"]["wer"] - out["finetuned"]["wer"]
    return evidence.add_intervals(out, rows, 1000, 0)


def test_intervals_bracket_the_wer_and_a_clear_gain_excludes_zero():
    rows = [r for i in range(40) for r in pair("a", f"u{i:02d}", base=3, tuned=1, words=10)]
    b = block("medical", rows)
    assert b["base"]["wer"] == pytest.approx(0.3) and b["finetuned"]["wer"] == pytest.approx(0.1)
    # every unit has the same errors: no spread at all
    assert b["base"]["wer_ci"] == pytest.approx([0.3, 0.3]) and b["wer_reduction_ci"] == pytest.approx([0.2, 0.2])
    assert evidence.excludes_zero(b["wer_reduction_ci"], 40)

    # a gain on half the units and a loss on the other half: the interval spans zero
    mixed = [r for i in range(40) for r in pair("a", f"u{i:02d}", *((3, 1) if i % 2 else (1, 3)), words=10)]
    b = block("medical", mixed)
    lo, hi = b["wer_reduction_ci"]
    assert lo < 0 < hi and evidence.excludes_zero([lo, hi], 40) is False
    assert b["finetuned"]["wer_ci"][0] <= b["finetuned"]["wer"] <= b["finetuned"]["wer_ci"][1]


def test_too_few_units_give_an_interval_but_no_verdict():
    # 5 recordings all better: the interval excludes zero, but a percentile bootstrap over 5 units holds the truth
    # far less often than 95 %, so neither eval.json's summary nor the report claims anything from it
    norm = {"reference_norm": "a b", "hypothesis_norm": "a c"}
    rows = [r for i in range(5) for r in pair("long", f"rec{i}", base=30, tuned=10 + i, words=100, **norm)]
    b = block("medical", rows)
    assert b["wer_reduction_ci"][0] > 0 and evidence.excludes_zero(b["wer_reduction_ci"], 5) is None
    s = evidence.summary({"long": b}, rows, 1000, 0)
    assert s["medical"]["excludes_zero"] is None and "too few units to tell from noise" in evidence.headline(s)
    assert "?" in report.headline_table({"test": {"long": b}, "summary": s}).splitlines()[2]
    assert "too few units to judge" in report.render({"test": {"long": b}, "summary": s}, rows)


def test_nothing_to_score_gives_no_interval_and_mismatched_rows_are_refused():
    b = block("medical", pair("a", "u", base=1, tuned=1, words=1))
    b["base"]["wer"] = 0.0
    evidence.add_intervals(b, pair("a", "u", base=2, tuned=0, words=0), 1000, 0)
    assert b["wer_reduction_ci"] is None and b["base"]["wer_ci"] is None
    with pytest.raises(ValueError, match="same units"):
        evidence.paired_units([row("a", "u1", "base", 1, 5), row("a", "u2", "finetuned", 1, 5)])


def test_summary_pools_test_sets_by_kind_and_says_what_the_intervals_show():
    med1 = [r for i in range(30) for r in pair("med1", f"m{i}", base=4, tuned=2, words=10)]
    med2 = [r for i in range(10) for r in pair("med2", f"n{i}", base=2, tuned=2, words=30)]
    gen = [r for i in range(30) for r in pair("gen", f"g{i}", *((1, 2) if i % 2 else (2, 1)), words=10)]
    tests = {"med1": block("medical", med1), "med2": block("medical", med2), "gen": block("general", gen)}
    s = evidence.summary(tests, med1 + med2 + gen, 1000, 0)

    med = s["medical"]
    assert med["sets"] == ["med1", "med2"] and med["utterances"] == 40
    # pooled = errors over words of both sets together, not the mean of the set WERs
    assert med["base_wer"] == pytest.approx((30 * 4 + 10 * 2) / (300 + 300))
    assert med["finetuned_wer"] == pytest.approx((30 * 2 + 10 * 2) / 600)
    assert med["wer_reduction"] == pytest.approx(med["base_wer"] - med["finetuned_wer"])
    assert med["excludes_zero"] and med["wer_reduction_ci"][0] > 0

    general = s["general"]
    assert general["sets"] == ["gen"] and general["wer_change"] == pytest.approx(0.0)
    assert "wer_reduction" not in general and general["wer_change_ci"][0] < 0 < general["wer_change_ci"][1]
    assert not general["excludes_zero"]

    assert med["left_out"] == {} and general["left_out"] == {}
    assert "headline" not in s  # a sentence in a DVC metric makes `dvc metrics show` unreadable: rendered instead
    sentence = evidence.headline(s)
    assert sentence.startswith("Medical WER (2 test sets, 40 units): 23.3% base vs 13.3% fine-tuned")
    assert "a real gain, the interval excludes zero" in sentence
    assert "no measurable forgetting, the interval includes zero" in sentence


def test_a_source_scored_twice_is_pooled_once_as_the_first_set_that_reads_it():
    """The demo's consultations, by utterance and long-form: the same audio, counted once in the pool."""
    source = {"dataset": "data/sources/demo-consultations", "config": None, "split": None, "revision": None}
    norm = {"reference_norm": "a b", "hypothesis_norm": "a c"}
    clips = [r for i in range(11) for r in pair("consults", f"c{i}", base=3, tuned=1, words=10, **norm)]
    whole = [r for i in range(4) for r in pair("consults_long", f"r{i}", base=30, tuned=30, words=100, **norm)]
    other = [r for i in range(5) for r in pair("consults_b", f"b{i}", base=2, tuned=2, words=10, **norm)]
    tests = {
        "consults": block("medical", clips) | source,
        "consults_long": block("medical", whole, long_form=True) | source,
        "consults_b": block("medical", other) | source | {"split": "b"},  # another split: other audio
    }
    s = evidence.summary(tests, clips + whole + other, 1000, 0)["medical"]
    assert s["sets"] == ["consults", "consults_b"] and s["utterances"] == 16
    assert s["left_out"] == {"consults_long": "same source as consults"}
    assert s["base_wer"] == pytest.approx((11 * 3 + 5 * 2) / 160)  # none of the long-form errors
    assert evidence.headline({"medical": s, "general": None}).startswith("Medical WER (2 test sets, 16 units)")
    md = report.render({"test": tests, "summary": {"medical": s, "general": None}}, clips + whole + other)
    assert "consults\\_long is left out of the medical pool: same source as consults (its audio counts once)." in md


def test_forgetting_and_missing_kinds_are_said_in_the_headline():
    gen = [r for i in range(30) for r in pair("gen", f"g{i}", base=1, tuned=3, words=10)]
    s = evidence.summary({"gen": block("general", gen)}, gen, 1000, 0)
    assert s["medical"] is None
    assert s["general"]["wer_change"] == pytest.approx(0.2) and s["general"]["wer_change_ci"] == pytest.approx(
        [0.2, 0.2]
    )
    assert "no medical test set was scored" in evidence.headline(s)
    assert "forgetting, the interval excludes zero" in evidence.headline(s)
    assert "forgetting is unchecked" in evidence.headline(evidence.summary({}, [], 1000, 0))


def metrics_and_rows() -> tuple[dict, list[dict]]:
    val = pair("val", "v1", base=5, tuned=1, words=10)
    consult = [
        *pair("demo_consultations_long", "day1_consultation01_doctor", base=9, tuned=4, words=40, role="doctor"),
        *pair("demo_consultations_long", "day1_consultation01_patient", base=6, tuned=4, words=20, role="patient"),
        *pair("demo_consultations_long", "b|x", base=3, tuned=0, words=20, role=None),
    ]
    for r in consult:
        r["long_form"] = True
    general = [r for i in range(12) for r in pair("a_very_long_general_english_set_name", f"g{i:02d}", 1, 1, 10)]
    for r in consult + general:
        r |= {"reference_norm": "the patient takes amoxicillin", "hypothesis_norm": "the patient takes amoxycillin"}
        r |= {"missed_terms": ["amoxicillin"] if r["model"] == "finetuned" else [], "inserted_terms": ["aspirin"]}
    tests = {
        "demo_consultations_long": block("medical", consult, long_form=True),
        "a_very_long_general_english_set_name": block("general", general),
    }
    for b in tests.values():
        for model in evidence.MODELS:
            b[model]["term_categories"] = {
                "drugs": {"terms": 3, "term_error_rate": 1 / 3, "term_recall": 2 / 3, "insertions": 1}
            }
            b[model] |= {"windows": 7, "hallucinated": 1}
    metrics = {"val": block("medical", val), "test": tests, "train_sample": block("medical", val)}
    metrics["summary"] = evidence.summary(tests, consult + general, 1000, 0)
    return metrics, val + consult + general


def test_the_headline_table_fits_100_columns_and_has_every_set_and_the_pooled_rows():
    metrics, _ = metrics_and_rows()
    table = report.headline_table(metrics)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].split() == ["set", "kind", "utts", "base", "WER", "fine-tuned", "WER", "reduction", "[95%", "CI]"]
    names = [line.split()[0] for line in lines[2:7]]
    assert names == ["val", "demo_consultations_long", "a_very_long_general_eng...", "train_sample", "medical"]
    assert re.search(r"^medical \(pooled\)\s+medical\s+3\s+\d+\.\d%\s+\d+\.\d%\s+\+\d+\.\d \[", table, re.M)
    assert "general (pooled)" in table and evidence.headline(metrics["summary"])[:60] in table.replace("\n", " ")
    # the val row: 50 % -> 10 %, one unit: no spread, yet a real change
    assert re.search(r"^val\s+medical\s+1\s+50\.0%\s+10\.0%\s+\+40\.0 \[\+40\.0, \+40\.0\] \?$", table, re.M)
    assert "escape" not in table and "\x1b" not in table  # plain text, no terminal markup


def test_an_eval_json_from_before_intervals_still_prints():
    old = {"val": {"finetuned": {"utterances": 2, "wer": 0.5}, "base": {"utterances": 2, "wer": 1.0}}}
    old["val"]["wer_reduction"] = 0.5
    assert re.search(r"^val\s+2\s+100\.0%\s+50\.0%\s+\+50\.0$", report.headline_table(old), re.M)


def test_the_report_has_every_section_with_the_worst_utterances_diffed():
    metrics, rows = metrics_and_rows()
    md = report.render(metrics, rows)
    for heading in (
        "# Evaluation report",
        "## WER per set",
        "## Medical terms by category",
        "## Most-missed terms (held-out sets)",
        "## Most-hallucinated terms (held-out sets)",
        "## WER per speaker role",
        "## The 10 worst utterances (fine-tuned model, held-out sets)",
    ):
        assert f"\n{heading}\n" in f"\n{md}", heading
    assert f"**{evidence.headline(metrics['summary'])[:20]}" in md
    # per set: both WERs with intervals, the reduction, and what its interval says, in words
    val_row = "| val | medical | no | 1 | 50.0% [50.0, 50.0] | 10.0% [10.0, 10.0] | +40.0 [+40.0, +40.0] ? |"
    assert f"{val_row} too few units to judge" in md
    assert report._verdict(0.2, [0.1, 0.3], 40) == "excludes zero: fine-tuned lower"  # from 20 units on
    assert report._verdict(0.0, [-0.1, 0.1], 40) == "includes zero: no change beyond noise"
    assert "| demo\\_consultations\\_long | medical | yes | 3 |" in md
    # roles: errors over words per role, base / fine-tuned
    assert "| demo\\_consultations\\_long | doctor | 1 | 22.5% | 10.0% |" in md
    assert "| demo\\_consultations\\_long | patient | 1 | 30.0% | 20.0% |" in md
    # terms: counted over the held-out sets' rows only (val's rows have none)
    assert "| amoxicillin | 15 | 0 |" in md and "| aspirin | 15 | 15 |" in md
    assert "| demo\\_consultations\\_long | drugs | 3 | 33.3% / 33.3% | 66.7% / 66.7% | 1 / 1 |" in md

    assert "so an error rate can pass 100%" in md  # a term heard as another term: missed and inserted
    worst = re.findall(r"^### \d+\. (.+)$", md, re.M)
    # utterances only (the long-form recordings have their own figures); val is not held out
    assert worst == [f"a\\_very\\_long\\_general\\_english\\_set\\_name / g{i:02d}" for i in range(10)]
    assert "1 error in 10 reference words (WER 10.0%); base: 1 error." in md
    assert "~~~text\nthe patient takes [amoxicillin->amoxycillin]\n~~~" in md


def test_the_worst_are_utterances_ranked_by_wer_or_recordings_when_there_are_only_recordings():
    norm = {"reference_norm": "a b", "hypothesis_norm": "a c"}
    rows = [
        *pair("t", "long_rec", base=90, tuned=80, words=100, long_form=True, **norm),  # most errors: a recording
        *pair("t", "short", base=4, tuned=4, words=4, **norm),  # 100 % but under 5 words: no fair WER
        *pair("t", "u_b", base=3, tuned=3, words=6, **norm),  # 50 %, 3 errors
        *pair("t", "u_a", base=3, tuned=3, words=6, **norm),  # 50 %, 3 errors: ties by id
        *pair("t", "u_c", base=6, tuned=6, words=12, **norm),  # 50 %, 6 errors: before them
        *pair("t", "many", base=20, tuned=20, words=100, **norm),  # 20 errors, 20 %
        *pair("t", "none", base=1, tuned=0, words=10, **norm),  # no error: not worst
    ]
    worst = re.findall(r"^### \d+\. t / (.+)$", "\n".join(report._worst_section(rows)), re.M)
    assert worst == ["u\\_c", "u\\_a", "u\\_b", "many"]
    md = "\n".join(report._worst_section([r for r in rows if r.get("long_form")]))
    assert "## The 10 worst recordings (fine-tuned model, held-out sets)" in md
    assert re.findall(r"^### \d+\. t / (.+)$", md, re.M) == ["long\\_rec"]


def test_word_diff_marks_each_edit_and_shortens_long_correct_runs():
    diff = word_diff("the patient takes amoxicillin twice a day", "patient takes amoxycillin twice a day now")
    assert diff == "[-the] patient takes [amoxicillin->amoxycillin] twice a day [+now]"
    assert word_diff("", "oh hello") == "[+oh] [+hello]"
    long_ref = " ".join(f"w{i}" for i in range(40))
    diff = word_diff(long_ref, long_ref.replace("w20", "x"))
    kept = "w0 w1 w2 w3 w4 w5 ... w14 w15 w16 w17 w18 w19 [w20->x] w21 w22 w23 w24 w25 w26 ... w34 w35 w36 w37 w38 w39"
    assert diff == kept
    many = word_diff(" ".join(["a"] * 400), " ".join(["b"] * 400))
    assert many.endswith("... (250 more)") and len(many.split()) == DIFF_WORDS + 3


def test_plot_rows_hold_both_models_per_set():
    metrics, _ = metrics_and_rows()
    rows = report.plot_rows(metrics)
    assert {(r["set"], r["model"]) for r in rows} == {
        (s, m)
        for s in ("val", "demo_consultations_long", "a_very_long_general_english_set_name", "train_sample")
        for m in ("base", "finetuned")
    }
    assert {"set": "val", "model": "base", "wer": 0.5} in rows


def test_medasr_report_prints_the_table_of_metrics_eval_json_and_refuses_without_it(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    missing = CliRunner().invoke(app, ["report"])
    assert missing.exit_code == 1 and "metrics/eval.json is missing: run `medasr eval`" in missing.output
    metrics, _ = metrics_and_rows()
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(metrics))
    shown = CliRunner().invoke(app, ["report"])
    assert shown.exit_code == 0 and shown.output == report.headline_table(metrics) + "\n"
