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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medasr import StageError
from medasr.files import atomic_dir, jsonl, write_json_atomic
from medasr.log import get_logger
from medasr.params import SubsetParams
from medasr.paths import DATA_METRICS, DROPPED, RAW_DIR, SPLITS, SUBSET_DIR, subset_split
from medasr.raw import SHARD_GLOB, shards
from medasr.screening import DROP_REASONS, Candidate, screen

log = get_logger(__name__)


def _hash01(*parts: str) -> float:
    """A uniform number in [0, 1) from its parts; sha256, so it is the same on every machine and Python run."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(key: str, seed: int, val_fraction: float) -> str:
    return "val" if _hash01(str(seed), "split", key) < val_fraction else "train"


def rank_of(row_id: str, seed: int) -> float:
    return _hash01(str(seed), "rank", row_id)


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
    p: SubsetParams, raw_dir: Path = RAW_DIR, out_dir: Path = SUBSET_DIR, metrics_file: Path = DATA_METRICS
) -> dict[str, Any]:
    if not shards(raw_dir):
        raise StageError(f"{raw_dir} has no {SHARD_GLOB}: run `medasr fetch` (or `dvc repro fetch`) first")
    candidates, dropped, rows_in = screen(raw_dir, p.min_duration, p.max_duration)
    kept, over_cap = assign(candidates, p)
    dropped += [
        {"raw_file": c.raw_file, "raw_row": c.raw_row, "id": c.id, "reason": "over_cap", "detail": ""} for c in over_cap
    ]
    metrics = summarize(rows_in, kept, dropped)
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            subset_split(split, tmp).write_text(jsonl(asdict(c) for c in kept[split]), encoding="utf-8")
        (tmp / DROPPED).write_text(jsonl(dropped), encoding="utf-8")
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
