"""fetch: every local source kind lands in the same raw form; wrong columns and bad paths fail clearly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import DEMO_DATA, wav, write_audio_parquet

from stages import fetch
from stages.params import FetchParams


def params(dataset: Path | str, **kw) -> FetchParams:
    base = {"dataset": str(dataset), "split": "train", "audio_column": "audio", "text_column": "text"}
    return FetchParams(**(base | kw))


def raw_rows(out: Path) -> list[dict]:
    return [r for shard in sorted(out.glob("part-*.parquet")) for r in pq.read_table(shard).to_pylist()]


def audio_rows(n: int) -> list[dict]:
    return [
        {"audio": {"bytes": wav(0.5, freq=200.0 + i), "path": f"clip{i}.wav"}, "text": f"text {i}", "uid": f"u{i}"}
        for i in range(n)
    ]


@pytest.mark.parametrize("audio_feature", [False, True], ids=["plain-struct", "datasets-Audio-feature"])
def test_local_parquet_file(tmp_path, audio_feature):
    source = write_audio_parquet(tmp_path / "src" / "rows.parquet", audio_rows(5), audio_feature=audio_feature)
    info = fetch.run(params(source, id_column="uid", revision="ignored-for-local"), out_dir=tmp_path / "raw")

    rows = raw_rows(tmp_path / "raw")
    assert info["kind"] == "parquet" and info["rows"] == 5 and info["revision"] is None
    assert [r["source_id"] for r in rows] == [f"u{i}" for i in range(5)]
    assert [r["text"] for r in rows] == [f"text {i}" for i in range(5)]
    assert rows[3]["audio"] == wav(0.5, freq=203.0)  # original bytes, untouched
    assert rows[3]["source_path"] == "clip3.wav"


def test_parquet_folder_and_max_rows(tmp_path):
    write_audio_parquet(tmp_path / "src" / "a.parquet", audio_rows(3))
    write_audio_parquet(tmp_path / "src" / "sub" / "b.parquet", audio_rows(3))
    fetch.run(params(tmp_path / "src"), out_dir=tmp_path / "all")
    fetch.run(params(tmp_path / "src", max_rows=4), out_dir=tmp_path / "four")
    assert len(raw_rows(tmp_path / "all")) == 6
    assert len(raw_rows(tmp_path / "four")) == 4


def test_plain_binary_audio_column(tmp_path):
    rows = [{"wav_bytes": wav(0.5), "sentence": "plain bytes"}]
    source = write_audio_parquet(tmp_path / "b.parquet", rows)
    fetch.run(params(source, audio_column="wav_bytes", text_column="sentence"), out_dir=tmp_path / "raw")
    (row,) = raw_rows(tmp_path / "raw")
    assert row["audio"] == wav(0.5) and row["text"] == "plain bytes"


def test_bundled_demo_audiofolder(tmp_path):
    info = fetch.run(params(DEMO_DATA, id_column="utterance_id", group_column="speaker"), out_dir=tmp_path / "raw")
    rows = raw_rows(tmp_path / "raw")
    with open(DEMO_DATA / "metadata.csv", encoding="utf-8") as f:
        meta = list(csv.DictReader(f))
    assert info["kind"] == "audiofolder" and len(rows) == len(meta) == 48
    assert [r["source_id"] for r in rows] == [m["utterance_id"] for m in meta]
    assert [r["group"] for r in rows] == [m["speaker"] for m in meta]
    assert rows[7]["audio"] == (DEMO_DATA / meta[7]["file_name"]).read_bytes()


def test_audiofolder_jsonl_with_a_missing_file(tmp_path):
    folder = tmp_path / "recordings"
    (folder / "clips").mkdir(parents=True)
    (folder / "clips" / "a.wav").write_bytes(wav(1.0))
    lines = [
        {"file_name": "clips/a.wav", "transcription": "present"},
        {"file_name": "clips/gone.wav", "transcription": "x"},
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    fetch.run(params(folder, text_column="transcription"), out_dir=tmp_path / "raw")

    rows = raw_rows(tmp_path / "raw")
    assert rows[0]["audio"] == wav(1.0) and rows[1]["audio"] is None  # kept, so subset counts it as missing_audio


def test_audiofolder_split_folders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / "af" / split).mkdir(parents=True)
        with open(tmp_path / "af" / split / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "text"])
            for i in range(n):
                (tmp_path / "af" / split / f"{i}.wav").write_bytes(wav(0.5))
                writer.writerow([f"{i}.wav", f"{split} {i}"])
    fetch.run(params(tmp_path / "af", split="test"), out_dir=tmp_path / "raw")
    assert [r["text"] for r in raw_rows(tmp_path / "raw")] == ["test 0", "test 1"]


def test_nemo_manifest_with_relative_paths_segments_and_bad_lines(tmp_path):
    (tmp_path / "data" / "audio").mkdir(parents=True)
    (tmp_path / "data" / "audio" / "long.wav").write_bytes(wav(4.0, rate=8_000))
    (tmp_path / "data" / "audio" / "short.wav").write_bytes(wav(1.0))
    lines = [
        json.dumps({"audio_filepath": "audio/short.wav", "duration": 1.0, "text": "whole file"}),
        json.dumps({"audio_filepath": "audio/long.wav", "offset": 1.0, "duration": 1.5, "text": "a segment"}),
        "{not json",
        json.dumps({"text": "no audio key"}),
        "",
        json.dumps({"audio_filepath": "audio/missing.wav", "duration": 1.0, "text": "missing"}),
    ]
    manifest = tmp_path / "data" / "train_manifest.json"
    manifest.write_text("\n".join(lines) + "\n")

    info = fetch.run(params(manifest), out_dir=tmp_path / "raw")

    rows = raw_rows(tmp_path / "raw")
    assert info["kind"] == "nemo_manifest" and info["skipped"] == {"malformed_manifest_line": 2}
    assert [r["text"] for r in rows] == ["whole file", "a segment", "missing"]
    assert rows[0]["audio"] == wav(1.0)
    from stages.audio import decode

    segment = decode(rows[1]["audio"])
    assert segment.sample_rate == 8_000 and segment.duration == pytest.approx(1.5)
    assert rows[2]["audio"] is None


def test_wrong_column_names_list_the_real_ones_and_keep_old_output(tmp_path):
    source = write_audio_parquet(tmp_path / "rows.parquet", audio_rows(2))
    out = tmp_path / "raw"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"previous output")

    with pytest.raises(fetch.FetchError) as info:
        fetch.run(params(source, text_column="sentence", id_column="utt_id"), out_dir=out)

    message = str(info.value)
    assert "fetch.text_column='sentence'" in message and "fetch.id_column='utt_id'" in message
    assert "['audio', 'text', 'uid']" in message
    assert (out / "part-00000.parquet").read_bytes() == b"previous output"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left behind


@pytest.mark.parametrize(
    ("dataset", "kind"),
    [("Hani89/medical_asr_recording_dataset", "hub"), ("librispeech_asr", "hub"), ("ekacare/eka.v2", "hub")],
)
def test_hub_ids_are_recognised(dataset, kind):
    assert fetch.resolve_source(dataset).kind == kind


@pytest.mark.parametrize("dataset", ["./no/such/dir", "data/sources/nope/x.parquet", "~/missing"])
def test_missing_local_paths_are_not_sent_to_the_hub(dataset):
    with pytest.raises(fetch.FetchError, match="no such local path"):
        fetch.resolve_source(dataset)


def test_unsupported_local_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(fetch.FetchError, match=r"\.parquet or a NeMo manifest"):
        fetch.resolve_source(str(tmp_path / "notes.txt"))


def test_unreachable_hub_is_a_clear_error(tmp_path, committed_params):
    """Offline mode makes `datasets` fail the way a missing network does, without sending any traffic."""
    import subprocess
    import sys

    import yaml

    committed_params["fetch"]["dataset"] = "someone/medical-speech"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(committed_params))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "fetch"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr
    assert "could not read hub dataset 'someone/medical-speech'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "raw").exists()


def test_osce_segment_list_in_the_published_layout(tmp_path):
    """The Fareez et al. OSCE interviews as `yfyeung/medical` publishes them: `audio/<CASE>.mp3` plus
    `medical_{train,dev,test}.info`, one segment per line as `audio/RES0001.mp3[start,end]<TAB>TEXT` (the layout
    lhotse's recipe, lhotse/recipes/medical.py, parses: path, `[start,end]`, a tab, ALL-CAPS text)."""
    import soundfile as sf
    from helpers import tone

    corpus = tmp_path / "medical"
    (corpus / "audio").mkdir(parents=True)
    sf.write(corpus / "audio" / "RES0001.mp3", tone(6.0, rate=16_000), 16_000, format="MP3")
    sf.write(corpus / "audio" / "GAS0002.mp3", tone(3.0, rate=44_100, channels=2), 44_100, format="MP3")
    lines = [
        "audio/RES0001.mp3[0.500,2.250]\tHOW CAN I HELP YOU TODAY",
        "audio/RES0001.mp3[2.500,5.000]\tI HAVE HAD A COUGH FOR THREE DAYS",
        "audio/GAS0002.mp3[1.000,2.000]\tANY VOMITING",
        "audio/CAR0003.mp3[0.000,1.000]\tTHE RECORDING IS MISSING",
        "audio/RES0001.mp3[3.000,2.000]\tEND BEFORE START",
        "audio/RES0001.mp3 0.5 2.0 NOT THE SYNTAX",
        "",
    ]
    (corpus / "medical_train.info").write_text("\n".join(lines) + "\n")
    (corpus / "medical_test.info").write_text("audio/GAS0002.mp3[0.000,1.500]\tTEST SEGMENT\n")

    info = fetch.run(params(corpus), out_dir=tmp_path / "raw")
    rows = raw_rows(tmp_path / "raw")
    assert info["kind"] == "segment_list" and info["skipped"] == {"malformed_segment_line": 2}
    assert [r["source_id"] for r in rows] == [
        "RES0001-00000500-00002250",
        "RES0001-00002500-00005000",
        "GAS0002-00001000-00002000",
        "CAR0003-00000000-00001000",
    ]
    assert [r["group"] for r in rows] == ["RES0001", "RES0001", "GAS0002", "CAR0003"]  # interviews stay whole
    from stages.audio import decode

    first, third = decode(rows[0]["audio"]), decode(rows[2]["audio"])
    assert first.duration == pytest.approx(1.75, abs=0.01) and third.sample_rate == 44_100
    assert rows[3]["audio"] is None  # counted later by subset as missing audio

    again = fetch.run(params(corpus), out_dir=tmp_path / "raw2")
    assert raw_rows(tmp_path / "raw2") == rows and again == info  # stable ids and bytes across runs

    fetch.run(params(corpus, split="test"), out_dir=tmp_path / "raw-test")
    assert [r["text"] for r in raw_rows(tmp_path / "raw-test")] == ["TEST SEGMENT"]
    with pytest.raises(fetch.FetchError, match=r"medical_dev\.info not found"):
        fetch.run(params(corpus, split="dev"), out_dir=tmp_path / "raw-dev")
