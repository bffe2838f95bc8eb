"""A segment list of long recordings: the Fareez et al. OSCE interviews as `yfyeung/medical` publishes them
(`medical_{train,dev,test}.info` beside `audio/*.mp3`; each line `audio/RES0001.mp3[start,end]<TAB>TEXT`, as
lhotse's `medical` recipe parses it). Each segment is cut out as its own clip with a stable id (unlike the recipe's
`hash()`-based ids) and the recording as its group, so an interview never straddles train and val."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medasr.log import get_logger
from medasr.params import FetchParams
from medasr.sources.base import FetchError, clip_id, cut_segment, layout_file, link_roots, safe_file

log = get_logger(__name__)

_LINE = re.compile(r"^(?P<path>[^\t\[]+)\[(?P<start>\d+(?:\.\d+)?),(?P<end>\d+(?:\.\d+)?)\]\t(?P<text>.*)$")


def is_segment_list(path: Path) -> bool:
    return any(path.glob("medical_*.info"))


def read(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    """`medical_<fetch.split>.info`: one clip per well-formed line; malformed lines are counted."""
    info = Path(location) / f"medical_{p.split}.info"
    if not info.is_file():
        found = sorted(f.name for f in Path(location).glob("medical_*.info"))
        raise FetchError(f"{info} not found (fetch.split={p.split!r}); segment lists here: {found}")
    links_to = link_roots(Path(location))
    layout_file(info, Path(location), links_to)
    index = 0
    for line_no, line in enumerate(info.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line.rstrip("\r"))
        start, end = (float(m["start"]), float(m["end"])) if m else (0.0, 0.0)
        if m is None or end <= start:
            skipped["malformed_segment_line"] += 1
            log.warning("%s:%d skipped, not `path[start,end]<TAB>text`: %r", info, line_no, line[:120])
            continue
        file = safe_file(m["path"], Path(location), links_to, skipped, f"{info}:{line_no}")
        if file is None:
            continue
        recording = Path(m["path"]).stem
        yield {
            "row": index,
            "source_id": clip_id(recording, start, end),
            "group": recording,
            "audio": cut_segment(file, start, end - start) if file.is_file() else None,
            "source_path": f"{m['path']}[{m['start']},{m['end']}]",
            "text": m["text"],
        }
        index += 1
