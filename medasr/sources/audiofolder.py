"""An audiofolder (the `datasets` layout): metadata.csv/jsonl whose `file_name` names each audio file, at the root
or in `<split>/` folders. `datasets` parses the metadata; the files are read here, because its own audiofolder
builder re-encodes audio through torchcodec, which we do not install."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medasr.params import FetchParams
from medasr.sources.base import (
    FetchError,
    OutsideDataset,
    audio_bytes,
    check_columns,
    column_row,
    layout_file,
    link_roots,
    refuse,
)

METADATA_NAMES = ("metadata.csv", "metadata.jsonl")


def is_audiofolder(path: Path) -> bool:
    return any(path.glob("metadata.csv")) or any(path.glob("metadata.jsonl")) or any(path.glob("*/metadata.*"))


def metadata_file(folder: Path, split: str) -> Path:
    """The metadata file of an audiofolder: `<folder>/<split>/metadata.*` when split folders exist, else the root's."""
    for base in (folder / split, folder):
        for name in METADATA_NAMES:
            if (base / name).is_file():
                return base / name
    raise FetchError(f"{folder}: no metadata.csv or metadata.jsonl (with a file_name column) for split {split!r}")


def read(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    """The audio column is the file named by `file_name`, relative to the metadata file and inside `location`."""
    import datasets

    root = Path(location)
    links_to = link_roots(root)
    metadata = layout_file(metadata_file(root, p.split), root, links_to)
    folder = metadata.parent.relative_to(root)
    builder = "csv" if metadata.suffix == ".csv" else "json"
    ds = datasets.load_dataset(builder, data_files=str(metadata), split="train")
    if "file_name" not in ds.column_names:
        raise FetchError(f"{metadata} has no file_name column; its columns are {sorted(ds.column_names)}")
    check_columns([*ds.column_names, p.audio_column], p, str(metadata))
    for index, item in enumerate(ds):
        try:
            data, name = audio_bytes(str(folder / str(item["file_name"])), root, links_to)
        except OutsideDataset as exc:
            refuse(skipped, f"{metadata} row {index + 1}", exc)
            continue
        yield column_row(index, item, data, name, p)
