"""fetch stage: read the configured dataset and write it to `data/raw/` in one stable on-disk form.

Reads `fetch.*` from params.yaml. The source kind is inferred from `fetch.dataset`:
  - a local `.parquet` file, or a folder of them (audio as the `datasets` Audio feature or a plain {bytes, path} struct)
  - a local audiofolder (audio files + metadata.csv/metadata.jsonl with a `file_name` column)
  - a local NeMo manifest (`.json`/`.jsonl`, one JSON object per line, `audio_filepath` relative to the manifest)
  - a local segment list of long recordings: the Fareez et al. OSCE interviews as published in `yfyeung/medical`
    (`medical_{train,dev,test}.info` beside `audio/*.mp3`; each line `audio/RES0001.mp3[start,end]<TAB>TEXT`).
    Each segment is cut out as its own clip, id `<recording>-<start ms>-<end ms>` (stable, unlike the lhotse
    recipe's `hash()`-based ids) and group = the recording, so an interview never straddles train and val
  - a local folder of long recordings with Praat TextGrid transcripts, as PriMock57 publishes them
    (`transcripts/<name>.TextGrid` beside `audio/<name>.wav`, one interval per utterance). Each non-empty interval
    is cut out as a clip, id `<name>-<start ms>-<end ms>`; group = the name without a trailing `_<tier name>`
    (`day1_consultation01_doctor` -> `day1_consultation01`), so both channels of a consultation stay together
  - otherwise a Hugging Face hub id at `fetch.revision`. `fetch.hub_download: datasets` reads it with
    `datasets.load_dataset` (streamed when `fetch.max_rows` is set); `snapshot` downloads the repo's files
    (huggingface_hub), unpacks its .tar/.tar.gz/.zip archives once into the HF cache, and reads the result as one of
    the local layouts above: the way to use `yfyeung/medical`, which `load_dataset` cannot read
Audio is kept as its original encoded bytes, never decoded here (decoding needs no torchcodec: see stages/audio.py).
Output: `data/raw/part-NNNNN.parquet` (columns below, source order) and `data/raw/source.json` (provenance, counts).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from stages import StageError
from stages.audio import encode_flac
from stages.files import atomic_dir, write_json_atomic
from stages.log import get_logger
from stages.params import FetchParams, Params

log = get_logger(__name__)

RAW_DIR = Path("data/raw")
# Local datasets under this folder are a DVC dependency of the fetch stage, so editing them re-runs the pipeline.
SOURCES_DIR = Path("data/sources")
SHARD_MAX_ROWS = 512
SHARD_MAX_BYTES = 128 * 2**20
# Audio is stored as it came (MP3, FLAC, WAV): zstd gains little on it but costs every later read of the shard
# (subset, manifest and testsets each read it), so only the small columns are compressed.
SHARD_COMPRESSION = {
    "row": "zstd",
    "source_id": "zstd",
    "group": "zstd",
    "audio": "none",
    "source_path": "zstd",
    "text": "zstd",
}

RAW_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),  # position in the source, for tracing a dropped row back
        ("source_id", pa.string()),  # value of fetch.id_column, else null
        ("group", pa.string()),  # value of fetch.group_column, else null
        ("audio", pa.binary()),  # original encoded bytes; null when the source had none (missing file)
        ("source_path", pa.string()),  # the audio's path or name in the source, for humans
        ("text", pa.string()),
    ]
)

SourceKind = Literal["hub", "parquet", "audiofolder", "nemo_manifest", "segment_list", "textgrid"]
# One line of a `medical_<split>.info` file (layout as lhotse's `medical` recipe parses it)
_SEGMENT_LINE = re.compile(r"^(?P<path>[^\t\[]+)\[(?P<start>\d+(?:\.\d+)?),(?P<end>\d+(?:\.\d+)?)\]\t(?P<text>.*)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class FetchError(StageError):
    """The dataset cannot be read as configured (missing path, wrong column, unreachable hub)."""


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    location: str


def resolve_source(dataset: str) -> Source:
    """Decide what `fetch.dataset` names. Local paths win over hub ids, so `data/x` never goes to the network."""
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix == ".parquet":
            return Source("parquet", str(path))
        if path.suffix in {".json", ".jsonl"}:
            return Source("nemo_manifest", str(path))
        raise FetchError(f"fetch.dataset {dataset!r}: a file must be .parquet or a NeMo manifest (.json/.jsonl)")
    if path.is_dir():
        if any(path.glob("metadata.csv")) or any(path.glob("metadata.jsonl")) or any(path.glob("*/metadata.*")):
            return Source("audiofolder", str(path))
        if any(path.glob("medical_*.info")):
            return Source("segment_list", str(path))
        if any(path.rglob("*.TextGrid")):
            return Source("textgrid", str(path))
        if any(path.rglob("*.parquet")):
            return Source("parquet", str(path))
        raise FetchError(
            f"fetch.dataset {dataset!r}: folder holds no parquet files, audiofolder metadata.csv/jsonl, "
            "medical_<split>.info segment list or TextGrid transcripts"
        )
    if _HUB_ID.match(dataset) and not dataset.startswith((".", "~")):
        return Source("hub", dataset)
    raise FetchError(f"fetch.dataset {dataset!r}: no such local path, and not a hub id of the form owner/name")


def source_problems(p: Params) -> list[str]:
    """Every configured dataset (fetch.dataset, each eval.test_sets entry) that is neither a hub id nor an existing
    local source. Checked before the first download, so a typo in a test set's path never costs a training run."""
    datasets = [("fetch.dataset", p.fetch.dataset)] + [
        (f"eval.test_sets[{t.name}]", t.dataset) for t in p.eval.test_sets
    ]
    problems = []
    for key, dataset in datasets:
        try:
            resolve_source(dataset)
        except FetchError as exc:
            problems.append(f"{key}: {exc}")
    return problems


