"""manifest: 16 kHz mono output from any input, portable relative paths, byte-identical reruns."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
from helpers import raw_row, wav

from medasr.clips import audio_name
from medasr.files import read_jsonl
from medasr.params import ManifestParams, SubsetParams
from medasr.raw import write_shards
from medasr.text import clean_text
from stages import manifest, subset

SUBSET = SubsetParams(seed=3, train_size=100, val_size=25, min_duration=0.1, max_duration=10.0)


def build(root: Path, rows: list[dict], normalization: str = "unicode", tags: str = "strip", caps: str = "keep"):
    """fetch output -> subset -> manifest, all under `root`; returns the manifest folder."""
    (root / "raw").mkdir(parents=True)
    write_shards(iter(rows), root / "raw")
    subset.run(SUBSET, raw_dir=root / "raw", out_dir=root / "subset", metrics_file=root / "data.json")
    p = ManifestParams(text_normalization=normalization, annotation_tags=tags, all_caps=caps)
    manifest.run(p, root / "raw", root / "subset", root / "manifests")
    return root / "manifests"


MIXED = [
    raw_row(0, wav(1.0, rate=16_000), "Sixteen kilohertz mono."),
    raw_row(1, wav(1.5, rate=8_000), "Eight kilohertz telephone audio."),
    raw_row(2, wav(2.0, rate=44_100, channels=2), "CD-rate stereo."),
    raw_row(3, wav(0.75, rate=48_000, channels=2), "Forty-eight kilohertz stereo."),
    raw_row(4, wav(1.0, rate=22_050, freq=500.0), "Patient  given 5\u00a0mg  of  Cafe\u0301ine."),
    *[raw_row(i, wav(0.5, freq=200.0 + i), f"Filler sentence {i}.") for i in range(5, 30)],
]


def test_every_clip_becomes_16k_mono_with_matching_duration(tmp_path):
    out = build(tmp_path, MIXED)
    rows = read_jsonl(out / "train.json") + read_jsonl(out / "val.json")
    assert len(rows) == len(MIXED)
    expected = {clean_text(r["text"]): sf.info(io.BytesIO(r["audio"])).duration for r in MIXED}
    for row in rows:
        assert set(row) == {"audio_filepath", "duration", "text", "id"}
        info = sf.info(out / row["audio_filepath"])
        assert (info.samplerate, info.channels) == (16_000, 1)
        assert row["duration"] == pytest.approx(info.frames / 16_000)
        assert row["duration"] == pytest.approx(expected[row["text"]], abs=1e-3)


def test_paths_are_relative_and_survive_moving_the_folder(tmp_path):
    out = build(tmp_path / "clone_a", MIXED)
    moved = tmp_path / "elsewhere" / "clone_b" / "manifests"
    shutil.copytree(out, moved)
    shutil.rmtree(tmp_path / "clone_a")
    for split in ("train", "val"):
        for row in read_jsonl(moved / f"{split}.json"):
            assert not Path(row["audio_filepath"]).is_absolute()
            assert (moved / row["audio_filepath"]).is_file()


def test_rebuilding_from_scratch_is_byte_identical(tmp_path):
    a, b = build(tmp_path / "a", MIXED), build(tmp_path / "b", MIXED)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("unicode", "Patient given 5 mg of Caf\u00e9ine."), ("none", "Patient  given 5\u00a0mg  of  Cafe\u0301ine.")],
)
def test_training_text_normalisation_param(tmp_path, mode, expected):
    out = build(tmp_path, MIXED, normalization=mode, tags="keep")
    texts = {r["id"]: r["text"] for s in ("train", "val") for r in read_jsonl(out / f"{s}.json")}
    assert expected in texts.values()


def test_osce_style_references_are_cleaned_and_markup_only_rows_dropped(tmp_path):
    rows = [
        *MIXED,
        raw_row(30, wav(1.0, freq=300.0), "I HAVE HAD <UNSURE>CHEST</UNSURE> PAIN <INAUDIBLE> SINCE MONDAY. IS IT BAD"),
        raw_row(31, wav(1.0, freq=310.0), "<INAUDIBLE_SPEECH/>"),  # nothing but markup: no transcript
    ]
    out = build(tmp_path, rows, caps="sentence_case")
    texts = [r["text"] for s in ("train", "val") for r in read_jsonl(out / f"{s}.json")]
    assert "I have had chest pain since monday. Is it bad" in texts
    assert "CD-rate stereo." in texts  # mixed-case text keeps its casing
    assert json.loads((tmp_path / "data.json").read_text())["dropped"]["empty_text"] == 1


def test_audio_names_are_safe_and_unique():
    names = {audio_name(i) for i in ("a/b c", "a_b_c", "../../etc/passwd", "é" * 80, "")}
    assert len(names) == 5
    assert all("/" not in n and n.endswith(".flac") and not n.startswith(".") for n in names)


@pytest.mark.e2e
def test_nemo_reads_the_manifest_from_a_moved_copy(tmp_path):
    """NeMo's own lhotse adapter (what SALM training uses) resolves our relative paths and sees 16 kHz mono."""
    from nemo.collections.common.data.lhotse.nemo_adapters import LazyNeMoIterator

    out = build(tmp_path / "a", MIXED)
    moved = tmp_path / "b" / "manifests"
    shutil.copytree(out, moved)
    shutil.rmtree(tmp_path / "a")
    rows = read_jsonl(moved / "train.json")
    cuts = list(LazyNeMoIterator(str(moved / "train.json")))
    assert len(cuts) == len(rows) > 0
    for cut, row in zip(cuts, rows, strict=True):
        samples = cut.load_audio()
        assert cut.sampling_rate == 16_000 and samples.shape[0] == 1
        assert cut.supervisions[0].text == row["text"]
        assert samples.shape[1] == pytest.approx(row["duration"] * 16_000, abs=1)
    json.dumps(cuts[0].to_dict())  # a well-formed lhotse cut


def test_cli_reports_missing_upstream_output_without_a_traceback(tmp_path, monkeypatch):
    from helpers import REPO
    from typer.testing import CliRunner

    from stages.cli import EXIT_FAILED, app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["manifest", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == EXIT_FAILED
    assert "run `medasr subset`" in result.output and "Traceback" not in result.output
