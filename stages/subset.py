"""subset stage: filter the raw rows and split them into train/val, deterministically and stably.

Reads `subset.*` from params.yaml and `data/raw/`. Writes `data/subset/{train,val}.jsonl` (one selected row each:
where it lives in data/raw, its id, duration, text), `data/subset/dropped.jsonl` (every row not selected, with its
reason) and the DVC metric `metrics/data.json` (rows in, kept and hours per split, dropped per reason).

Stability: a row's id is its source id when the source has one, else a hash of its audio bytes and text. Its side
is decided by a hash of its group (when the source has a group column) or id, so adding rows never moves an existing
row to the other side, and a speaker or recording never straddles train and val. Caps keep the rows with the lowest
hashes, so growing the source only lets a row in ahead of others by chance, never reshuffles what was kept.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from stages import StageError
from stages.audio import AudioDecodeError, Probe, map_clips, probe
from stages.files import atomic_dir, jsonl, write_json_atomic
from stages.log import get_logger
from stages.params import SubsetParams
from stages.text import clean_text, strip_tags

log = get_logger(__name__)

RAW_DIR = Path("data/raw")
SUBSET_DIR = Path("data/subset")
METRICS_FILE = Path("metrics/data.json")
SPLITS = ("train", "val")

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


def _hash01(*parts: str) -> float:
    """A uniform number in [0, 1) from its parts; sha256, so it is the same on every machine and Python run."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def content_id(audio: bytes, text: str) -> str:
    return hashlib.sha256(hashlib.sha256(audio).digest() + text.encode("utf-8")).hexdigest()[:20]


def split_of(key: str, seed: int, val_fraction: float) -> str:
    return "val" if _hash01(str(seed), "split", key) < val_fraction else "train"


def rank_of(row_id: str, seed: int) -> float:
    return _hash01(str(seed), "rank", row_id)


def _inspect(row: dict[str, Any]) -> tuple[str, str | None, Probe | AudioDecodeError | None]:
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
    for shard in sorted(raw_dir.glob("part-*.parquet")):
        rows = pq.read_table(shard).to_pylist()
        for i, (row, (text, content, audio)) in enumerate(zip(rows, map_clips(_inspect, rows), strict=True)):
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


def assign(candidates: list[Candidate], p: SubsetParams) -> tuple[dict[str, list[Candidate]], list[Candidate]]:
    """Split by hash and apply the caps. Returns the kept rows per split (sorted by id) and the rows over a cap."""
    val_fraction = p.val_size / (p.train_size + p.val_size)
    caps = {"train": p.train_size, "val": p.val_size}
    by_split: dict[str, list[Candidate]] = {s: [] for s in SPLITS}
    for c in candidates:
        by_split[split_of(c.group if c.group is not None else c.id, p.seed, val_fraction)].append(c)
    kept: dict[str, list[Candidate]] = {}
    over_cap: list[Candidate] = []
    for split, rows in by_split.items():
        rows.sort(key=lambda c: (rank_of(c.id, p.seed), c.id))
        kept[split] = sorted(rows[: caps[split]], key=lambda c: c.id)
        over_cap.extend(rows[caps[split] :])
    return kept, over_cap


def summarize(rows_in: int, kept: dict[str, list[Candidate]], dropped: list[dict[str, Any]]) -> dict[str, Any]:
    reasons = Counter(d["reason"] for d in dropped)
    return {
        "rows_in": rows_in,
        "kept": {s: len(kept[s]) for s in SPLITS},
        "hours": {s: round(sum(c.duration for c in kept[s]) / 3600, 4) for s in SPLITS},
        "dropped": {r: reasons.get(r, 0) for r in DROP_REASONS},
        "dropped_total": len(dropped),
    }


def run(
    p: SubsetParams, raw_dir: Path = RAW_DIR, out_dir: Path = SUBSET_DIR, metrics_file: Path = METRICS_FILE
) -> dict[str, Any]:
    if not any(raw_dir.glob("part-*.parquet")):
        raise StageError(f"{raw_dir} has no part-*.parquet: run `medasr fetch` (or `dvc repro fetch`) first")
    candidates, dropped, rows_in = screen(raw_dir, p.min_duration, p.max_duration)
    kept, over_cap = assign(candidates, p)
    dropped += [
        {"raw_file": c.raw_file, "raw_row": c.raw_row, "id": c.id, "reason": "over_cap", "detail": ""} for c in over_cap
    ]
    metrics = summarize(rows_in, kept, dropped)
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            (tmp / f"{split}.jsonl").write_text(jsonl(asdict(c) for c in kept[split]), encoding="utf-8")
        (tmp / "dropped.jsonl").write_text(jsonl(dropped), encoding="utf-8")
    write_json_atomic(metrics_file, metrics)
    for split in SPLITS:
        if not kept[split]:
            log.warning("the %s split is empty: the train/eval stages will refuse it", split)
    bad = {r: n for r, n in metrics["dropped"].items() if n and r != "over_cap"}
    log.info(
        "%d rows in: train %d (%.2f h), val %d (%.2f h); dropped %s; over cap %d",
        rows_in,
        metrics["kept"]["train"],
        metrics["hours"]["train"],
        metrics["kept"]["val"],
        metrics["hours"]["val"],
        bad or "none",
        metrics["dropped"]["over_cap"],
    )
    return metrics
