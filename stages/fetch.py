"""fetch stage: read the configured dataset and write it to `data/raw/` in one stable on-disk form.

Reads `fetch.*` from params.yaml. The layout is inferred from `fetch.dataset` (medasr/sources/: hub id, local
parquet, audiofolder, NeMo manifest, OSCE segment list, PriMock57-style TextGrid folder; `fetch.hub_download:
snapshot` reads a hub repo's files as one of the local layouts). Audio is kept as its original encoded bytes, never
decoded here. Output: `data/raw/part-NNNNN.parquet` (medasr/raw.py) and `data/raw/source.json` (provenance, counts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medasr.log import get_logger
from medasr.params import FetchParams
from medasr.paths import RAW_DIR, SOURCES_DIR
from medasr.sources import fetch_to, resolve

log = get_logger(__name__)


def run(p: FetchParams, out_dir: Path = RAW_DIR) -> dict[str, Any]:
    source = resolve(p.dataset)
    if source.kind != "hub" and not Path(source.location).resolve().is_relative_to(SOURCES_DIR.resolve()):
        # dvc.yaml makes data/sources a dependency of this stage; nothing else is watched
        log.warning(
            "%s is outside %s/: DVC does not see changes to it; run `dvc repro -f fetch` after editing it",
            source.location,
            SOURCES_DIR,
        )
    return fetch_to(p, out_dir)
