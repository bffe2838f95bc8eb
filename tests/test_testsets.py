"""testsets: held-out sets are prepared whole, cleaned like training targets, and never share a clip with training."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import yaml
from helpers import (
    DEMO_DATA,
    GOOD_TEXT,
    REPO,
    committed_params_text,
    files_holding,
    tiny_params,
    tone,
    traversal_dataset,
)

from medasr import StageError
from medasr.files import read_jsonl
from medasr.params import ParamsError
from stages import testsets

CONSULTATIONS = REPO / "data" / "sources" / "demo-consultations"


def prepare(tmp_path: Path, demo_manifests: Path, *test_sets: dict) -> dict:
    p = tiny_params(**{"eval.test_sets": list(test_sets)})
    root = demo_manifests.parent  # the session's demo data: raw/, subset/, manifests/
    return testsets.run(
        p.eval.test_sets, p.subset, p.manifest, root / "subset", tmp_path / "testsets", tmp_path / "testsets.json"
    )


def test_bundled_consultations_are_cut_cleaned_and_resampled(tmp_path, demo_manifests):
    summary = prepare(tmp_path, demo_manifests, {"name": "consult", "dataset": str(CONSULTATIONS)})

    rows = read_jsonl(tmp_path / "testsets" / "consult" / "manifest.json")
    assert summary["consult"]["rows_in"] == summary["consult"]["kept"] == len(rows) == 11  # 6 + 5 turns
    assert json.loads((tmp_path / "testsets.json").read_text()) == summary
    texts = [r["text"] for r in rows]
    assert "No, no fever, just the burning." in texts  # <UNSURE>No</UNSURE> keeps its word
    assert "Okay, thank you doctor." in texts  # <UNIN/> is dropped
    assert not any("<" in t for t in texts)
    assert all(r["id"].startswith("demoday1_consultation0") for r in rows)
    for r in rows:
        info = sf.info(tmp_path / "testsets" / "consult" / r["audio_filepath"])
        assert info.samplerate == 16_000 and info.channels == 1
        assert info.duration == pytest.approx(r["duration"], abs=1e-3)
    source = json.loads((tmp_path / "testsets" / "consult" / "source.json").read_text())
    assert source["kind"] == "textgrid" and source["rows"] == 11
    assert [p.name for p in (tmp_path).iterdir() if p.name.startswith(".")] == []  # raw scratch removed


def test_clips_also_in_training_are_dropped_and_counted(tmp_path, demo_manifests):
    """A NeMo manifest naming two of the training clips (same bytes, same text) and two new recordings."""
    with open(DEMO_DATA / "metadata.csv", newline="", encoding="utf-8") as f:
        demo = list(csv.DictReader(f))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    lines = []
    for i, r in enumerate(demo[:2]):  # copied in: a manifest names only files inside its own folder
        shutil.copy(DEMO_DATA / r["file_name"], mixed / f"train{i}.wav")
        lines.append({"audio_filepath": f"train{i}.wav", "text": r["text"]})
    for i in range(2):
        sf.write(mixed / f"new{i}.wav", tone(1.5, freq=300.0 + 50 * i), 16_000)
        lines.append({"audio_filepath": f"new{i}.wav", "text": f"a new sentence number {i}"})
    (mixed / "manifest.json").write_text("".join(json.dumps(line) + "\n" for line in lines))

    summary = prepare(tmp_path, demo_manifests, {"name": "mixed", "dataset": str(mixed / "manifest.json")})
    assert summary["mixed"]["kept"] == 2 and summary["mixed"]["dropped"]["overlaps_training"] == 2
    dropped = read_jsonl(tmp_path / "testsets" / "mixed" / "dropped.jsonl")
    assert {d["reason"] for d in dropped} == {"overlaps_training"}
    assert all(d["detail"].startswith("same content as a training/val clip") for d in dropped)


def test_the_training_source_as_a_test_set_is_refused_and_old_output_kept(tmp_path, demo_manifests):
    prepare(tmp_path, demo_manifests, {"name": "consult", "dataset": str(CONSULTATIONS)})
    before = read_jsonl(tmp_path / "testsets" / "consult" / "manifest.json")
    leaky = {"name": "leaky", "dataset": str(DEMO_DATA), "split": "train", "id_column": "utterance_id"}
    with pytest.raises(StageError, match=r"eval.test_sets\[leaky\]: no usable utterance out of 48 rows.*overlaps"):
        prepare(tmp_path, demo_manifests, {"name": "consult", "dataset": str(CONSULTATIONS)}, leaky)
    assert read_jsonl(tmp_path / "testsets" / "consult" / "manifest.json") == before


def test_no_test_sets_writes_an_empty_folder(tmp_path, demo_manifests):
    assert prepare(tmp_path, demo_manifests) == {}
    assert list((tmp_path / "testsets").iterdir()) == []


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        ([{"name": "a", "dataset": "x/y"}, {"name": "a", "dataset": "x/z"}], "repeated: a"),
        ([{"name": "Bad Name", "dataset": "x/y"}], "eval.test_sets.0.name"),
        ([{"name": "a"}], "eval.test_sets.0.dataset: required key is missing"),
        ([{"name": "a", "dataset": "x/y", "colum": "text"}], "eval.test_sets.0.colum: unknown key"),
    ],
)
def test_bad_test_set_entries_are_params_errors(entries, problem):
    with pytest.raises(ParamsError) as info:
        tiny_params(**{"eval.test_sets": entries})
    assert any(problem in line for line in info.value.problems), info.value.problems


def test_fetch_refuses_a_missing_local_test_set_before_reading_anything(tmp_path):
    data = yaml.safe_load(committed_params_text())
    data["fetch"] |= {"dataset": str(DEMO_DATA), "text_column": "text"}
    data["eval"]["test_sets"] = [{"name": "primock57", "dataset": "data/sources/primock57"}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "stages.cli", "fetch"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "eval.test_sets[primock57]: fetch.dataset 'data/sources/primock57'" in proc.stderr
    assert "no such local path" in proc.stderr and not (tmp_path / "data").exists()


def test_eval_names_a_missing_test_set_before_loading_a_model(tmp_path, demo_manifests):
    from stages import eval as eval_stage

    p = tiny_params(**{"eval.test_sets": [{"name": "consult", "dataset": str(CONSULTATIONS)}]})
    with pytest.raises(StageError, match=r"testsets/consult/manifest.json: run `medasr testsets`"):
        eval_stage.run(
            p.eval, p.model, p.lora, p.train.seed, demo_manifests, tmp_path / "testsets", tmp_path / "no-model"
        )


def test_paths_out_of_a_test_sets_folder_are_refused_counted_and_never_read(tmp_path, demo_manifests):
    """`medasr testsets` as DVC runs it, with a planted secret in its environment and beside the test set (a NeMo
    manifest naming /proc/self/environ, ../secret.wav and a link out): the three rows are skipped, counted in the
    set's source.json and metrics, and no output holds the secret. The fetch tests cover every other kind."""
    import uuid

    secret = f"planted-{uuid.uuid4().hex}"
    manifest = traversal_dataset("nemo_manifest", tmp_path, secret)
    repo = tmp_path / "repo"
    shutil.copytree(demo_manifests.parent / "subset", repo / "data" / "subset")
    data = yaml.safe_load(committed_params_text())
    data["eval"]["test_sets"] = [{"name": "traversal", "dataset": str(manifest), "split": "train"}]
    (repo / "params.yaml").write_text(yaml.safe_dump(data))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "300", "AWS_SECRET_ACCESS_KEY": secret}
    cmd = [sys.executable, "-m", "stages.cli", "testsets"]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)

    assert proc.returncode == 0, proc.stderr
    assert files_holding(repo, secret) == []
    summary = json.loads((repo / "metrics" / "testsets.json").read_text())["traversal"]
    assert summary["kept"] == 1 and summary["skipped_at_source"] == {"path_outside_dataset": 3}
    source = json.loads((repo / "data" / "testsets" / "traversal" / "source.json").read_text())
    assert source["skipped"] == {"path_outside_dataset": 3}
    assert "skipped at source {'path_outside_dataset': 3}" in proc.stderr
    assert [r["text"] for r in read_jsonl(repo / "data" / "testsets" / "traversal" / "manifest.json")] == [GOOD_TEXT]


