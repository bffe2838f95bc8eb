"""Params validation: every problem reported at once with its key path, before any output is touched."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from helpers import committed_params_text
from typer.testing import CliRunner

from medasr.params import ParamsError, load_params, parse_params
from stages.cli import EXIT_BAD_PARAMS, app


def test_committed_params_are_valid(tmp_path):
    (tmp_path / "params.yaml").write_text(committed_params_text())
    p = load_params(tmp_path / "params.yaml")
    assert p.model.preset == "canary-qwen-2.5b"
    assert p.subset.train_size == 2000 and p.subset.val_size == 200 and p.subset.max_duration == 30


def test_small_values_are_valid(committed_params):
    data = copy.deepcopy(committed_params)
    data["train"].update(max_steps=10, checkpoint_every=5)
    data["subset"].update(train_size=4, val_size=0, min_duration=0.0)
    p = parse_params(data)
    assert p.train.max_steps == 10 and p.subset.train_size == 4


def test_all_problems_reported_together_with_key_paths(committed_params):
    data = copy.deepcopy(committed_params)
    data["fetch"]["dataset_name"] = "typo"  # unknown key
    data["subset"]["train_size"] = -5  # negative size
    data["subset"]["max_duration"] = 45.0  # over the model's 40 s
    data["lora"]["rank"] = "8"  # wrong type
    data["model"]["preset"] = "gpt"  # not a preset
    del data["train"]["seed"]  # missing key
    with pytest.raises(ParamsError) as info:
        parse_params(data)
    problems = info.value.problems
    joined = "\n".join(problems)
    assert len(problems) == 6, joined
    assert "fetch.dataset_name: unknown key" in joined
    assert "subset.train_size:" in joined and "-5" in joined
    assert "subset.max_duration:" in joined and "40" in joined
    assert "lora.rank:" in joined
    assert "model.preset:" in joined
    assert "train.seed: required key is missing" in joined


def test_cross_field_problems_are_reported_beside_field_problems(committed_params):
    data = copy.deepcopy(committed_params)
    data["subset"].update(min_duration=20.0, max_duration=10.0, val_size=-1)
    with pytest.raises(ParamsError) as info:
        parse_params(data)
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert any(p.startswith("subset.val_size:") for p in problems)
    assert "subset.max_duration: min_duration (20.0) is greater than max_duration (10.0)" in problems


@pytest.mark.parametrize(
    ("evaluation", "problem"),
    [
        ({"chunk_s": 45.0}, "eval.chunk_s: Input should be less than or equal to 40"),  # over the model's limit
        ({"chunk_s": 10.0, "chunk_overlap_s": 10.0}, "eval.chunk_overlap_s: chunk_overlap_s (10.0) must be below"),
        ({"bootstrap_resamples": 200}, "eval.bootstrap_resamples: Input should be greater than or equal to 1000"),
        ({"test_sets": [{"name": "val", "dataset": "x/y"}]}, "eval.test_sets: test set names val are taken"),
        ({"test_sets": [{"name": "a", "dataset": "x/y", "kind": "news"}]}, "eval.test_sets.0.kind:"),
    ],
)
def test_long_form_and_evidence_settings_are_checked_before_anything_runs(committed_params, evaluation, problem):
    data = copy.deepcopy(committed_params)
    data["eval"].update(evaluation)
    with pytest.raises(ParamsError) as info:
        parse_params(data)
    assert any(line.startswith(problem) for line in info.value.problems), info.value.problems


def test_nothing_to_keep_is_an_error(committed_params):
    data = copy.deepcopy(committed_params)
    data["subset"].update(train_size=0, val_size=0)
    with pytest.raises(ParamsError, match=r"subset\.val_size: train_size and val_size are both 0"):
        parse_params(data)


def test_unreadable_files(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fetch: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(bad)


@pytest.mark.parametrize("command", ["fetch", "subset", "manifest"])
def test_cli_rejects_bad_params_without_touching_outputs(tmp_path, monkeypatch, committed_params, command):
    monkeypatch.chdir(tmp_path)
    data = copy.deepcopy(committed_params)
    data["subset"]["min_duration"] = -1.0
    data["fetch"]["bogus"] = 1
    Path("bad.yaml").write_text(yaml.safe_dump(data))
    for out in ("data/raw", "data/subset", "data/manifests"):
        Path(out).mkdir(parents=True)
        Path(out, "previous.txt").write_text("from an earlier run")

    result = CliRunner().invoke(app, [command, "--params", "bad.yaml"])

    assert result.exit_code == EXIT_BAD_PARAMS
    assert "subset.min_duration" in result.output and "fetch.bogus: unknown key" in result.output
    for out in ("data/raw", "data/subset", "data/manifests"):
        assert sorted(p.name for p in Path(out).iterdir()) == ["previous.txt"]
    assert not Path("metrics").exists()
