"""A NeMo manifest (`.json`/`.jsonl`, one JSON object per line): `audio_filepath` relative to the manifest and
inside its folder, the text column, optional `offset` + `duration` segments of a longer file. Lines that are not
rows, and paths that are absolute or lead out of the folder, are counted."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medasr.log import get_logger
from medasr.params import FetchParams
from medasr.sources.base import check_columns, column_row, cut_segment, link_roots, safe_file

log = get_logger(__name__)


def read(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    manifest = Path(location)
    links_to = link_roots(manifest.parent)
    index = 0
    for line_no, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict) or not isinstance(item.get("audio_filepath"), str):
                raise ValueError("no audio_filepath")
        except ValueError as exc:
            skipped["malformed_manifest_line"] += 1
            log.warning("%s:%d skipped, not a manifest row (%s)", manifest, line_no, exc)
            continue
        if index == 0:
            check_columns([*item, p.audio_column], p, f"manifest {manifest}")  # audio key is always audio_filepath
        file = safe_file(item["audio_filepath"], manifest.parent, links_to, skipped, f"{manifest}:{line_no}")
        if file is None:
            continue
        if "offset" in item and file.is_file():
            data: bytes | None = cut_segment(file, float(item["offset"]), item.get("duration"))
        else:
            data = file.read_bytes() if file.is_file() else None
        yield column_row(index, item, data, file.name, p)
        index += 1