def test_a_test_set_of_nothing_but_paths_out_of_its_folder_fails_in_one_line(tmp_path, demo_manifests):
    folder = tmp_path / "outside-only"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"audio_filepath": "/etc/hostname", "text": "t"}) + "\n")
    with pytest.raises(StageError) as info:
        prepare(tmp_path, demo_manifests, {"name": "bad", "dataset": str(folder / "manifest.json")})
    assert str(info.value) == (
        f"eval.test_sets[bad]: fetch.dataset '{folder / 'manifest.json'}': no row could be read, every one skipped: "
        "{'path_outside_dataset': 1}"
    )
    assert not (tmp_path / "testsets").exists()


def test_bundled_consultations_long_form_one_row_per_channel_whatever_its_length(tmp_path, demo_manifests):
    """2 consultations x 2 channels: 4 whole recordings, each its channel's full length (past subset.max_duration,
    a clip filter) and its intervals' text in time order, cleaned like the clips of the same set."""
    p = tiny_params(
        **{
            "subset.max_duration": 15.0,  # shorter than every channel, longer than every turn
            "eval.test_sets": [
                {"name": "consult", "dataset": str(CONSULTATIONS)},
                {"name": "consult_long", "dataset": str(CONSULTATIONS), "long_form": True},
            ],
        }
    )
    root = demo_manifests.parent
    summary = testsets.run(
        p.eval.test_sets, p.subset, p.manifest, root / "subset", tmp_path / "testsets", tmp_path / "testsets.json"
    )

    assert summary["consult_long"]["rows_in"] == summary["consult_long"]["kept"] == 4
    assert summary["consult_long"]["dropped"]["too_long"] == 0 and summary["consult"]["kept"] == 11
    recordings = sorted((CONSULTATIONS / "audio").glob("*.flac"))
    rows = read_jsonl(tmp_path / "testsets" / "consult_long" / "manifest.json")
    assert [r["id"] for r in rows] == [f.stem for f in recordings]
    clips = read_jsonl(tmp_path / "testsets" / "consult" / "manifest.json")
    for row, recording in zip(rows, recordings, strict=True):
        assert row["duration"] == pytest.approx(sf.info(recording).duration, abs=1e-3)
        assert row["duration"] > p.subset.max_duration
        info = sf.info(tmp_path / "testsets" / "consult_long" / row["audio_filepath"])
        assert info.samplerate == 16_000 and info.channels == 1
        # the clip ids `<channel>-<start ms>-<end ms>` sort in time order: their texts, joined, are the recording's
        turns = sorted((c for c in clips if c["id"].startswith(f"{row['id']}-")), key=lambda c: c["id"])
        assert len(turns) >= 2 and row["text"] == " ".join(c["text"] for c in turns)
        assert "<" not in row["text"]
    source = json.loads((tmp_path / "testsets" / "consult_long" / "source.json").read_text())
    assert source["kind"] == "textgrid" and source["long_form"] is True and source["rows"] == 4


