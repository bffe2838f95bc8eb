"""What every source reader shares: the source's kind and location, the row it yields (the raw shard schema, see
medasr/raw.py), and the helpers that fill it (column checks, audio bytes from a cell or file, segment cutting)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import soundfile as sf

from medasr import StageError
from medasr.audio import encode_flac
from medasr.params import FetchParams

SourceKind = Literal["hub", "parquet", "audiofolder", "nemo_manifest", "segment_list", "textgrid"]

# A reader: (location, fetch params, skip counter) -> raw rows in source order. Rows it cannot make (a malformed
# line, an unreadable transcript file) are counted in `skipped` by reason, never dropped silently.
Reader = Callable[[str, FetchParams, Counter], Iterator[dict[str, Any]]]


class FetchError(StageError):
    """The dataset cannot be read as configured (missing path, wrong column, unreachable hub)."""


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    location: str


def check_columns(columns: list[str], p: FetchParams, where: str) -> None:
    wanted = {
        "fetch.audio_column": p.audio_column,
        "fetch.text_column": p.text_column,
        "fetch.id_column": p.id_column,
        "fetch.group_column": p.group_column,
    }
    missing = [f"{key}={col!r}" for key, col in wanted.items() if col is not None and col not in columns]
    if missing:
        raise FetchError(f"{where} has no column {', '.join(missing)}; its columns are {sorted(columns)}")


def audio_bytes(value: Any, base: Path | None = None) -> tuple[bytes | None, str | None]:
    """Encoded bytes and a display path from an Audio cell ({bytes, path} dict), raw bytes, or a file path."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, bytes | bytearray):
        data, path = bytes(value), None
    elif isinstance(value, str):
        data, path = None, value
    else:
        return None, None
    if data is None and path:
        file = Path(path) if base is None or Path(path).is_absolute() else base / path
        data = file.read_bytes() if file.is_file() else None
    return data, (Path(path).name if path else None)


def cut_segment(file: Path, offset: float, duration: float | None) -> bytes | None:
    """One [offset, offset+duration] segment of a long recording, re-encoded losslessly as FLAC."""
    try:
        with sf.SoundFile(file) as f:
            f.seek(min(round(offset * f.samplerate), f.frames))
            frames = -1 if duration is None else round(float(duration) * f.samplerate)
            return encode_flac(f.read(frames, dtype="float32", always_2d=True), f.samplerate)
    except (sf.LibsndfileError, RuntimeError, ValueError):
        return None  # unreadable: the subset stage counts it as undecodable


def clip_id(recording: str, start: float, end: float) -> str:
    """A clip cut from a long recording: `<recording>-<start ms>-<end ms>`, stable across runs and machines."""
    return f"{recording}-{round(start * 1000):08d}-{round(end * 1000):08d}"


def column_row(
    index: int, item: dict[str, Any], data: bytes | None, name: str | None, p: FetchParams
) -> dict[str, Any]:
    """A raw row from a source with columns (hub, parquet, audiofolder metadata, manifest lines)."""

    def optional_str(column: str | None) -> str | None:
        value = item.get(column) if column else None
        return None if value is None else str(value)

    text = item.get(p.text_column)
    return {
        "row": index,
        "source_id": optional_str(p.id_column),
        "group": optional_str(p.group_column),
        "audio": data,
        "source_path": name,
        "text": None if text is None else str(text),
    }
