"""The raw shard format: what fetch writes to `data/raw/` (and testsets to its own work folder) and subset, manifest
and testsets read back. Rows keep the source's order and its original encoded audio bytes (never decoded here)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_GLOB = "part-*.parquet"
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
        ("source_id", pa.string()),  # value of fetch.id_column (or the layout's clip id), else null
        ("group", pa.string()),  # value of fetch.group_column (or the layout's recording), else null
        ("audio", pa.binary()),  # original encoded bytes; null when the source had none (missing file)
        ("source_path", pa.string()),  # the audio's path or name in the source, for humans
        ("text", pa.string()),
    ]
)


def shards(raw_dir: Path) -> list[Path]:
    return sorted(raw_dir.glob(SHARD_GLOB))


def write_shards(rows: Iterable[dict[str, Any]], out_dir: Path) -> int:
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


def load_audio_bytes(raw_dir: Path, rows: list[dict[str, Any]]) -> dict[tuple[str, int], bytes]:
    """The encoded bytes of the selected rows (their `raw_file`, `raw_row`), reading each raw shard once."""
    wanted: dict[str, set[int]] = {}
    for r in rows:
        wanted.setdefault(r["raw_file"], set()).add(r["raw_row"])
    out: dict[tuple[str, int], bytes] = {}
    for name, indices in wanted.items():
        column = pq.read_table(raw_dir / name, columns=["audio"]).column("audio")
        for i in indices:
            out[(name, i)] = column[i].as_py()
    return out
