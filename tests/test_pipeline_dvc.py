"""The real pipeline: `dvc repro` / `dvc exp run` / `make demo` driving the `medasr` CLI in a scratch clone."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import run, scratch_clone, set_params, wav, write_audio_parquet

DATA_STAGES = ("fetch", "subset", "manifest")
STAGES = (*DATA_STAGES, "testsets", "train", "eval")


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def skipped(output: str) -> set[str]:
    return set(re.findall(r"Stage '(\w+)' didn't change, skipping", output))


def parquet_rows(n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        rate, channels = [(16_000, 1), (8_000, 1), (44_100, 2)][i % 3]
        audio = wav(0.6 + 0.05 * (i % 5), rate=rate, channels=channels, freq=150.0 + 7 * i)
        rows.append({"audio": {"bytes": audio, "path": f"{i}.wav"}, "text": f"Dictation number {i}.", "uid": f"r{i}"})
    return rows


BAD_ROWS = [
    {"audio": {"bytes": b"\x00corrupt" * 50, "path": "bad.wav"}, "text": "corrupt audio", "uid": "bad1"},
    {"audio": {"bytes": wav(1.0, freq=999.0), "path": "notext.wav"}, "text": "", "uid": "bad2"},
    {"audio": {"bytes": wav(35.0, freq=60.0), "path": "long.wav"}, "text": "far too long", "uid": "bad3"},
]


@pytest.fixture
def repo(tmp_path) -> Path:
    """A scratch clone of the test's own: these tests edit params.yaml."""
    return scratch_clone(tmp_path / "clone")


def manifest_bytes(repo: Path) -> dict[str, bytes]:
    out = repo / "data" / "manifests"
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.e2e
def test_repro_on_a_local_parquet_then_skips_and_reruns_only_what_changed(repo):
    source = repo / "data" / "sources" / "mini" / "rows.parquet"
    write_audio_parquet(source, parquet_rows(24) + BAD_ROWS)
    set_params(
        repo,
        **{
            "fetch.dataset": "data/sources/mini/rows.parquet",
            "fetch.text_column": "text",
            "fetch.id_column": "uid",
            "subset.train_size": 20,
            "subset.val_size": 5,
        },
    )

    first = run(repo, "dvc", "repro", "manifest")
    assert ran(first.stdout) == set(DATA_STAGES), first.stdout

    metrics = json.loads((repo / "metrics" / "data.json").read_text())
    assert metrics["rows_in"] == 27
    assert metrics["dropped"]["undecodable_audio"] == 1
    assert metrics["dropped"]["empty_text"] == 1
    assert metrics["dropped"]["too_long"] == 1
    assert sum(metrics["kept"].values()) + metrics["dropped"]["over_cap"] == 24
    train = [json.loads(line) for line in (repo / "data" / "manifests" / "train.json").read_text().splitlines()]
    assert train and all((repo / "data" / "manifests" / r["audio_filepath"]).is_file() for r in train)

    again = run(repo, "dvc", "repro", "manifest")
    assert ran(again.stdout) == set() and skipped(again.stdout) == set(DATA_STAGES), again.stdout

    # from scratch again: byte-identical manifests and audio
    before = manifest_bytes(repo)
    forced = run(repo, "dvc", "repro", "--force", "manifest")
    assert ran(forced.stdout) == set(DATA_STAGES)
    assert manifest_bytes(repo) == before

    # a subset param re-runs subset and manifest, never fetch
    set_params(repo, **{"subset.seed": 99})
    reseeded = run(repo, "dvc", "repro", "manifest")
    assert ran(reseeded.stdout) == {"subset", "manifest"} and "fetch" in skipped(reseeded.stdout)

    # new rows in the local source re-run fetch (data/sources is a dependency)
    write_audio_parquet(source, parquet_rows(30) + BAD_ROWS)
    grown = run(repo, "dvc", "repro", "manifest")
    assert "fetch" in ran(grown.stdout)
    assert json.loads((repo / "metrics" / "data.json").read_text())["rows_in"] == 33

    shown = run(repo, "dvc", "metrics", "show", "--json")
    assert json.loads(shown.stdout)  # DVC reads metrics/data.json as a metric

    # the rest of the pipeline on the same parquet, offline: the tiny model, and no hub test sets (val only)
    set_params(
        repo,
        **{
            "model.preset": "tiny",
            "train.max_steps": 4,
            "train.checkpoint_every": 2,
            "train.batch_size": 4,
            "train.val_every": 0,
            "eval.max_new_tokens": 8,
            "eval.test_sets": [],
        },
    )
    whole = run(repo, "dvc", "repro")
    assert ran(whole.stdout) == {"testsets", "train", "eval"}, whole.stdout
    evaluated = json.loads((repo / "metrics" / "eval.json").read_text())
    kept_val = json.loads((repo / "metrics" / "data.json").read_text())["kept"]["val"]
    assert evaluated["test"] == {} and evaluated["val"]["finetuned"]["utterances"] == kept_val
    assert json.loads((repo / "metrics" / "testsets.json").read_text()) == {}