def test_long_form_bad_recordings_are_counted_and_a_single_interval_is_a_transcript(tmp_path, demo_manifests):
    """One interval spanning the whole channel: valid. Overlapping intervals (no time order): skipped at source,
    counted. A transcript without its recording: dropped as missing audio, counted. A set left with nothing fails
    in one line and the sets already prepared stay as they were."""
    from test_fetch import textgrid

    folder = tmp_path / "long"
    folder.mkdir()
    sf.write(folder / "whole.wav", tone(45.0, rate=8_000), 8_000)  # past the model's 40 s: windows are eval's job
    (folder / "whole.TextGrid").write_text(textgrid("Speaker", 45.0, [(0, 45.0, "The whole channel, one interval.")]))
    sf.write(folder / "clash.wav", tone(5.0), 16_000)
    (folder / "clash.TextGrid").write_text(textgrid("Speaker", 5.0, [(0, 2.0, "first"), (1.5, 3.0, "second")]))
    (folder / "gone.TextGrid").write_text(textgrid("Speaker", 5.0, [(0, 2.0, "no recording")]))

    summary = prepare(tmp_path, demo_manifests, {"name": "long", "dataset": str(folder), "long_form": True})["long"]
    assert summary["rows_in"] == 2 and summary["kept"] == 1 and summary["dropped"]["missing_audio"] == 1
    assert summary["skipped_at_source"] == {"unordered_transcript": 1}
    (row,) = read_jsonl(tmp_path / "testsets" / "long" / "manifest.json")
    assert (row["id"], row["text"]) == ("whole", "The whole channel, one interval.")
    assert row["duration"] == pytest.approx(45.0, abs=1e-3)
    dropped = read_jsonl(tmp_path / "testsets" / "long" / "dropped.jsonl")
    assert [(d["id"], d["reason"]) for d in dropped] == [("gone", "missing_audio")]

    (folder / "whole.wav").unlink()
    with pytest.raises(StageError, match=r"eval.test_sets\[long\]: no usable utterance out of 2 rows.*missing_audio"):
        prepare(tmp_path, demo_manifests, {"name": "long", "dataset": str(folder), "long_form": True})
    assert read_jsonl(tmp_path / "testsets" / "long" / "manifest.json") == [row]
