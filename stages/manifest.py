"""manifest stage: turn the selected rows into 16 kHz mono audio and NeMo JSON manifests.

Reads `manifest.*` from params.yaml, `data/subset/{train,val}.jsonl` and the audio bytes in `data/raw/`. Writes
`data/manifests/audio/<id>.flac` and `data/manifests/{train,val}.json`: one JSON object per line with
`audio_filepath`, `duration`, `text`, `id`. `audio_filepath` is relative to the manifest's own folder (how NeMo
resolves relative paths), so the folder stays valid wherever the repo is cloned. The manifests are named `.json`
because NeMo's data layer treats `.jsonl` files as lhotse cut sets.
"""

from __future__ import annotations

from pathlib import Path

from medasr.clips import build_split
from medasr.files import atomic_dir
from medasr.log import get_logger
from medasr.params import ManifestParams
from medasr.paths import AUDIO_SUBDIR, MANIFEST_DIR, RAW_DIR, SUBSET_DIR, split_manifest
from medasr.raw import load_audio_bytes
from medasr.screening import read_subset

log = get_logger(__name__)


def run(
    p: ManifestParams, raw_dir: Path = RAW_DIR, subset_dir: Path = SUBSET_DIR, out_dir: Path = MANIFEST_DIR
) -> None:
    splits = read_subset(subset_dir)
    audio_bytes = load_audio_bytes(raw_dir, [r for rows in splits.values() for r in rows])  # one read per shard
    with atomic_dir(out_dir) as tmp:
        (tmp / AUDIO_SUBDIR).mkdir()
        for split, rows in splits.items():
            text, repairs = build_split(rows, audio_bytes, tmp, p)
            split_manifest(split, tmp).write_text(text, encoding="utf-8")
            log.info(
                "%s: %d clips -> %s (resampled %d, downmixed %d)",
                split,
                len(rows),
                split_manifest(split, out_dir),
                repairs["resampled"],
                repairs["downmixed"],
            )
