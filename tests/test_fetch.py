"""fetch: every local source kind lands in the same raw form; wrong columns and bad paths fail clearly."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import DEMO_DATA, GOOD_TEXT, SOURCE_KINDS, files_holding, traversal_dataset, wav, write_audio_parquet

from medasr import sources
from medasr.params import FetchParams
from medasr.sources.base import FetchError
from stages import fetch


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
    from medasr.audio import decode

    segment = decode(rows[1]["audio"])
    assert segment.sample_rate == 8_000 and segment.duration == pytest.approx(1.5)
    assert rows[2]["audio"] is None


def test_wrong_column_names_list_the_real_ones_and_keep_old_output(tmp_path):
    source = write_audio_parquet(tmp_path / "rows.parquet", audio_rows(2))
    out = tmp_path / "raw"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"previous output")

    with pytest.raises(FetchError) as info:
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
    assert sources.resolve(dataset).kind == kind


@pytest.mark.parametrize("dataset", ["./no/such/dir", "data/sources/nope/x.parquet", "~/missing"])
def test_missing_local_paths_are_not_sent_to_the_hub(dataset):
    with pytest.raises(FetchError, match="no such local path"):
        sources.resolve(dataset)


def test_unsupported_local_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FetchError, match=r"\.parquet or a NeMo manifest"):
        sources.resolve(str(tmp_path / "notes.txt"))


def test_unreachable_hub_is_a_clear_error(tmp_path, committed_params):
    """Offline mode makes `datasets` fail the way a missing network does, without sending any traffic."""
    import subprocess
    import sys

    import yaml

    committed_params["fetch"] |= {"dataset": "someone/medical-speech", "hub_download": "datasets"}
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
    from medasr.audio import decode

    first, third = decode(rows[0]["audio"]), decode(rows[2]["audio"])
    assert first.duration == pytest.approx(1.75, abs=0.01) and third.sample_rate == 44_100
    assert rows[3]["audio"] is None  # counted later by subset as missing audio

    again = fetch.run(params(corpus), out_dir=tmp_path / "raw2")
    assert raw_rows(tmp_path / "raw2") == rows and again == info  # stable ids and bytes across runs

    fetch.run(params(corpus, split="test"), out_dir=tmp_path / "raw-test")
    assert [r["text"] for r in raw_rows(tmp_path / "raw-test")] == ["TEST SEGMENT"]
    with pytest.raises(FetchError, match=r"medical_dev\.info not found"):
        fetch.run(params(corpus, split="dev"), out_dir=tmp_path / "raw-dev")


def textgrid(speaker: str, xmax: float, intervals: list[tuple[float, float, str]]) -> str:
    """A transcript in PriMock57's TextGrid form (transcripts/day1_consultation01_patient.TextGrid at
    github.com/babylonhealth/primock57, commit f01a3cf7): Praat's long text format, one IntervalTier named after
    the speaker, unlabelled gaps between utterances, `""` escaping a quote, a trailing space after each value."""
    items = []
    for i, (start, end, text) in enumerate(intervals, 1):
        label = text.replace('"', '""')
        items.append(
            f"        intervals [{i}]:\n            xmin = {start} \n            xmax = {end} \n"
            f'            text = "{label}" \n'
        )
    return (
        'File type = "ooTextFile"\nObject class = "TextGrid"\n\n'
        f"xmin = 0 \nxmax = {xmax} \ntiers? <exists> \nsize = 1 \nitem []: \n    item [1]:\n"
        f'        class = "IntervalTier" \n        name = "{speaker}" \n        xmin = 0 \n        xmax = {xmax} \n'
        f"        intervals: size = {len(intervals)} \n" + "".join(items)
    )


def test_primock57_textgrids_in_the_published_layout(tmp_path):
    """PriMock57 as its repository publishes it: `audio/<day>_<consultation>_{doctor,patient}.wav` (16 kHz mono,
    one speaker channel each) and `transcripts/<same name>.TextGrid` (transcripts/README.md there: one interval
    per utterance, `<UNSURE>`/`<UNIN/>` tags). Malformed transcripts and unmatched files are counted."""
    import soundfile as sf
    from helpers import tone

    from medasr.audio import decode

    corpus = tmp_path / "primock57"
    (corpus / "audio").mkdir(parents=True)
    (corpus / "transcripts").mkdir()
    for name in ("day1_consultation01_doctor", "day1_consultation01_patient", "day2_consultation03_doctor"):
        sf.write(corpus / "audio" / f"{name}.wav", tone(8.0), 16_000, subtype="PCM_16")
    (corpus / "transcripts" / "day1_consultation01_doctor.TextGrid").write_text(
        textgrid(
            "Doctor",
            8.0,
            [(0, 0.5, ""), (0.5, 2.25, "Hello, how can I help?"), (2.25, 3.0, ""), (3.0, 4.5, 'Any "blood"?')],
        )
    )
    (corpus / "transcripts" / "day1_consultation01_patient.TextGrid").write_text(
        textgrid(
            "Patient",
            8.0,
            [
                (0, 1.0, ""),
                (1.0, 3.907171368756498, "<UNSURE>Um</UNSURE>, diarrhea for three days."),
                (4, 5, "<UNIN/>"),
            ],
        )
    )
    # a transcript whose recording is missing, and one cut off mid-file (a bad download)
    (corpus / "transcripts" / "day3_consultation02_patient.TextGrid").write_text(
        textgrid("Patient", 5.0, [(0.0, 2.0, "Yes.")])
    )
    (corpus / "transcripts" / "day3_consultation02_doctor.TextGrid").write_text(
        textgrid("Doctor", 5.0, [(0.0, 2.0, "Cut off")])[:150]
    )

    info = fetch.run(params(corpus), out_dir=tmp_path / "raw")
    rows = raw_rows(tmp_path / "raw")
    assert info["kind"] == "textgrid"
    # day2_consultation03_doctor.wav has no transcript; the truncated TextGrid is not read
    assert info["skipped"] == {"audio_without_transcript": 1, "malformed_textgrid": 1}
    assert [(r["source_id"], r["group"], r["text"]) for r in rows] == [
        ("day1_consultation01_doctor-00000500-00002250", "day1_consultation01", "Hello, how can I help?"),
        ("day1_consultation01_doctor-00003000-00004500", "day1_consultation01", 'Any "blood"?'),
        (
            "day1_consultation01_patient-00001000-00003907",
            "day1_consultation01",
            "<UNSURE>Um</UNSURE>, diarrhea for three days.",
        ),
        ("day1_consultation01_patient-00004000-00005000", "day1_consultation01", "<UNIN/>"),
        ("day3_consultation02_patient-00000000-00002000", "day3_consultation02", "Yes."),
    ]
    clip = decode(rows[0]["audio"])
    assert clip.sample_rate == 16_000 and clip.duration == pytest.approx(1.75, abs=1e-3)
    assert rows[4]["audio"] is None  # reaches subset as missing_audio
    assert fetch.run(params(corpus), out_dir=tmp_path / "raw2") == info and raw_rows(tmp_path / "raw2") == rows


def hf_cache_snapshot(hf_home: Path, repo: str, commit: str, files: dict[str, bytes]) -> Path:
    """A dataset repo as huggingface_hub caches it: `hub/datasets--<owner>--<name>/snapshots/<commit>/...`
    (files in blobs/, linked from the snapshot), with refs/main naming the commit."""
    import hashlib

    repo_dir = hf_home / "hub" / f"datasets--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(blob)
    return snapshot


def test_hub_snapshot_of_the_osce_repo_is_unpacked_once_and_read_as_a_segment_list(tmp_path, committed_params):
    """`yfyeung/medical` holds `audio.tar.gz` (-> audio/*.mp3) and `medical_*.info` (lhotse's recipe downloads
    exactly these). huggingface_hub runs for real in offline mode against a cache laid out as it lays one out."""
    import io
    import subprocess
    import sys

    import soundfile as sf
    import yaml
    from helpers import audio_bytes, tone

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        data = audio_bytes(tone(4.0), fmt="MP3")
        member = tarfile.TarInfo("audio/RES0001.mp3")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    commit = "0123456789abcdef0123456789abcdef01234567"
    hf_cache_snapshot(
        tmp_path / "hf",
        "yfyeung/medical",
        commit,
        {
            "audio.tar.gz": archive.getvalue(),
            # a file outside the archive: unpacked as a link into the HF cache, which the path guard must follow
            "audio/GAS0002.mp3": audio_bytes(tone(3.0, freq=300.0), fmt="MP3"),
            "medical_train.info": b"audio/RES0001.mp3[0.5,2.0]\tDO YOU HAVE A COUGH\n"
            b"audio/GAS0002.mp3[1,2]\tANY PAIN\n",
            "README.md": b"# medical\n",
        },
    )
    committed_params["fetch"] |= {"dataset": "yfyeung/medical", "revision": commit, "hub_download": "snapshot"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(committed_params))
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "300",
    }

    def fetch_cli() -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "stages.cli", "fetch"]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)

    proc = fetch_cli()
    assert proc.returncode == 0, proc.stderr
    assert "unpacked yfyeung/medical@" + commit in proc.stderr
    rows = raw_rows(tmp_path / "data" / "raw")
    assert [(r["source_id"], r["text"]) for r in rows] == [
        ("RES0001-00000500-00002000", "DO YOU HAVE A COUGH"),
        ("GAS0002-00001000-00002000", "ANY PAIN"),
    ]
    assert sf.info(io.BytesIO(rows[0]["audio"])).duration == pytest.approx(1.5, abs=0.01)
    assert sf.info(io.BytesIO(rows[1]["audio"])).duration == pytest.approx(1.0, abs=0.01)
    source = json.loads((tmp_path / "data" / "raw" / "source.json").read_text())
    assert source["kind"] == "segment_list" and source["revision"] == commit and source["skipped"] == {}

    again = fetch_cli()  # the unpacked copy is reused, not extracted again
    assert (
        again.returncode == 0 and "unpacked yfyeung" not in again.stderr and raw_rows(tmp_path / "data" / "raw") == rows
    )

    committed_params["fetch"]["revision"] = "f" * 40  # not in the cache, and offline
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(committed_params))
    proc = fetch_cli()
    assert proc.returncode == 1 and "could not download hub dataset 'yfyeung/medical'" in proc.stderr
    assert "Traceback" not in proc.stderr and raw_rows(tmp_path / "data" / "raw") == rows  # old output kept


def test_textgrid_point_tiers_are_ignored_and_several_interval_tiers_named(tmp_path):
    """Praat TextGrids may also hold point tiers (TextTier: instants, nothing to cut) and more than one interval
    tier; each interval tier's clips then carry the tier name in their id, and all of them the one file's group
    (a tier's name is a speaker, not part of the recording's name)."""
    import soundfile as sf
    from helpers import tone
    from praatio import textgrid as tgio

    corpus = tmp_path / "grids"
    corpus.mkdir()
    sf.write(corpus / "clinic_nurse.wav", tone(4.0), 16_000, subtype="PCM_16")
    grid = tgio.Textgrid()
    grid.addTier(tgio.IntervalTier("Nurse", [(0.5, 1.5, "Any pain?")], 0, 4.0))
    grid.addTier(tgio.IntervalTier("Patient", [(2.0, 3.0, "A little.")], 0, 4.0))
    grid.addTier(tgio.PointTier("events", [(1.7, "door")], 0, 4.0))
    grid.save(str(corpus / "clinic_nurse.TextGrid"), format="long_textgrid", includeBlankSpaces=True)

    info = fetch.run(params(corpus), out_dir=tmp_path / "raw")
    assert info["kind"] == "textgrid" and info["skipped"] == {}
    assert [(r["source_id"], r["group"], r["text"]) for r in raw_rows(tmp_path / "raw")] == [
        ("clinic_nurse-Nurse-00000500-00001500", "clinic_nurse", "Any pain?"),
        ("clinic_nurse-Patient-00002000-00003000", "clinic_nurse", "A little."),
    ]


def test_dataset_file_keeps_every_path_inside_the_dataset_folder(tmp_path):
    """The one guard every source kind uses before it reads a file a row names."""
    from medasr.sources.base import OutsideDataset, dataset_file

    root, elsewhere = tmp_path / "ds", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "sub" / "a.wav").write_bytes(b"a")
    (elsewhere / "secret").write_bytes(b"s")
    (root / "inside.wav").symlink_to(root / "sub" / "a.wav")
    (root / "out.wav").symlink_to(elsewhere / "secret")
    (root / "outdir").symlink_to(elsewhere)
    (root / "loop.wav").symlink_to(root / "loop.wav")
    assert dataset_file("sub/a.wav", root) == root / "sub" / "a.wav"
    assert dataset_file("inside.wav", root) == root / "inside.wav"  # a link that stays inside is fine
    assert dataset_file("sub/missing.wav", root) == root / "sub" / "missing.wav"  # missing: subset counts it
    refused = {
        "/proc/self/environ": "absolute path",
        str(root / "sub" / "a.wav"): "absolute path",  # even inside: the rule is simple to state and to check
        "../elsewhere/secret": "climbs out with `..`",
        "sub/../sub/a.wav": "climbs out with `..`",
        "out.wav": "link leading outside",
        "outdir/secret": "link leading outside",
        "loop.wav": "cannot be resolved",
        "a\0.wav": "cannot be resolved",
    }
    for name, why in refused.items():
        with pytest.raises(OutsideDataset, match=why):
            dataset_file(name, root)
    assert dataset_file("out.wav", root, links_to=(elsewhere,)) == root / "out.wav"
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(root)  # fetch.dataset may itself be a link to the real folder
    assert dataset_file("sub/a.wav", linked_root) == linked_root / "sub" / "a.wav"


def test_only_a_hub_snapshot_may_link_out_and_only_into_its_own_repos_blobs(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from medasr.sources.base import link_roots, unpacked_dir

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    unpacked = unpacked_dir() / "yfyeung--medical" / ("0" * 40)
    unpacked.mkdir(parents=True)
    assert link_roots(unpacked) == (tmp_path / "hf" / "hub" / "datasets--yfyeung--medical" / "blobs",)
    assert link_roots(unpacked.parent) == link_roots(tmp_path) == ()


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_paths_out_of_the_dataset_folder_are_refused_counted_and_never_read(tmp_path, committed_params, kind):
    """Issue 14 item 11: `file_name: /proc/self/environ` put AWS_SECRET_ACCESS_KEY into data/raw (then the DVC cache
    and remote). `medasr fetch` as DVC runs it, with a planted secret in its environment and in a file beside the
    dataset: the three rows leading out are skipped and counted, the good one is read, and no output holds the
    secret."""
    import subprocess
    import sys
    import uuid

    import yaml

    secret = f"planted-{uuid.uuid4().hex}"
    dataset = traversal_dataset(kind, tmp_path, secret)
    repo = tmp_path / "repo"
    repo.mkdir()
    committed_params["fetch"] |= {"dataset": str(dataset), "split": "train", "text_column": "text"}
    (repo / "params.yaml").write_text(yaml.safe_dump(committed_params))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "300", "AWS_SECRET_ACCESS_KEY": secret}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "fetch"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )

    assert proc.returncode == 0, proc.stderr
    assert files_holding(repo, secret) == []
    source = json.loads((repo / "data" / "raw" / "source.json").read_text())
    assert source["kind"] == kind and source["skipped"] == {"path_outside_dataset": 3}
    assert [r["text"] for r in raw_rows(repo / "data" / "raw")] == [GOOD_TEXT]
    assert "skipped {'path_outside_dataset': 3}" in proc.stderr and "skipped, not read" in proc.stderr


def test_a_source_of_nothing_but_paths_out_of_its_folder_fails_in_one_line(tmp_path):
    manifest = tmp_path / "corpus" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(
        "".join(json.dumps({"audio_filepath": n, "text": "t"}) + "\n" for n in ("/etc/hostname", "../x"))
    )
    out = tmp_path / "raw"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"previous output")
    with pytest.raises(FetchError, match=r"no row could be read, every one skipped: \{'path_outside_dataset': 2\}"):
        fetch.run(params(manifest), out_dir=out)
    assert (out / "part-00000.parquet").read_bytes() == b"previous output"


def test_a_hub_row_without_audio_bytes_is_never_read_from_disk(tmp_path, monkeypatch):
    """A hub dataset has no local folder: a cell naming a path instead of carrying bytes (`.env` in the working
    directory, an absolute file) is counted, not followed."""
    from collections import Counter

    import datasets

    from medasr.sources import hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("AWS_SECRET_ACCESS_KEY=planted\n")
    features = datasets.Features(
        {
            "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
            "text": datasets.Value("string"),
        }
    )
    cells = [
        {"bytes": wav(0.5), "path": "a.wav"},
        {"bytes": None, "path": ".env"},
        {"bytes": None, "path": "/etc/hostname"},
    ]
    ds = datasets.Dataset.from_list([{"audio": c, "text": f"t{i}"} for i, c in enumerate(cells)], features=features)
    skipped: Counter = Counter()
    rows = list(hub._rows(ds, "dataset 'someone/x'", params("someone/x"), skipped, None))
    assert [(r["row"], r["audio"]) for r in rows] == [(0, wav(0.5))] and skipped == {"path_outside_dataset": 2}


@pytest.mark.parametrize(
    ("kind", "own_file"),
    [("audiofolder", "metadata.jsonl"), ("segment_list", "medical_train.info"), ("parquet", "sub/rows.parquet")],
)
def test_a_layouts_own_file_linked_out_of_the_folder_fails_the_source(tmp_path, kind, own_file):
    """A cloned dataset (git keeps symlinks) whose metadata is a link to a file elsewhere on the machine."""
    traversal_dataset(kind, tmp_path / "elsewhere", "s")  # a real dataset of that kind, outside the one fetched
    real = next((tmp_path / "elsewhere" / "corpus").glob(Path(own_file).name))
    corpus = tmp_path / "corpus"
    (corpus / own_file).parent.mkdir(parents=True)
    (corpus / own_file).symlink_to(real)
    with pytest.raises(FetchError, match=rf"'{own_file}' is a link leading outside .*must stay inside its folder"):
        fetch.run(params(corpus), out_dir=tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_osce_segment_list_long_form_one_row_per_recording_in_time_order(tmp_path):
    """Long-form: each recording whole, its segments' text in time order whatever the line order; a recording whose
    segments overlap cannot be ordered (counted, not read); a missing recording reaches testsets as missing audio."""
    import soundfile as sf
    from helpers import tone

    corpus = tmp_path / "medical"
    (corpus / "audio").mkdir(parents=True)
    sf.write(corpus / "audio" / "RES0001.mp3", tone(6.0), 16_000, format="MP3")
    sf.write(corpus / "audio" / "GAS0002.mp3", tone(3.0), 16_000, format="MP3")
    lines = [
        "audio/RES0001.mp3[2.500,5.000]\tI HAVE HAD A COUGH FOR THREE DAYS",
        "audio/GAS0002.mp3[0.000,2.000]\tANY VOMITING",
        "audio/RES0001.mp3[0.500,2.500]\tHOW CAN I HELP YOU TODAY",
        "audio/CAR0003.mp3[0.000,1.000]\tTHE RECORDING IS MISSING",
        "audio/GAS0002.mp3[1.500,2.500]\tOVERLAPS THE ONE BEFORE",
        "audio/RES0001.mp3[5.000,5.500]\t",
        "not a segment line",
    ]
    (corpus / "medical_test.info").write_text("\n".join(lines) + "\n")

    info = sources.fetch_to(params(corpus, split="test"), tmp_path / "raw", long_form=True)
    assert info["skipped"] == {"malformed_segment_line": 1, "unordered_transcript": 1} and info["long_form"]
    rows = raw_rows(tmp_path / "raw")
    assert [(r["source_id"], r["group"], r["text"]) for r in rows] == [
        ("RES0001", "RES0001", "HOW CAN I HELP YOU TODAY I HAVE HAD A COUGH FOR THREE DAYS"),
        ("CAR0003", "CAR0003", "THE RECORDING IS MISSING"),
    ]
    assert rows[0]["audio"] == (corpus / "audio" / "RES0001.mp3").read_bytes() and rows[1]["audio"] is None


def test_osce_segment_list_long_form_one_recording_however_its_path_is_spelt_and_repeats_read_once(tmp_path):
    """Lines naming one file as `audio/R1.wav`, `./audio/R1.wav` or `audio//R1.wav` are one recording (not three
    rows with one id, each a third of the text); a line repeated exactly is read once and counted, not taken for
    overlapping speech that would drop the whole recording."""
    from collections import Counter

    from medasr.sources import segment_list

    corpus = tmp_path / "medical"
    (corpus / "audio").mkdir(parents=True)
    (corpus / "audio" / "R1.wav").write_bytes(wav(6.0))
    lines = [
        "audio/R1.wav[0,1]\tFIRST",
        "./audio/R1.wav[4,5]\tTHIRD",
        "audio//R1.wav[2,3]\tSECOND",
        "audio/R1.wav[0,1]\tFIRST",
        "audio/R1.wav[5,6]\tFOURTH",
    ]
    (corpus / "medical_test.info").write_text("\n".join(lines) + "\n")
    skipped: Counter = Counter()
    rows = list(segment_list.read_recordings(str(corpus), params(corpus, split="test"), skipped))
    assert [(r["source_id"], r["source_path"], r["text"]) for r in rows] == [
        ("R1", "audio/R1.wav", "FIRST SECOND THIRD FOURTH")
    ]
    assert skipped == {"duplicate_segment": 1} and rows[0]["audio"] == (corpus / "audio" / "R1.wav").read_bytes()


def test_textgrid_long_form_merges_the_tiers_of_one_recording_and_groups_consultations_by_file_name(tmp_path):
    """Several interval tiers over one file are the speakers of one mixed recording: one row, `<name>`, all tiers'
    intervals in order of start time (speakers on different tiers may talk over each other). The group follows
    `<consultation>_<doctor|patient>` whatever the tier is called, else the old `_<tier>` rule for a one-tier file."""
    import soundfile as sf
    from helpers import tone
    from praatio import textgrid as tgio

    from medasr.sources.textgrid import group_of

    corpus = tmp_path / "grids"
    corpus.mkdir()
    sf.write(corpus / "visit.wav", tone(4.0), 16_000, subtype="PCM_16")
    grid = tgio.Textgrid()
    grid.addTier(tgio.IntervalTier("Doctor", [(2.5, 3.0, "Anything else?"), (0.5, 1.5, "Any pain?")], 0, 4.0))
    grid.addTier(tgio.IntervalTier("Patient", [(1.2, 2.4, "A little.")], 0, 4.0))  # over the doctor's end
    grid.save(str(corpus / "visit.TextGrid"), format="long_textgrid", includeBlankSpaces=True)

    info = sources.fetch_to(params(corpus), tmp_path / "raw", long_form=True)
    rows = raw_rows(tmp_path / "raw")
    assert info["skipped"] == {} and [(r["source_id"], r["group"], r["text"]) for r in rows] == [
        ("visit", "visit", "Any pain? A little. Anything else?"),
    ]
    assert rows[0]["audio"] == (corpus / "visit.wav").read_bytes()

    assert group_of("day2_consultation03_doctor", "Speaker") == "day2_consultation03"
    assert group_of("Day2_Consultation03_PATIENT", "Patient") == "Day2_Consultation03"
    assert group_of("clinic_nurse", "Nurse") == "clinic"
    assert group_of("visit", "Doctor") == "visit"
    assert group_of("clinic_nurse", None) == "clinic_nurse"  # several tiers: each clip's group is the one file


@pytest.mark.parametrize("kind", ["textgrid", "segment_list"])
def test_long_form_reads_no_recording_out_of_the_dataset_folder(tmp_path, kind):
    """The long-form readers read whole files: the same guard, each refused recording counted once."""
    secret = "planted-long-form-secret"
    dataset = traversal_dataset(kind, tmp_path, secret)
    info = sources.fetch_to(params(dataset), tmp_path / "raw", long_form=True)
    assert info["skipped"] == {"path_outside_dataset": 3}
    assert [(r["source_id"], r["text"]) for r in raw_rows(tmp_path / "raw")] == [("good", GOOD_TEXT)]
    assert files_holding(tmp_path / "raw", secret) == []
