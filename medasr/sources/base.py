"""What every source reader shares: the source's kind and location, the row it yields (the raw shard schema, see
medasr/raw.py), and the helpers that fill it (column checks, the one guard on paths a dataset names, audio bytes from
a cell or file, segment cutting)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import soundfile as sf

from medasr import StageError
from medasr.audio import encode_flac
from medasr.log import get_logger
from medasr.params import FetchParams

log = get_logger(__name__)

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


# The skip reason of a row whose path leads outside its dataset folder (dataset_file): counted, never read.
OUTSIDE_DATASET = "path_outside_dataset"


class OutsideDataset(ValueError):
    """A path a dataset names that would leave the dataset folder."""


def dataset_file(name: str, root: Path, links_to: tuple[Path, ...] = ()) -> Path:
    """`root / name`, the file a dataset row names, when reading it cannot leave the dataset folder `root`: `name`
    is relative, has no `..` part and, every symlink followed, ends inside `root` (or inside one of `links_to`).
    Else raises OutsideDataset: metadata naming `/proc/self/environ` or `../../.env` would copy secrets into
    data/raw, and from there into the DVC cache and remote."""
    path = Path(name)
    if path.is_absolute():
        raise OutsideDataset(f"{name!r} is an absolute path")
    if ".." in path.parts:
        raise OutsideDataset(f"{name!r} climbs out with `..`")
    try:
        real = (root / path).resolve()
        allowed = [r.resolve() for r in (root, *links_to)]
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        raise OutsideDataset(f"{name!r} cannot be resolved ({exc})") from None
    if not any(real.is_relative_to(r) for r in allowed):
        raise OutsideDataset(f"{name!r} is a link leading outside {root} (to {real})")
    return root / path


def refuse(skipped: Counter, where: str, exc: OutsideDataset) -> None:
    """Count a row refused by dataset_file. A manifest of absolute paths would log every line: the first few say
    why, source.json says how many."""
    skipped[OUTSIDE_DATASET] += 1
    level = logging.WARNING if skipped[OUTSIDE_DATASET] <= 5 else logging.DEBUG
    log.log(level, "%s skipped, not read: %s (paths must be relative and stay inside the dataset folder)", where, exc)


def safe_file(name: str, root: Path, links_to: tuple[Path, ...], skipped: Counter, where: str) -> Path | None:
    """dataset_file, with a refused row counted (refuse) as None."""
    try:
        return dataset_file(name, root, links_to)
    except OutsideDataset as exc:
        refuse(skipped, where, exc)
        return None


def layout_file(file: Path, root: Path, links_to: tuple[Path, ...]) -> Path:
    """A file the layout finds under `root` itself (metadata, segment list, parquet), held to dataset_file's rule: a
    cloned dataset's `metadata.csv` may be a link to any file of the machine. Raises FetchError."""
    try:
        return dataset_file(str(file.relative_to(root)), root, links_to)
    except OutsideDataset as exc:
        raise FetchError(f"{root}: {exc}: a dataset's own files must stay inside its folder") from None


def unpacked_dir() -> Path:
    """Where hub.snapshot unpacks hub repos: `<this>/<owner>--<name>/<commit>/`."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "medasr-unpacked"


def link_roots(root: Path) -> tuple[Path, ...]:
    """Where a symlink in the dataset folder `root` may lead besides `root`: hub.snapshot links each non-archive
    file of a repo it unpacks to its blob in the HF cache on purpose (no second copy of GBs), so for such a folder
    that one repo's blobs, and nothing else."""
    from huggingface_hub import constants

    real = root.resolve()
    if real.parent.parent != unpacked_dir().resolve():
        return ()
    return (Path(constants.HF_HUB_CACHE) / f"datasets--{real.parent.name}" / "blobs",)


def audio_bytes(value: Any, root: Path | None, links_to: tuple[Path, ...] = ()) -> tuple[bytes | None, str | None]:
    """Encoded bytes and a display path from an Audio cell ({bytes, path} dict), raw bytes, or a file path. A path
    is only followed inside the dataset folder `root` (dataset_file); a hub dataset has none (`root` None), so its
    rows must carry their bytes. Raises OutsideDataset."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, bytes | bytearray):
        data, path = bytes(value), None
    elif isinstance(value, str):
        data, path = None, value
    else:
        return None, None
    if data is None and path:
        if root is None:
            raise OutsideDataset(f"{path!r}: a hub row without audio bytes (its path is never followed)")
        file = dataset_file(path, root, links_to)
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