def _open_with_datasets(source: Source, p: FetchParams) -> Any:
    """A `datasets` Dataset (or IterableDataset for streamed hub reads) of the configured split: hub or parquet."""
    import datasets  # ~1 s import; only this stage needs it

    if source.kind == "hub":
        _warn_unpinned(p)
        try:
            return datasets.load_dataset(
                source.location, name=p.config, revision=p.revision, split=p.split, streaming=p.max_rows is not None
            )
        except (ConnectionError, OSError) as exc:
            raise FetchError(
                f"could not read hub dataset {source.location!r} (offline, gated or renamed?): {exc}"
            ) from None
    if source.kind == "parquet":
        root = Path(source.location)
        files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    raise ValueError(f"not a datasets-readable source: {source}")


def _check_columns(columns: list[str], p: FetchParams, where: str) -> None:
    wanted = {
        "fetch.audio_column": p.audio_column,
        "fetch.text_column": p.text_column,
        "fetch.id_column": p.id_column,
        "fetch.group_column": p.group_column,
    }
    missing = [f"{key}={col!r}" for key, col in wanted.items() if col is not None and col not in columns]
    if missing:
        raise FetchError(f"{where} has no column {', '.join(missing)}; its columns are {sorted(columns)}")


def _audio_bytes(value: Any, base: Path | None = None) -> tuple[bytes | None, str | None]:
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


def iter_dataset_rows(source: Source, p: FetchParams) -> Iterator[dict[str, Any]]:
    import datasets

    ds = _open_with_datasets(source, p)
    columns = list(ds.features) if ds.features is not None else list(next(iter(ds)).keys())
    _check_columns(columns, p, f"dataset {source.location!r}")
    feature = ds.features[p.audio_column] if ds.features is not None else None
    if not (isinstance(feature, datasets.Value) and feature.dtype == "binary"):
        # Read the encoded bytes instead of letting `datasets` decode (which would need torchcodec + FFmpeg).
        ds = ds.cast_column(p.audio_column, datasets.Audio(decode=False))
    for index, item in enumerate(ds):
        data, name = _audio_bytes(item[p.audio_column])
        yield _raw_row(index, item, data, name, p)


