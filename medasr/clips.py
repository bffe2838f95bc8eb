"""Model-ready clips: 16 kHz mono FLAC files and the NeMo manifest lines that name them, written the same way for
the train/val manifests (manifest stage) and each test set (testsets stage).

A manifest line holds `audio_filepath`, `duration`, `text`, `id`. `audio_filepath` is relative to the manifest's own
folder (how NeMo resolves relative paths), so the folder stays valid wherever the repo is cloned.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any

from medasr.audio import TARGET_SAMPLE_RATE, decode, map_clips, to_model_input, write_flac
from medasr.files import jsonl
from medasr.params import ManifestParams
from medasr.paths import AUDIO_SUBDIR
from medasr.text import training_text

# PriMock57's channel files are `<consultation>_<doctor|patient>`; a TextGrid with several tiers names a tier's clips
# `<file>-<tier>`, and a clip adds `-<start ms>-<end ms>`. Anchored at the end: a role word anywhere else in a name
# (`patient-0001`, `doctor-visit-03`) says nothing about who speaks.
_ROLE = re.compile(r".*?(?:_(doctor|patient))?(?:-(doctor|patient))?(?:-\d{8}-\d{8})?", re.IGNORECASE | re.DOTALL)


def speaker_role(clip_id: str) -> str | None:
    """Which side of a consultation speaks, where the id says so: "doctor" or "patient" for
    `day1_consultation01_doctor`, `day1_consultation01_doctor-00000600-00003179` or `visit-Patient-00002000-00003000`
    (the tier wins over the file name); else None."""
    m = _ROLE.fullmatch(clip_id)
    role = m and (m[2] or m[1])
    return role.lower() if role else None


def audio_name(row_id: str) -> str:
    """A file name that is safe on any filesystem and unique per id, yet still recognisable."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", row_id)[:48].strip("._") or "clip"
    return f"{readable}-{hashlib.sha256(row_id.encode('utf-8')).hexdigest()[:8]}.flac"


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
    """Write the audio files of one split from the raw bytes (medasr.raw.load_audio_bytes; taken out of it), on
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
