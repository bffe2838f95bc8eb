"""testsets stage: prepare the held-out test sets listed in `eval.test_sets`, each scored by the eval stage.

A test set is read exactly as `fetch.*` reads the training data (hub id or any local layout), screened by the same
filters as subset (`subset.min_duration`/`max_duration`, empty text, bad audio; every drop counted), and written
like the manifest stage writes val (16 kHz mono FLAC, training-target text rules), but whole: no split, no cap
beyond the set's own `max_rows`. A clip that is also in the training or val data (same audio and text, same
source id, or same group, i.e. speaker/recording) is dropped as `overlaps_training`, so a test set pointed at the
training source by mistake cannot report a flattering number. A `long_form: true` set is read as whole recordings
(`medasr.sources.fetch_to`), each with its transcript in time order; the clip-length filters are for clips and do not
apply to it, everything else does.

Writes `data/testsets/<name>/{manifest.json,audio/,dropped.jsonl,source.json}` and the DVC metric
`metrics/testsets.json` (rows in, kept, hours and drops per set, and the rows its source skipped, e.g. paths leading
out of the dataset folder). An empty `eval.test_sets` writes an empty folder.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medasr import StageError
from medasr.clips import build_split
from medasr.files import atomic_dir, jsonl, write_json_atomic
from medasr.log import get_logger
from medasr.params import FetchParams, ManifestParams, SubsetParams, TestSetParams
from medasr.paths import (
    AUDIO_SUBDIR,
    DROPPED,
    SOURCE_INFO,
    SUBSET_DIR,
    TESTSET_MANIFEST,
    TESTSETS_DIR,
    TESTSETS_METRICS,
)
from medasr.raw import load_audio_bytes
from medasr.screening import DROP_REASONS, Candidate, read_subset, screen
from medasr.sources import fetch_to

log = get_logger(__name__)

# subset's reasons minus the ones about splitting, plus the leak guard
TEST_DROP_REASONS = (*(r for r in DROP_REASONS if r != "over_cap"), "overlaps_training")


def training_keys(splits: dict[str, list[dict[str, Any]]]) -> dict[str, set[str]]:
    """Content hashes, ids and groups of every clip in the train and val splits."""
    keys: dict[str, set[str]] = {"content": set(), "id": set(), "group": set()}
    for rows in splits.values():
        for row in rows:
            keys["content"].add(row["content"])
            keys["id"].add(row["id"])
            if row["group"] is not None:
                keys["group"].add(row["group"])
    return keys


def overlap(c: Candidate, seen: dict[str, set[str]]) -> str | None:
    """Why `c` counts as training data, or None."""
    for key, value in (("content", c.content), ("id", c.id), ("group", c.group)):
        if value is not None and value in seen[key]:
            return f"same {key} as a training/val clip: {value}"
    return None


def prepare(
    ts: TestSetParams,
    limits: SubsetParams,
    style: ManifestParams,
    seen: dict[str, set[str]],
    out_dir: Path,
    work: Path,
) -> dict[str, Any]:
    """Fetch, screen and write one test set into `out_dir`; returns its summary for metrics/testsets.json."""
    raw = work / "raw"
    try:
        source = fetch_to(FetchParams(**ts.model_dump(include=set(FetchParams.model_fields))), raw, ts.long_form)
    except StageError as exc:
        raise StageError(f"eval.test_sets[{ts.name}]: {exc}") from None
    lengths = (0.0, math.inf) if ts.long_form else (limits.min_duration, limits.max_duration)
    candidates, dropped, rows_in = screen(raw, *lengths)
    kept = []
    for c in candidates:
        why = overlap(c, seen)
        if why:
            dropped.append(
                {"raw_file": c.raw_file, "raw_row": c.raw_row, "id": c.id, "reason": "overlaps_training", "detail": why}
            )
        else:
            kept.append(c)
    kept.sort(key=lambda c: c.id)
    (out_dir / AUDIO_SUBDIR).mkdir(parents=True)
    rows = [asdict(c) for c in kept]
    text, repairs = build_split(rows, load_audio_bytes(raw, rows), out_dir, style)
    (out_dir / TESTSET_MANIFEST).write_text(text, encoding="utf-8")
    (out_dir / DROPPED).write_text(jsonl(dropped), encoding="utf-8")
    write_json_atomic(out_dir / SOURCE_INFO, source)
    reasons = Counter(d["reason"] for d in dropped)
    bad = {r: n for r, n in reasons.items() if n}
    summary: dict[str, Any] = {
        "rows_in": rows_in,
        "kept": len(kept),
        "hours": round(sum(c.duration for c in kept) / 3600, 4),
        "dropped": {r: reasons.get(r, 0) for r in TEST_DROP_REASONS},
        "resampled": repairs["resampled"],
        "downmixed": repairs["downmixed"],
        "skipped_at_source": source["skipped"],  # rows fetch could not make (bad lines, paths out of the folder)
    }
    if not kept:
        raise StageError(f"eval.test_sets[{ts.name}]: no usable utterance out of {rows_in} rows (dropped: {bad})")
    log.info(
        "test set %s: %d of %d rows (%.2f h); dropped %s; skipped at source %s",
        ts.name,
        len(kept),
        rows_in,
        summary["hours"],
        bad or "none",
        source["skipped"] or "none",
    )
    return summary


def run(
    test_sets: list[TestSetParams],
    limits: SubsetParams,
    style: ManifestParams,
    subset_dir: Path = SUBSET_DIR,
    out_dir: Path = TESTSETS_DIR,
    metrics_file: Path = TESTSETS_METRICS,
) -> dict[str, Any]:
    """`test_sets` is eval.test_sets; `limits` (subset.*) gives the clip-length filters, `style` (manifest.*) the
    transcript rules."""
    seen = training_keys(read_subset(subset_dir))
    summaries: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        for ts in test_sets:
            # the raw shards are only a step on the way: kept beside the output (same disk), removed after; named
            # like medasr.files' temp folders, so `medasr loop sweep` removes what a killed run left
            work = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=f".{ts.name}-raw.", suffix=".tmp"))
            try:
                summaries[ts.name] = prepare(ts, limits, style, seen, tmp / ts.name, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    write_json_atomic(metrics_file, summaries)
    if not summaries:
        log.info("eval.test_sets is empty: eval scores the val split only")
    return summaries
