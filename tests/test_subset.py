"""subset: stable hash split, group integrity, caps, and a counted reason for every row that is not kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import raw_row, wav

from medasr import StageError
from medasr.files import read_jsonl
from medasr.params import SubsetParams
from medasr.paths import SPLITS
from medasr.raw import write_shards
from stages import subset


def params(**kw) -> SubsetParams:
    base = {"seed": 7, "train_size": 10_000, "val_size": 1_000, "min_duration": 0.2, "max_duration": 5.0}
    return SubsetParams(**(base | kw))


def write_raw(tmp: Path, rows: list[dict]) -> Path:
    raw = tmp / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for old in raw.glob("*.parquet"):
        old.unlink()
    write_shards(iter(rows), raw)
    return raw


def clips(n: int, start: int = 0, **extra) -> list[dict]:
    """n valid, distinct rows (distinct frequency and text per row)."""
    return [raw_row(i, wav(0.5, freq=200.0 + i), f"sentence number {i}", **extra) for i in range(start, start + n)]


def run(tmp: Path, rows: list[dict], p: SubsetParams) -> tuple[dict, dict[str, list[dict]], list[dict]]:
    raw = write_raw(tmp, rows)
    out, metrics_file = tmp / "subset", tmp / "metrics" / "data.json"
    metrics = subset.run(p, raw_dir=raw, out_dir=out, metrics_file=metrics_file)
    assert json.loads(metrics_file.read_text()) == metrics
    kept = {s: read_jsonl(out / f"{s}.jsonl") for s in SPLITS}
    return metrics, kept, read_jsonl(out / "dropped.jsonl")


def test_adding_rows_never_moves_an_existing_row(tmp_path):
    p = params(train_size=10_000, val_size=2_000)
    _, before, _ = run(tmp_path, clips(150), p)
    _, after, _ = run(tmp_path, clips(150) + clips(150, start=150), p)

    side_before = {r["id"]: s for s, rows in before.items() for r in rows}
    side_after = {r["id"]: s for s, rows in after.items() for r in rows}
    assert len(side_before) == 150 and len(side_after) == 300
    assert all(side_after[i] == s for i, s in side_before.items())
    # the fraction val_size/(train_size+val_size) = 1/6 is what the hash aims at
    assert 20 <= len(after["val"]) <= 80


def test_caps_keep_the_lowest_hashes_so_growth_only_displaces(tmp_path):
    p = params(train_size=40, val_size=8)
    _, before, _ = run(tmp_path, clips(100), p)
    metrics, after, dropped = run(tmp_path, clips(100) + clips(100, start=100), p)

    assert len(after["train"]) == 40 and len(after["val"]) == 8
    assert metrics["dropped"]["over_cap"] == 200 - 48 == sum(d["reason"] == "over_cap" for d in dropped)
    for split in SPLITS:
        kept_after = {r["id"] for r in after[split]}
        new_rows = kept_after - {r["id"] for r in before[split]}
        # an old row can only leave because a new row with a lower hash took its place
        evicted = {r["id"] for r in before[split]} - kept_after
        assert len(evicted) == len(new_rows)
        if evicted:
            worst_new = max(subset.rank_of(i, p.seed) for i in new_rows)
            best_evicted = min(subset.rank_of(i, p.seed) for i in evicted)
            assert worst_new < best_evicted


def test_groups_never_straddle_splits(tmp_path):
    rows = [r | {"group": f"speaker{i % 12}"} for i, r in enumerate(clips(120))]
    _, kept, _ = run(tmp_path, rows, params(train_size=1000, val_size=250))
    train_groups = {r["group"] for r in kept["train"]}
    val_groups = {r["group"] for r in kept["val"]}
    assert train_groups and val_groups
    assert not train_groups & val_groups


def test_source_ids_are_used_when_present(tmp_path):
    rows = [r | {"source_id": f"utt-{i}"} for i, r in enumerate(clips(5))]
    _, kept, _ = run(tmp_path, rows, params())
    assert sorted(r["id"] for s in kept.values() for r in s) == [f"utt-{i}" for i in range(5)]


def test_every_bad_row_kind_is_dropped_and_counted(tmp_path):
    good = wav(1.0, freq=300.0)
    rows = [
        raw_row(0, good, "A good clip."),
        raw_row(1, wav(1.0, freq=310.0), None),  # null text
        raw_row(2, wav(1.0, freq=320.0), "   \t "),  # whitespace-only text
        raw_row(3, None, "audio file missing"),
        raw_row(4, b"not audio at all" * 20, "corrupt bytes"),
        raw_row(5, wav(1.0)[:30], "truncated header"),
        raw_row(6, b"", "zero-byte file"),
        raw_row(7, wav(0.0), "zero frames"),
        raw_row(8, wav(0.1, freq=330.0), "too short"),
        raw_row(9, wav(6.0, freq=340.0), "too long"),
        raw_row(10, good, "A good clip."),  # exact duplicate of row 0
        raw_row(11, good, "Same audio, different words."),  # kept: a different transcript
        raw_row(12, wav(1.0, freq=350.0, rate=8_000), "Résumé of the naïve patient, 5 µg."),  # kept, repaired later
    ]
    metrics, kept, dropped = run(tmp_path, rows, params())

    assert metrics["rows_in"] == 13
    assert metrics["dropped"] == {
        "empty_text": 2,
        "missing_audio": 1,
        "undecodable_audio": 2,
        "empty_audio": 2,
        "too_short": 1,
        "too_long": 1,
        "duplicate": 1,
        "duplicate_id": 0,
        "over_cap": 0,
    }
    kept_rows = [r for s in kept.values() for r in s]
    assert sum(metrics["kept"].values()) == len(kept_rows) == 3
    assert metrics["rows_in"] == len(kept_rows) + metrics["dropped_total"] == len(kept_rows) + len(dropped)
    assert sorted(d["source_row"] for d in dropped) == list(range(1, 11))
    assert {r["text"] for r in kept_rows} == {
        "A good clip.",
        "Same audio, different words.",
        "Résumé of the naïve patient, 5 µg.",
    }
    by_text = {r["text"]: r for r in kept_rows}
    assert by_text["Résumé of the naïve patient, 5 µg."]["sample_rate"] == 8_000


def test_repeated_source_id_with_other_content_is_dropped(tmp_path):
    rows = [
        raw_row(0, wav(1.0, freq=300.0), "one", source_id="x"),
        raw_row(1, wav(1.0, freq=400.0), "two", source_id="x"),
    ]
    metrics, _, dropped = run(tmp_path, rows, params())
    assert metrics["dropped"]["duplicate_id"] == 1 and dropped[0]["id"] == "x"


def test_text_variants_count_as_the_same_transcript(tmp_path):
    decomposed = "Cafe\u0301  au   lait"  # e + combining acute, runs of spaces
    composed = "Caf\u00e9 au lait"
    metrics, kept, _ = run(tmp_path, [raw_row(0, wav(1.0), decomposed), raw_row(1, wav(1.0), composed)], params())
    (row,) = [r for s in kept.values() for r in s]
    assert row["text"] == decomposed  # kept as the source wrote it; the manifest stage normalises
    assert metrics["dropped"]["duplicate"] == 1


def test_empty_split_warns_but_does_not_fail(tmp_path, caplog):
    metrics, kept, _ = run(tmp_path, clips(3), params(train_size=10, val_size=0))
    assert metrics["kept"] == {"train": 3, "val": 0} and kept["val"] == []
    assert "val split is empty" in caplog.text


def test_outputs_are_deterministic(tmp_path):
    rows = clips(40)
    run(tmp_path / "a", rows, params(train_size=30, val_size=5))
    run(tmp_path / "b", rows, params(train_size=30, val_size=5))
    for name in ("train.jsonl", "val.jsonl", "dropped.jsonl"):
        assert (tmp_path / "a" / "subset" / name).read_bytes() == (tmp_path / "b" / "subset" / name).read_bytes()


def test_missing_raw_data_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="run `medasr fetch`"):
        subset.run(params(), raw_dir=tmp_path / "nope", out_dir=tmp_path / "s", metrics_file=tmp_path / "m.json")
