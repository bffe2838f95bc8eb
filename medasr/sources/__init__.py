"""The dataset layouts fetch (and each test set) can read, one module per layout, each a `Reader` (base.py):
`read(location, fetch params, skip counter)` yielding raw rows in source order.

`resolve` infers the layout from `fetch.dataset`: a local `.parquet` file or folder, an audiofolder, a NeMo
manifest, an OSCE segment list, a PriMock57-style TextGrid folder, or else a Hugging Face hub id. `fetch_to` reads
one source whole into raw shards (medasr/raw.py) plus `source.json`, atomically; long-form, the layouts that cut
clips out of long recordings (segment list, TextGrid) yield the whole recordings instead, each with its transcript
in time order, and the others their rows as they are (each row already a recording). Every file a row names goes through
`base.dataset_file` first: a path that is absolute, has `..` or leads out of the dataset folder through a link is
counted (`path_outside_dataset`) and never read.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path
from typing import Any

from medasr.files import atomic_dir, write_json_atomic
from medasr.log import get_logger
from medasr.params import FetchParams
from medasr.paths import SOURCE_INFO, SOURCES_DIR
from medasr.raw import write_shards
from medasr.sources import audiofolder, hub, nemo_manifest, segment_list, textgrid
from medasr.sources.base import FetchError, Reader, Source

log = get_logger(__name__)

READERS: dict[str, Reader] = {
    "hub": hub.read_hub,
    "parquet": hub.read_parquet,
    "audiofolder": audiofolder.read,
    "nemo_manifest": nemo_manifest.read,
    "segment_list": segment_list.read,
    "textgrid": textgrid.read,
}
LONG_FORM_READERS: dict[str, Reader] = {
    "segment_list": segment_list.read_recordings,
    "textgrid": textgrid.read_recordings,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve(dataset: str) -> Source:
    """Decide what `fetch.dataset` names. Local paths win over hub ids, so `data/x` never goes to the network."""
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix == ".parquet":
            return Source("parquet", str(path))
        if path.suffix in {".json", ".jsonl"}:
            return Source("nemo_manifest", str(path))
        raise FetchError(f"fetch.dataset {dataset!r}: a file must be .parquet or a NeMo manifest (.json/.jsonl)")
    if path.is_dir():
        if audiofolder.is_audiofolder(path):
            return Source("audiofolder", str(path))
        if segment_list.is_segment_list(path):
            return Source("segment_list", str(path))
        if textgrid.has_textgrids(path):
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


def problems(datasets: list[tuple[str, str]]) -> list[str]:
    """Each (key, dataset) that is neither a hub id nor an existing local source, as `key: why`. Checked before the
    first download, so a typo in a test set's path never costs a training run."""
    found = []
    for key, dataset in datasets:
        try:
            resolve(dataset)
        except FetchError as exc:
            found.append(f"{key}: {exc}")
    return found


def fetch_to(p: FetchParams, out_dir: Path, long_form: bool = False) -> dict[str, Any]:
    """Read the source `p` names into raw shards + source.json in `out_dir` (replaced whole, or left as it was);
    `long_form`: whole recordings, not the clips cut out of them."""
    source = resolve(p.dataset)
    snapshot = source.kind == "hub" and p.hub_download == "snapshot"
    if snapshot:
        source = resolve(str(hub.snapshot(p)))  # an existing folder: always a local layout, or an error
    elif source.kind != "hub":
        ignored = [k for k in ("revision", "config") if getattr(p, k) is not None]
        if ignored:
            log.info("local dataset: fetch.%s ignored (hub-only keys)", ", fetch.".join(ignored))
        if not Path(source.location).resolve().is_relative_to(SOURCES_DIR.resolve()):
            # dvc.yaml makes data/sources a dependency of fetch and testsets; nothing else is watched
            log.warning(
                "%s is outside %s/: DVC does not see changes to it; run `dvc repro -f fetch` after editing it",
                source.location,
                SOURCES_DIR,
            )
    log.info("fetching %s (%s)", source.location, source.kind)
    skipped: Counter = Counter()
    reader = LONG_FORM_READERS.get(source.kind, READERS[source.kind]) if long_form else READERS[source.kind]
    rows = reader(source.location, p, skipped)
    with atomic_dir(out_dir) as tmp:
        # the cap stops every source lazily: nothing past it is read, parsed or counted as skipped
        count = write_shards(itertools.islice(rows, p.max_rows), tmp)
        if not count and skipped:  # raised inside atomic_dir: the previous output stays as it was
            raise FetchError(f"fetch.dataset {p.dataset!r}: no row could be read, every one skipped: {dict(skipped)}")
        info = {
            "dataset": p.dataset,
            "kind": source.kind,
            "hub_snapshot": source.location if snapshot else None,
            "revision": p.revision if source.kind == "hub" or snapshot else None,
            "config": p.config if source.kind == "hub" else None,
            "split": p.split if source.kind in ("hub", "segment_list") else None,
            "long_form": long_form,
            "rows": count,
            "skipped": dict(skipped),
        }
        write_json_atomic(tmp / SOURCE_INFO, info)
    log.info("wrote %d rows to %s%s", count, out_dir, f" (skipped {dict(skipped)})" if skipped else "")
    return info