def audiofolder_metadata(folder: Path, split: str) -> Path:
    """The metadata file of an audiofolder: `<folder>/<split>/metadata.*` when split folders exist, else the root's."""
    for base in (folder / split, folder):
        for name in ("metadata.csv", "metadata.jsonl"):
            if (base / name).is_file():
                return base / name
    raise FetchError(f"{folder}: no metadata.csv or metadata.jsonl (with a file_name column) for split {split!r}")


def iter_audiofolder_rows(source: Source, p: FetchParams) -> Iterator[dict[str, Any]]:
    """An audiofolder (the `datasets` layout): metadata.csv/jsonl whose `file_name` names each audio file.

    `datasets` parses the metadata; the files are read here because its own audiofolder builder re-encodes audio
    through torchcodec, which we do not install. The audio column is the file named by `file_name`.
    """
    import datasets

    metadata = audiofolder_metadata(Path(source.location), p.split)
    builder = "csv" if metadata.suffix == ".csv" else "json"
    ds = datasets.load_dataset(builder, data_files=str(metadata), split="train")
    if "file_name" not in ds.column_names:
        raise FetchError(f"{metadata} has no file_name column; its columns are {sorted(ds.column_names)}")
    _check_columns([*ds.column_names, p.audio_column], p, str(metadata))
    for index, item in enumerate(ds):
        data, name = _audio_bytes(str(item["file_name"]), base=metadata.parent)
        yield _raw_row(index, item, data, name, p)


def iter_manifest_rows(source: Source, p: FetchParams, skipped: dict[str, int]) -> Iterator[dict[str, Any]]:
    """NeMo manifest: `audio_filepath` (relative to the manifest), the text column, optional offset + duration."""
    manifest = Path(source.location)
    index = 0
    for line_no, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict) or not isinstance(item.get("audio_filepath"), str):
                raise ValueError("no audio_filepath")
        except ValueError as exc:
            skipped["malformed_manifest_line"] = skipped.get("malformed_manifest_line", 0) + 1
            log.warning("%s:%d skipped, not a manifest row (%s)", manifest, line_no, exc)
            continue
        if index == 0:
            _check_columns([*item, p.audio_column], p, f"manifest {manifest}")  # audio key is always audio_filepath
        file = Path(item["audio_filepath"])
        file = file if file.is_absolute() else manifest.parent / file
        if "offset" in item and file.is_file():
            data: bytes | None = _cut_segment(file, float(item["offset"]), item.get("duration"))
        else:
            data = file.read_bytes() if file.is_file() else None
        yield _raw_row(index, item, data, file.name, p)
        index += 1


