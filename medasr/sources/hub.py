"""Sources read through Hugging Face: a hub dataset (`datasets.load_dataset`, streamed when `fetch.max_rows` is
set), local parquet files (the same reader), and hub repos `load_dataset` cannot read (`fetch.hub_download:
snapshot`: the repo's files downloaded, archives unpacked once per commit, then read as a local layout)."""

from __future__ import annotations

import re
import shutil
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medasr.files import atomic_dir
from medasr.log import get_logger
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
    unpacked_dir,
)

log = get_logger(__name__)


def warn_unpinned(p: FetchParams) -> None:
    if p.revision is None or not re.fullmatch(r"[0-9a-f]{40}", p.revision):
        log.warning("fetch.revision %r is not a commit sha: the hub dataset is not pinned", p.revision)


def _rows(ds: Any, where: str, p: FetchParams, skipped: Counter, root: Path | None) -> Iterator[dict[str, Any]]:
    """The rows of `ds`; a cell without bytes names its file relative to `root` (a hub dataset: None, never read)."""
    import datasets

    columns = list(ds.features) if ds.features is not None else list(next(iter(ds)).keys())
    check_columns(columns, p, where)
    feature = ds.features[p.audio_column] if ds.features is not None else None
    if not (isinstance(feature, datasets.Value) and feature.dtype == "binary"):
        # Read the encoded bytes instead of letting `datasets` decode (which would need torchcodec + FFmpeg).
        ds = ds.cast_column(p.audio_column, datasets.Audio(decode=False))
    links_to = link_roots(root) if root is not None else ()
    for index, item in enumerate(ds):
        try:
            data, name = audio_bytes(item[p.audio_column], root, links_to)
        except OutsideDataset as exc:
            refuse(skipped, f"{where} row {index + 1}", exc)
            continue
        yield column_row(index, item, data, name, p)


def read_hub(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    import datasets  # ~1 s import; only fetching needs it

    warn_unpinned(p)
    try:
        ds = datasets.load_dataset(
            location, name=p.config, revision=p.revision, split=p.split, streaming=p.max_rows is not None
        )
    except (ConnectionError, OSError) as exc:
        raise FetchError(f"could not read hub dataset {location!r} (offline, gated or renamed?): {exc}") from None
    yield from _rows(ds, f"dataset {location!r}", p, skipped, None)


def read_parquet(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    """A parquet file or a folder of them (audio as the `datasets` Audio feature or a plain {bytes, path} struct; a
    path without bytes is relative to the folder)."""
    import datasets

    root = Path(location)
    folder = root if root.is_dir() else root.parent
    links_to = link_roots(folder)
    files = [root] if root.is_file() else [layout_file(f, root, links_to) for f in sorted(root.rglob("*.parquet"))]
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    yield from _rows(ds, f"dataset {location!r}", p, skipped, folder)


def snapshot(p: FetchParams) -> Path:
    """Download the hub repo's files at fetch.revision and unpack its archives once; returns the unpacked folder."""
    from huggingface_hub import snapshot_download

    warn_unpinned(p)
    try:
        downloaded = Path(snapshot_download(p.dataset, repo_type="dataset", revision=p.revision))
    except OSError as exc:  # every huggingface_hub error (offline, not found, gated, bad revision) is an OSError
        raise FetchError(f"could not download hub dataset {p.dataset!r} (offline, gated or renamed?): {exc}") from None
    # the snapshot folder is named by the commit, so a new revision unpacks afresh and an old one is reused
    target = unpacked_dir() / p.dataset.replace("/", "--") / downloaded.name
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            for file in sorted(f for f in downloaded.rglob("*") if f.is_file()):
                _unpack_or_link(file, tmp / file.relative_to(downloaded))
        log.info("unpacked %s@%s into %s", p.dataset, downloaded.name, target)
    return target


def _unpack_or_link(file: Path, dest: Path) -> None:
    """Archives are extracted beside where they sit; other files are linked to the (read-only) HF cache blob
    (base.link_roots lets the readers follow exactly these links out of the folder)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if file.name.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(file) as tar:
            tar.extractall(dest.parent, filter="data")  # refuses absolute paths, `..` and device files
    elif file.suffix == ".zip":
        with zipfile.ZipFile(file) as archive:
            archive.extractall(dest.parent)  # zipfile already strips absolute paths and `..`
    else:
        try:
            dest.symlink_to(file.resolve())
        except OSError:
            shutil.copy2(file, dest)
