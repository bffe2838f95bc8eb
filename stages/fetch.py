"""fetch stage: read the configured dataset and write it to `data/raw/` in one stable on-disk form.

Reads `fetch.*` from params.yaml. The layout is inferred from `fetch.dataset` (medasr/sources/: hub id, local
parquet, audiofolder, NeMo manifest, OSCE segment list, PriMock57-style TextGrid folder; `fetch.hub_download:
snapshot` reads a hub repo's files as one of the local layouts). Audio is kept as its original encoded bytes, never
decoded here. A file a row names is read only when its path is relative, has no `..` and stays inside the dataset
folder, links followed; other rows are counted as `path_outside_dataset`, and a source with no readable row fails.
Output: `data/raw/part-NNNNN.parquet` (medasr/raw.py) and `data/raw/source.json` (provenance, counts).
The testsets stage reads each test set the same way (`medasr.sources.fetch_to`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medasr.params import FetchParams
from medasr.paths import RAW_DIR
from medasr.sources import fetch_to


def run(p: FetchParams, out_dir: Path = RAW_DIR) -> dict[str, Any]:
    return fetch_to(p, out_dir)
