"""The data stages on PriMock57's own published transcripts (tests/data/primock57: 8 consultations, doctor and patient
channel each, CC BY 4.0, see its NOTICE), not on a fixture written to match the code. The audio is in Git LFS there,
so each channel gets stand-in audio of its length; every interval is cut from it as it would be from the real one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from helpers import REPO
from praatio import textgrid as tgio

from medasr.clips import speaker_role
from medasr.files import read_jsonl
from medasr.params import FetchParams, SubsetParams
from medasr.sources import fetch_to
from medasr.text import clean_text, strip_tags
from stages import fetch, subset

PUBLISHED = REPO / "tests" / "data" / "primock57" / "transcripts"
CONSULTATIONS = [f"day1_consultation{i:02d}" for i in range(1, 9)]
# a low rate keeps 2 h of stand-in audio cheap; the readers take any rate, the manifest stages resample
RATE = 2_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The published layout: `transcripts/<name>.TextGrid` beside `audio/<name>.wav`, one channel per file."""
    root = tmp_path_factory.mktemp("primock57")
    shutil.copytree(PUBLISHED, root / "transcripts")
    (root / "audio").mkdir()
    rng = np.random.default_rng(57)
    for grid in sorted(PUBLISHED.glob("*.TextGrid")):
        seconds = tgio.openTextgrid(str(grid), includeEmptyIntervals=False).maxTimestamp
        # quiet noise, different everywhere: two clips with the same text never share their bytes (no `duplicate`)
        noise = rng.integers(-64, 64, round(seconds * RATE), dtype=np.int16)
        sf.write(root / "audio" / f"{grid.stem}.wav", noise, RATE, subtype="PCM_16")
    return root


def only_tier(grid: Path) -> tgio.IntervalTier:
    tg = tgio.openTextgrid(str(grid), includeEmptyIntervals=False)
    (name,) = tg.tierNames
    tier = tg.getTier(name)
    assert isinstance(tier, tgio.IntervalTier)
    return tier


def old_group(stem: str, tier: str) -> str:
    """The rule this replaces: the file name less `_<tier name>`."""
    suffix = f"_{tier.lower()}"
    return stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem


def test_no_consultation_straddles_train_and_val(corpus, tmp_path):
    p = SubsetParams(seed=1234, train_size=4000, val_size=1000, min_duration=0.5, max_duration=30.0)
    info = fetch.run(
        FetchParams(dataset=str(corpus), split="train", audio_column="audio", text_column="text"), tmp_path / "raw"
    )
    assert info["kind"] == "textgrid" and info["skipped"] == {}
    metrics = subset.run(p, tmp_path / "raw", tmp_path / "subset", tmp_path / "data.json")

    splits = {s: read_jsonl(tmp_path / "subset" / f"{s}.jsonl") for s in ("train", "val")}
    # the consultation as the clip id says it (`<consultation>_<role>-<start>-<end>`), whatever the group column says
    sides = {s: {r["id"].split("-")[0].rsplit("_", 1)[0] for r in rows} for s, rows in splits.items()}
    assert sides["train"] & sides["val"] == set() and sides["val"]
    assert sides["train"] | sides["val"] == set(CONSULTATIONS)
    assert {r["group"] for rows in splits.values() for r in rows} == set(CONSULTATIONS)
    channels = {r["id"].split("-")[0] for rows in splits.values() for r in rows}
    assert len(channels) == 16  # both channels of every consultation reached a split

    # the old rule, with these very params: 112 of the 114 published files name their only tier `Speaker`, so each
    # channel was its own group and 3 of these 8 consultations had one channel in train, the other in val
    val_fraction = p.val_size / (p.train_size + p.val_size)
    straddled = []
    for consultation in CONSULTATIONS:
        old = set()
        for role in ("doctor", "patient"):
            tier = only_tier(PUBLISHED / f"{consultation}_{role}.TextGrid")
            old.add(subset.split_of(old_group(f"{consultation}_{role}", tier.name), p.seed, val_fraction))
        if len(old) == 2:
            straddled.append(consultation)
    assert straddled == ["day1_consultation02", "day1_consultation05", "day1_consultation06"]

    # intervals holding only markup (`<UNIN/>`) are rows at source, dropped by subset as empty text and counted
    markup_only = [r for r in read_jsonl(tmp_path / "subset" / "dropped.jsonl") if r["reason"] == "empty_text"]
    assert metrics["dropped"]["empty_text"] == len(markup_only) > 0
    assert metrics["dropped"]["over_cap"] == 0
    labels = [label for grid in PUBLISHED.glob("*.TextGrid") for _, _, label in only_tier(grid).entries]
    assert len(markup_only) == sum(not strip_tags(clean_text(label)) for label in labels)


def test_long_form_reads_each_published_channel_whole(corpus, tmp_path):
    """Long-form: one row per channel, id its file name, the whole recording, the intervals' text in time order."""
    info = fetch_to(
        FetchParams(dataset=str(corpus), split="test", audio_column="audio", text_column="text"), tmp_path / "raw", True
    )
    assert info["rows"] == 16 and info["skipped"] == {} and info["long_form"] is True
    rows = [r for shard in sorted((tmp_path / "raw").glob("part-*.parquet")) for r in pq.read_table(shard).to_pylist()]
    assert [r["source_id"] for r in rows] == sorted(g.stem for g in PUBLISHED.glob("*.TextGrid"))
    assert {r["group"] for r in rows} == set(CONSULTATIONS)
    assert [speaker_role(r["source_id"]) for r in rows] == ["doctor", "patient"] * 8
    first = rows[0]  # day1_consultation01_doctor: its first two labelled intervals, in order, then the rest
    assert first["audio"] == (corpus / "audio" / "day1_consultation01_doctor.wav").read_bytes()
    assert first["text"].startswith(
        "Hello? Hi. Um, should we start? Yeah, okay. <UNSURE>Hello how</UNSURE> um. Good morning sir, how can I help "
        "you this morning? <UNIN/> Sorry to hear that. Um, and and when you say diarrhea,"
    )
    assert len(first["text"].split()) == sum(
        len(label.split()) for _, _, label in only_tier(PUBLISHED / "day1_consultation01_doctor.TextGrid").entries
    )


@pytest.mark.parametrize(
    ("clip_id", "role"),
    [
        ("day1_consultation01_doctor", "doctor"),
        ("day1_consultation01_doctor-00000600-00003179", "doctor"),
        ("DAY5_CONSULTATION03_Patient-00012000-00013500", "patient"),
        ("visit-Patient-00002000-00003000", "patient"),  # a TextGrid with a tier per speaker
        ("day1_consultation01", None),
        ("RES0001-00000500-00002250", None),
        ("doctors_notes_01", None),
        ("x_doctorate-00000000-00001000", None),
        ("abc123", None),
        ("patient-0001", None),  # a role word anywhere but the end of the recording name says nothing
        ("doctor-visit-03", None),
        ("nurse_patient-interview-0001", None),
        ("patient_doctor_notes-00000000-00001000", None),
        ("visit_Doctor-Patient-00000000-00001000", "patient"),  # the tier names the speaker, not the file
        ("day1_consultation01_doctor-0000600-00003179", None),  # not a clip suffix
    ],
)
def test_speaker_role_from_the_clip_id(clip_id, role):
    assert speaker_role(clip_id) == role