def test_bad_params_stop_the_stage_with_every_problem_listed(repo):
    set_params(repo, **{"subset.min_duration": 50.0, "subset.val_size": -2})
    proc = run(repo, "dvc", "repro", "subset", check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "subset.val_size:" in err
    assert "subset.max_duration: min_duration (50.0) is greater than max_duration" in err


@pytest.mark.e2e
def test_make_demo_then_an_experiment_with_another_lora_rank(tmp_path, demo_run):
    clone, demo = demo_run.clone, demo_run.demo  # the session's `make demo` (conftest.py): read only here
    assert ran(demo.stdout) == set(STAGES), demo.stdout

    data = json.loads((clone / "metrics" / "data.json").read_text())
    assert data["rows_in"] == 48 and data["kept"]["train"] > 0 and data["kept"]["val"] > 0
    assert data["dropped_total"] == 0  # the demo audio has no bad rows and fits the demo caps
    trained = json.loads((clone / "metrics" / "train.json").read_text())
    assert trained["global_step"] == 300 and trained["resume_source"] == "none" and trained["trainable_params"] > 0

    # the demo's held-out set: two bundled consultations in PriMock57's layout, 11 utterances, none in training
    held_out = json.loads((clone / "metrics" / "testsets.json").read_text())
    assert (
        held_out["demo_consultations"]["kept"] == 11
        and held_out["demo_consultations"]["dropped"]["overlaps_training"] == 0
    )

    # every set's WER, for both models, is exactly what jiwer says about the predictions the stage wrote
    import jiwer

    evaluated = json.loads((clone / "metrics" / "eval.json").read_text())
    rows = [json.loads(line) for line in (clone / "metrics" / "predictions.jsonl").read_text().splitlines()]
    sets = {
        "val": (evaluated["val"], data["kept"]["val"]),
        **{name: (block, held_out[name]["kept"]) for name, block in evaluated["test"].items()},
        "train_sample": (evaluated["train_sample"], data["kept"]["train"]),  # eval.train_sample=40: every clip
    }
    assert list(evaluated["test"]) == ["demo_consultations", "demo_consultations_long", "demo_general"]
    for audio_set, (block, size) in sets.items():
        for name in ("finetuned", "base"):
            mine = [r for r in rows if r["model"] == name and r["set"] == audio_set]
            assert len(mine) == size == block[name]["utterances"]
            expected = jiwer.wer([r["reference_norm"] for r in mine], [r["hypothesis_norm"] for r in mine])
            assert block[name]["wer"] == pytest.approx(expected, abs=1e-12)
        assert block["wer_reduction"] == pytest.approx(block["base"]["wer"] - block["finetuned"]["wer"])
    assert len(rows) == 2 * sum(size for _, size in sets.values())
    demo_evidence(clone, demo.stdout, evaluated, rows, tmp_path)
    # the fine-tune learns its training clips, decoded exactly as val is: targets, prompt and decoding agree. The base
    # (random) gets none of it. (Measured: 41.9 % WER, 23 of 37 clips word-perfect; the rest are other training
    # sentences of the same length, see the README's demo paragraph.)
    learned = evaluated["train_sample"]
    assert learned["base"]["wer"] == 1.0 and learned["finetuned"]["wer"] <= 0.6
    perfect = [
        r
        for r in rows
        if r["set"] == "train_sample"
        and r["model"] == "finetuned"
        and r["substitutions"] + r["deletions"] + r["insertions"] == 0
    ]
    assert len(perfect) >= data["kept"]["train"] // 2

    again = run(clone, "dvc", "repro")
    assert skipped(again.stdout) == set(STAGES) and not ran(again.stdout)
    # the demo overrides live in the workspace; the committed params.yaml is unchanged in git
    committed = run(clone, "git", "show", "HEAD:params.yaml").stdout
    assert "yfyeung/medical" in committed
    assert "data/sources/demo" in (clone / "params.yaml").read_text()

    # keep the demo as the baseline, then try another adapter size: it trains fresh, not from the rank-8 run
    # (in a copy of the clone, cache and checkpoints included: the session's demo run stays as it is)
    clone = Path(shutil.copytree(clone, tmp_path / "experiment", symlinks=True))
    run(clone, "git", "add", "-A")
    run(clone, "git", "commit", "-qm", "demo baseline")
    # (10 steps, the demo's checkpoint and logging interval, not 30: a fresh start shows at once, and eval still
    # scores both models on every set)
    exp = run(clone, "dvc", "exp", "run", "-S", "lora.rank=16", "-S", "train.max_steps=10", env=demo_run.env)
    assert ran(exp.stdout) == {"train", "eval"}, exp.stdout
    rank16 = json.loads((clone / "metrics" / "train.json").read_text())
    assert rank16["resume_source"] == "none" and rank16["resumed_from_step"] == 0
    assert rank16["trainable_params"] > trained["trainable_params"]
    diff = json.loads(run(clone, "dvc", "metrics", "diff", "--all", "--json").stdout)
    assert diff["metrics/train.json"]["trainable_params"]["diff"] > 0
    # the held-out set's figures for both models are compared experiment to experiment, each under its own key
    assert {"test.demo_consultations.finetuned.wer", "test.demo_consultations.base.wer"} <= diff[
        "metrics/eval.json"
    ].keys()
    # the WER plot compares the two experiments: one panel per revision, both models' bars per set
    plotted = json.loads(run(clone, "dvc", "plots", "diff", "HEAD", "--json").stdout)["data"]["metrics/wer_by_set.json"]
    assert set(plotted[0]["revisions"]) == {"HEAD", "workspace"}


def inside(value: float, interval: list[float]) -> bool:
    """A percentile interval holds the corpus figure it was resampled from (to rounding)."""
    return interval[0] - 1e-9 <= value <= interval[1] + 1e-9


def demo_evidence(clone: Path, stdout: str, evaluated: dict, rows: list[dict], tmp_path: Path) -> None:
    """What `make demo` shows beyond WER: intervals, the pooled summary, terms by category, long-form windows,
    metrics/report.md, the plots, and the headline table it ends with."""
    from medasr.evidence import headline
    from medasr.export import model_identity
    from medasr.report import headline_table
    from medasr.terms import CATEGORIES

    blocks = {"val": evaluated["val"], **evaluated["test"], "train_sample": evaluated["train_sample"]}
    for name, block in blocks.items():
        assert block["kind"] == ("general" if name == "demo_general" else "medical"), name
        assert block["long_form"] == (name == "demo_consultations_long"), name
        assert inside(block["wer_reduction"], block["wer_reduction_ci"]), name
        for model in ("finetuned", "base"):
            entry = block[model]
            assert inside(entry["wer"], entry["wer_ci"]), (name, model)
            assert set(entry["term_categories"]) == set(CATEGORIES) and entry["hallucinated"] >= 0
            mine = [r for r in rows if r["set"] == name and r["model"] == model]
            assert entry["windows"] == sum(r["windows"] for r in mine) >= len(mine)
    # long-form: each ~20 s channel decoded in 10 s windows (eval.chunk_s=10), its speaker role known
    long_rows = [r for r in rows if r["set"] == "demo_consultations_long"]
    assert long_rows and all(r["windows"] > 1 and r["long_form"] for r in long_rows)
    assert {r["role"] for r in long_rows} == {"doctor", "patient"}
    assert all(r["windows"] == 1 for r in rows if r["duration"] <= 10.0)  # up to eval.chunk_s: decoded whole

    summary = evaluated["summary"]
    tests = evaluated["test"]
    # the consultations by utterance and long-form are one source: pooled once, as the first set listed
    assert tests["demo_consultations"]["dataset"] == tests["demo_consultations_long"]["dataset"]
    assert summary["medical"]["sets"] == ["demo_consultations"]
    assert summary["medical"]["left_out"] == {"demo_consultations_long": "same source as demo_consultations"}
    assert summary["general"]["sets"] == ["demo_general"] and summary["general"]["left_out"] == {}
    assert evaluated["runtime"]["model"] == model_identity(clone / "models" / "canary-qwen-medical-lora")
    assert summary["medical"]["utterances"] == sum(
        tests[n]["finetuned"]["utterances"] for n in summary["medical"]["sets"]
    )
    assert summary["general"]["wer_change"] == pytest.approx(
        tests["demo_general"]["finetuned"]["wer"] - tests["demo_general"]["base"]["wer"]
    )
    assert "headline" not in summary and headline(summary).startswith("Medical WER (1 test set, ")

    report = (clone / "metrics" / "report.md").read_text()
    for section in ("## WER per set", "## Medical terms by category", "## Most-missed terms", "## WER per speaker role",
                    "## The 10 worst utterances"):  # fmt: skip
        assert section in report, section
    assert headline(summary)[:40] in report

    # `dvc plots show` renders the WER per set (both models, every set) and the training curves
    shown = json.loads(run(clone, "dvc", "plots", "show", "--json").stdout)
    assert "errors" not in shown, shown
    wer_plot = shown["data"]["metrics/wer_by_set.json"][0]["content"]
    assert {(v["set"], v["model"]) for v in wer_plot["data"]["values"]} == {
        (name, model) for name in blocks for model in ("base", "finetuned")
    }
    assert any(path.startswith("metrics/train_curves/") for path in shown["data"])
    html = run(clone, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file(), html.stdout

    # the demo ends with the headline table, readable in 100 columns
    table = headline_table(evaluated)
    assert stdout.rstrip().endswith(table) and max(len(line) for line in table.splitlines()) <= 100
