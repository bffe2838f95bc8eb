"""manifest stage: turn the selected rows into 16 kHz mono audio and NeMo JSON manifests.

Reads `manifest.*` from params.yaml, `data/subset/{train,val}.jsonl` and the audio bytes in `data/raw/`. Writes
`data/manifests/audio/<id>.flac` and `data/manifests/{train,val}.json`: one JSON object per line with
`audio_filepath`, `duration`, `text`, `id`. `audio_filepath` is relative to the manifest's own folder (how NeMo
resolves relative paths), so the folder stays valid wherever the repo is cloned. The manifests are named `.json`
because NeMo's data layer treats `.jsonl` files as lhotse cut sets.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from stages import StageError
from stages.audio import TARGET_SAMPLE_RATE, decode, map_clips, to_model_input, write_flac
from stages.files import atomic_dir, jsonl, read_jsonl
from stages.log import get_logger
from stages.params import ManifestParams
from stages.subset import SPLITS
from stages.text import training_text

log = get_logger(__name__)

RAW_DIR = Path("data/raw")
SUBSET_DIR = Path("data/subset")
MANIFEST_DIR = Path("data/manifests")
AUDIO_SUBDIR = "audio"


def audio_name(row_id: str) -> str:
    """A file name that is safe on any filesystem and unique per id, yet still recognisable."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", row_id)[:48].strip("._") or "clip"
    return f"{readable}-{hashlib.sha256(row_id.encode('utf-8')).hexdigest()[:8]}.flac"


def load_raw_audio(raw_dir: Path, rows: list[dict[str, Any]]) -> dict[tuple[str, int], bytes]:
    """The encoded bytes of the selected rows, reading each raw shard once."""
    wanted: dict[str, set[int]] = {}
    for r in rows:
        wanted.setdefault(r["raw_file"], set()).add(r["raw_row"])
    out: dict[tuple[str, int], bytes] = {}
    for name, indices in wanted.items():
        column = pq.read_table(raw_dir / name, columns=["audio"]).column("audio")
        for i in indices:
            out[(name, i)] = column[i].as_py()
    return out


def write_model_audio(data: bytes, path: Path) -> tuple[float, bool, bool]:
    """Decode one clip, downmix and resample it to 16 kHz mono, write it as FLAC; returns (seconds, resampled,
    downmixed). Written straight to the file: libsndfile then encodes without calling back into Python."""
    audio = decode(data)
    samples = to_model_input(audio)
    write_flac(path, samples, TARGET_SAMPLE_RATE)
    return len(samples) / TARGET_SAMPLE_RATE, audio.sample_rate != TARGET_SAMPLE_RATE, audio.channels > 1


def build_split(
    rows: list[dict[str, Any]], audio_bytes: dict[tuple[str, int], bytes], out_dir: Path, p: ManifestParams
) -> tuple[str, Counter]:
    """Write the audio files of one split from the raw bytes (load_raw_audio; taken out of it), on
    all cores; return its manifest text and counts of the repairs made."""
    relative = [f"{AUDIO_SUBDIR}/{audio_name(r['id'])}" for r in rows]
    jobs = [
        (audio_bytes.pop((r["raw_file"], r["raw_row"])), out_dir / rel) for r, rel in zip(rows, relative, strict=True)
    ]
    written = list(map_clips(lambda job: write_model_audio(*job), jobs))
    del jobs
    repairs: Counter = Counter()
    lines = []
    for r, rel, (seconds, resampled, downmixed) in zip(rows, relative, written, strict=True):
        repairs["resampled"] += resampled
        repairs["downmixed"] += downmixed
        lines.append(
            {
                "audio_filepath": rel,
                "duration": round(seconds, 6),
                "text": training_text(r["text"], p.text_normalization, p.annotation_tags, p.all_caps),
                "id": r["id"],
            }
        )
    return jsonl(lines), repairs


def run(
    p: ManifestParams, raw_dir: Path = RAW_DIR, subset_dir: Path = SUBSET_DIR, out_dir: Path = MANIFEST_DIR
) -> None:
    missing = [f"{subset_dir}/{s}.jsonl" for s in SPLITS if not (subset_dir / f"{s}.jsonl").is_file()]
    if missing:
        raise StageError(f"missing {', '.join(missing)}: run `medasr subset` (or `dvc repro subset`) first")
    splits = {s: read_jsonl(subset_dir / f"{s}.jsonl") for s in SPLITS}
    audio_bytes = load_raw_audio(raw_dir, [r for rows in splits.values() for r in rows])  # one read per shard
    with atomic_dir(out_dir) as tmp:
        (tmp / AUDIO_SUBDIR).mkdir()
        for split, rows in splits.items():
            text, repairs = build_split(rows, audio_bytes, tmp, p)
            (tmp / f"{split}.json").write_text(text, encoding="utf-8")
            log.info(
                "%s: %d clips -> %s (resampled %d, downmixed %d)",
                split,
                len(rows),
                out_dir / f"{split}.json",
                repairs["resampled"],
                repairs["downmixed"],
            )
