"""Row screening shared by the subset and testsets stages: which raw rows can become clips, and why the others
cannot. Each row is checked for text, audio that decodes, its length against the limits, and duplicates (same
audio and text, or a repeated source id); per-row work runs on all cores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from medasr import StageError
from medasr.audio import AudioDecodeError, Probe, map_clips, probe
from medasr.files import read_jsonl
from medasr.paths import SPLITS, subset_split
from medasr.raw import shards
from medasr.text import clean_text, strip_tags

# Every reason a raw row can fail to reach a split; all are always reported (zero included) so the metric's shape
# never changes between runs and `dvc metrics diff` compares like with like.
DROP_REASONS = (
    "empty_text",  # null, empty or whitespace-only transcript
    "missing_audio",  # the source row had no audio (e.g. a file the metadata names does not exist)
    "undecodable_audio",  # corrupt, truncated or unknown format
    "empty_audio",  # zero samples
    "too_short",  # below subset.min_duration
    "too_long",  # above subset.max_duration
    "duplicate",  # same audio bytes and same text as an earlier row
    "duplicate_id",  # the source id column repeats with different content
    "over_cap",  # valid, but its split already holds train_size/val_size rows with lower hashes
)


@dataclass(frozen=True)
class Candidate:
    id: str
    raw_file: str
    raw_row: int  # row index inside raw_file
    group: str | None
    duration: float
    sample_rate: int
    channels: int
    text: str  # as in the source: the manifest stage applies the training-target normalisation
    content: str  # hash of audio bytes + cleaned text: how a test set recognises a clip that is also in training


def content_id(audio: bytes, text: str) -> str:
    return hashlib.sha256(hashlib.sha256(audio).digest() + text.encode("utf-8")).hexdigest()[:20]


def inspect_row(row: dict[str, Any]) -> tuple[str, str | None, Probe | AudioDecodeError | None]:
    """The per-row work that needs no other row (run on all cores): cleaned text, content hash, audio probe."""
    text = strip_tags(clean_text(row["text"]))  # markup alone (<INAUDIBLE>) is no transcript
    if not text or row["audio"] is None:
        return text, None, None
    try:
        found: Probe | AudioDecodeError = probe(row["audio"])
    except AudioDecodeError as exc:
        found = exc
    return text, content_id(row["audio"], text), found


def screen(
    raw_dir: Path, min_duration: float, max_duration: float
) -> tuple[list[Candidate], list[dict[str, Any]], int]:
    """Apply the row filters. Returns valid candidates, dropped rows (with reasons) and the number of rows read."""
    candidates: list[Candidate] = []
    dropped: list[dict[str, Any]] = []
    seen_content: set[str] = set()
    seen_ids: set[str] = set()
    rows_in = 0
    for shard in shards(raw_dir):
        rows = pq.read_table(shard).to_pylist()
        for i, (row, (text, content, audio)) in enumerate(zip(rows, map_clips(inspect_row, rows), strict=True)):
            rows_in += 1
            where = {"raw_file": shard.name, "raw_row": i, "source_row": row["row"], "source_path": row["source_path"]}

            def drop(reason: str, detail: str = "", row_id: str | None = None, where: dict = where) -> None:
                dropped.append({**where, "id": row_id, "reason": reason, "detail": detail})

            if not text:
                drop("empty_text", row_id=row["source_id"])
                continue
            if row["audio"] is None:
                drop("missing_audio", row_id=row["source_id"])
                continue
            assert content is not None and audio is not None
            row_id = row["source_id"] if row["source_id"] is not None else content
            if content in seen_content:
                drop("duplicate", row_id=row_id)
                continue
            if row_id in seen_ids:
                drop("duplicate_id", "same id, different audio or text", row_id)
                continue
            if isinstance(audio, AudioDecodeError):
                drop("empty_audio" if not row["audio"] else "undecodable_audio", str(audio), row_id)
                continue
            if audio.frames == 0:
                drop("empty_audio", row_id=row_id)
                continue
            if audio.duration < min_duration:
                drop("too_short", f"{audio.duration:.3f}s", row_id)
                continue
            if audio.duration > max_duration:
                drop("too_long", f"{audio.duration:.3f}s", row_id)
                continue
            seen_content.add(content)
            seen_ids.add(row_id)
            candidates.append(
                Candidate(
                    row_id,
                    shard.name,
                    i,
                    row["group"],
                    audio.duration,
                    audio.sample_rate,
                    audio.channels,
                    row["text"],
                    content,
                )
            )
        del rows
    return candidates, dropped, rows_in


def read_subset(subset_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The rows the subset stage selected, per split; a missing split file is a StageError naming the stage to run."""
    missing = [str(subset_split(s, subset_dir)) for s in SPLITS if not subset_split(s, subset_dir).is_file()]
    if missing:
        raise StageError(f"missing {', '.join(missing)}: run `medasr subset` (or `dvc repro subset`) first")
    return {s: read_jsonl(subset_split(s, subset_dir)) for s in SPLITS}