def iter_segment_rows(source: Source, p: FetchParams, skipped: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Segment list (`medical_<fetch.split>.info`): one clip per well-formed line; malformed lines are counted."""
    info = Path(source.location) / f"medical_{p.split}.info"
    if not info.is_file():
        found = sorted(f.name for f in Path(source.location).glob("medical_*.info"))
        raise FetchError(f"{info} not found (fetch.split={p.split!r}); segment lists here: {found}")
    index = 0
    for line_no, line in enumerate(info.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = _SEGMENT_LINE.match(line.rstrip("\r"))
        start, end = (float(m["start"]), float(m["end"])) if m else (0.0, 0.0)
        if m is None or end <= start:
            skipped["malformed_segment_line"] = skipped.get("malformed_segment_line", 0) + 1
            log.warning("%s:%d skipped, not `path[start,end]<TAB>text`: %r", info, line_no, line[:120])
            continue
        file = Path(source.location) / m["path"]
        recording = Path(m["path"]).stem
        data = _cut_segment(file, start, end - start) if file.is_file() else None
        yield {
            "row": index,
            "source_id": f"{recording}-{round(start * 1000):08d}-{round(end * 1000):08d}",
            "group": recording,
            "audio": data,
            "source_path": f"{m['path']}[{m['start']},{m['end']}]",
            "text": m["text"],
        }
        index += 1


AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


def iter_textgrid_rows(source: Source, skipped: dict[str, int]) -> Iterator[dict[str, Any]]:
    """TextGrid transcripts (any depth) matched by file name to audio files (any depth): one clip per labelled
    interval. Unreadable TextGrids and audio without a transcript are counted; a missing recording reaches subset
    as missing audio."""
    from praatio import textgrid
    from praatio.utilities.errors import PraatioException

    root = Path(source.location)
    audio = {f.stem: f for f in sorted(root.rglob("*")) if f.suffix.lower() in AUDIO_SUFFIXES and f.is_file()}
    grids = sorted(root.rglob("*.TextGrid"))
    untranscribed = len(audio.keys() - {g.stem for g in grids})
    if untranscribed:
        skipped["audio_without_transcript"] = untranscribed
        log.warning("%d audio file(s) under %s have no TextGrid of the same name", untranscribed, root)
    index = 0
    for grid in grids:
        try:
            tg = textgrid.openTextgrid(str(grid), includeEmptyIntervals=False)
        except (PraatioException, ValueError, IndexError, UnicodeError) as exc:
            skipped["malformed_textgrid"] = skipped.get("malformed_textgrid", 0) + 1
            log.warning("%s skipped, not a readable TextGrid: %s", grid, exc)
            continue
        file = audio.get(grid.stem)
        # point tiers (TextTier) mark instants, not utterances: nothing to cut
        tiers = [t for t in map(tg.getTier, tg.tierNames) if isinstance(t, textgrid.IntervalTier)]
        for tier in tiers:
            # PriMock57 names a channel's file `<consultation>_<speaker>` and its only tier `<Speaker>`
            suffix = f"_{tier.name.lower()}"
            group = grid.stem[: -len(suffix)] if grid.stem.lower().endswith(suffix) else grid.stem
            prefix = grid.stem if len(tiers) == 1 else f"{grid.stem}-{tier.name}"
            for start, end, label in tier.entries:
                if not label.strip():
                    continue
                yield {
                    "row": index,
                    "source_id": f"{prefix}-{round(start * 1000):08d}-{round(end * 1000):08d}",
                    "group": group,
                    "audio": _cut_segment(file, start, end - start) if file else None,
                    "source_path": f"{grid.relative_to(root)}[{start:.3f},{end:.3f}]",
                    "text": label,
                }
                index += 1


def _warn_unpinned(p: FetchParams) -> None:
    if p.revision is None or not re.fullmatch(r"[0-9a-f]{40}", p.revision):
        log.warning("fetch.revision %r is not a commit sha: the hub dataset is not pinned", p.revision)


def hub_snapshot(p: FetchParams) -> Path:
    """Download the hub repo's files at fetch.revision and unpack its archives once; returns the unpacked folder."""
    from huggingface_hub import constants, snapshot_download

    _warn_unpinned(p)
    try:
        snapshot = Path(snapshot_download(p.dataset, repo_type="dataset", revision=p.revision))
    except OSError as exc:  # every huggingface_hub error (offline, not found, gated, bad revision) is an OSError
        raise FetchError(f"could not download hub dataset {p.dataset!r} (offline, gated or renamed?): {exc}") from None
    # the snapshot folder is named by the commit, so a new revision unpacks afresh and an old one is reused
    target = Path(constants.HF_HOME) / "medasr-unpacked" / p.dataset.replace("/", "--") / snapshot.name
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            for file in sorted(f for f in snapshot.rglob("*") if f.is_file()):
                _unpack_or_link(file, tmp / file.relative_to(snapshot))
        log.info("unpacked %s@%s into %s", p.dataset, snapshot.name, target)
    return target


def _unpack_or_link(file: Path, dest: Path) -> None:
    """Archives are extracted beside where they sit; other files are linked to the (read-only) HF cache blob."""
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


def _cut_segment(file: Path, offset: float, duration: float | None) -> bytes | None:
    """One [offset, offset+duration] segment of a long recording, re-encoded losslessly as FLAC."""
    try:
        with sf.SoundFile(file) as f:
            f.seek(min(round(offset * f.samplerate), f.frames))
            frames = -1 if duration is None else round(float(duration) * f.samplerate)
            return encode_flac(f.read(frames, dtype="float32", always_2d=True), f.samplerate)
    except (sf.LibsndfileError, RuntimeError, ValueError):
        return None  # unreadable: the subset stage counts it as undecodable


def _raw_row(index: int, item: dict[str, Any], data: bytes | None, name: str | None, p: FetchParams) -> dict[str, Any]:
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


def write_shards(rows: Iterator[dict[str, Any]], out_dir: Path) -> int:
    """Write rows as size-bounded parquet shards in source order; returns the row count."""
    count, shard, batch_bytes = 0, 0, 0
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal shard, batch, batch_bytes
        table = pa.Table.from_pylist(batch, schema=RAW_SCHEMA)
        pq.write_table(table, out_dir / f"part-{shard:05d}.parquet", compression=SHARD_COMPRESSION)
        shard, batch, batch_bytes = shard + 1, [], 0

    for row in rows:
        batch.append(row)
        batch_bytes += len(row["audio"] or b"")
        count += 1
        if len(batch) >= SHARD_MAX_ROWS or batch_bytes >= SHARD_MAX_BYTES:
            flush()
    if batch or shard == 0:
        flush()
    return count


def run(p: FetchParams, out_dir: Path = RAW_DIR) -> dict[str, Any]:
    source = resolve_source(p.dataset)
    snapshot = source.kind == "hub" and p.hub_download == "snapshot"
    if snapshot:
        source = resolve_source(str(hub_snapshot(p)))  # an existing folder: always a local layout, or an error
    elif source.kind != "hub":
        ignored = [k for k in ("revision", "config") if getattr(p, k) is not None]
        if ignored:
            log.info("local dataset: fetch.%s ignored (hub-only keys)", ", fetch.".join(ignored))
        if not Path(source.location).resolve().is_relative_to(SOURCES_DIR.resolve()):
            log.warning(
                "%s is outside %s/: DVC does not see changes to it; run `dvc repro -f fetch` after editing it",
                source.location,
                SOURCES_DIR,
            )
    log.info("fetching %s (%s)", source.location, source.kind)
    skipped: dict[str, int] = {}
    if source.kind == "nemo_manifest":
        rows = iter_manifest_rows(source, p, skipped)
    elif source.kind == "segment_list":
        rows = iter_segment_rows(source, p, skipped)
    elif source.kind == "textgrid":
        rows = iter_textgrid_rows(source, skipped)
    elif source.kind == "audiofolder":
        rows = iter_audiofolder_rows(source, p)
    else:
        rows = iter_dataset_rows(source, p)
    with atomic_dir(out_dir) as tmp:
        # the cap stops every source lazily: nothing past it is read, parsed or counted as skipped
        count = write_shards(itertools.islice(rows, p.max_rows), tmp)
        info = {
            "dataset": p.dataset,
            "kind": source.kind,
            "hub_snapshot": source.location if snapshot else None,
            "revision": p.revision if source.kind == "hub" or snapshot else None,
            "config": p.config if source.kind == "hub" else None,
            "split": p.split if source.kind in ("hub", "segment_list") else None,
            "rows": count,
            "skipped": skipped,
        }
        write_json_atomic(tmp / "source.json", info)
    log.info("wrote %d rows to %s%s", count, out_dir, f" (skipped {skipped})" if skipped else "")
    return info
