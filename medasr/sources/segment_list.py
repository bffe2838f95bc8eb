"""A segment list of long recordings: the Fareez et al. OSCE interviews as `yfyeung/medical` publishes them
(`medical_{train,dev,test}.info` beside `audio/*.mp3`; each line `audio/RES0001.mp3[start,end]<TAB>TEXT`, as
lhotse's `medical` recipe parses it). By clip (`read`), each segment is cut out as its own clip with a stable id
(unlike the recipe's `hash()`-based ids) and the recording as its group, so an interview never straddles train and
val. Long-form (`read_recordings`), each recording is one row: the whole file, its segments' text in time order."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from medasr.log import get_logger
from medasr.params import FetchParams
from medasr.sources.base import FetchError, clip_id, cut_segment, layout_file, link_roots, safe_file

log = get_logger(__name__)

_LINE = re.compile(r"^(?P<path>[^\t\[]+)\[(?P<start>\d+(?:\.\d+)?),(?P<end>\d+(?:\.\d+)?)\]\t(?P<text>.*)$")


class Segment(NamedTuple):
    where: str  # `<list>:<line>`, for messages
    path: str  # the recording, as the line names it
    start: float
    end: float
    span: str  # `[start,end]` as written
    text: str


def is_segment_list(path: Path) -> bool:
    return any(path.glob("medical_*.info"))


def _segments(root: Path, p: FetchParams, skipped: Counter) -> Iterator[Segment]:
    """The well-formed lines of `medical_<fetch.split>.info`; malformed ones are counted."""
    info = root / f"medical_{p.split}.info"
    if not info.is_file():
        found = sorted(f.name for f in root.glob("medical_*.info"))
        raise FetchError(f"{info} not found (fetch.split={p.split!r}); segment lists here: {found}")
    layout_file(info, root, link_roots(root))
    for line_no, line in enumerate(info.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line.rstrip("\r"))
        start, end = (float(m["start"]), float(m["end"])) if m else (0.0, 0.0)
        if m is None or end <= start:
            skipped["malformed_segment_line"] += 1
            log.warning("%s:%d skipped, not `path[start,end]<TAB>text`: %r", info, line_no, line[:120])
            continue
        yield Segment(f"{info}:{line_no}", m["path"], start, end, f"[{m['start']},{m['end']}]", m["text"])


def read(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    """One clip per well-formed line."""
    root = Path(location)
    links_to = link_roots(root)
    index = 0
    for seg in _segments(root, p, skipped):
        file = safe_file(seg.path, root, links_to, skipped, seg.where)
        if file is None:
            continue
        recording = Path(seg.path).stem
        yield {
            "row": index,
            "source_id": clip_id(recording, seg.start, seg.end),
            "group": recording,
            "audio": cut_segment(file, seg.start, seg.end - seg.start) if file.is_file() else None,
            "source_path": f"{seg.path}{seg.span}",
            "text": seg.text,
        }
        index += 1


def read_recordings(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    """Long-form: one row per recording (in order of its first line), id = its file stem as first written. Lines
    naming one file however spelt (`audio/R1.wav`, `./audio/R1.wav`, `audio//R1.wav`) are one recording; a line
    repeated exactly is read once (`duplicate_segment`). A recording whose segments overlap has no time order to
    join them in: counted as `unordered_transcript`, not read."""
    root = Path(location)
    links_to = link_roots(root)
    files: dict[str, Path | None] = {}  # each spelling's file, None when refused (counted once)
    # keyed by dataset_file's path: `.` and `//` fold away and `..` is refused; not resolved through links, which
    # in a hub snapshot would merge distinct files whose bytes happen to match (one deduplicated blob)
    recordings: dict[Path, list[Segment]] = {}
    for seg in _segments(root, p, skipped):
        if seg.path not in files:
            files[seg.path] = safe_file(seg.path, root, links_to, skipped, seg.where)
        if (file := files[seg.path]) is not None:
            recordings.setdefault(file, []).append(seg)
    index = 0
    for file, lines in recordings.items():
        unique = {(s.start, s.end, s.text.strip()): s for s in reversed(lines)}  # the first of each duplicate
        if dropped := len(lines) - len(unique):
            skipped["duplicate_segment"] += dropped
            log.warning("%s: %d segment line(s) repeated exactly, read once", lines[0].path, dropped)
        segs = sorted(unique.values(), key=lambda s: (s.start, s.end))
        clash = next(((a, b) for a, b in itertools.pairwise(segs) if b.start < a.end), None)
        if clash:
            skipped["unordered_transcript"] += 1
            log.warning("%s skipped: segments %s and %s overlap", lines[0].path, clash[0].where, clash[1].where)
            continue
        recording = Path(lines[0].path).stem
        yield {
            "row": index,
            "source_id": recording,
            "group": recording,
            "audio": file.read_bytes() if file.is_file() else None,
            "source_path": lines[0].path,
            "text": " ".join(s.text.strip() for s in segs if s.text.strip()),
        }
        index += 1
