"""Long recordings with Praat TextGrid transcripts, as PriMock57 publishes them (`transcripts/<name>.TextGrid`
beside `audio/<name>.wav`, one interval per utterance).

By clip (`read`): each labelled interval is cut out as a clip, id `<name>-<start ms>-<end ms>` (`<name>-<tier>-...`
when the file has several interval tiers). Long-form (`read_recordings`): one row per recording, id `<name>`, the
whole audio file, text = the labelled intervals of all its tiers in time order. Several tiers over one file are the
speakers of one mixed recording: a row per tier would score each speaker's text against everyone's speech.

Group (both): PriMock57 names each channel's file `<consultation>_<doctor|patient>`, so the group is
`<consultation>` and both channels of a consultation stay on one side of the split. Its published files name their
only tier `Speaker` (112 of 114), so the tier name cannot be trusted for this; a name without that convention loses
a trailing `_<tier name>` when the file has one tier (`visit_nurse` with tier `Nurse` -> `visit`), else the group
is the whole name: all of a file's clips are one recording, so one group."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medasr.log import get_logger
from medasr.params import FetchParams
from medasr.sources.base import OutsideDataset, clip_id, cut_segment, dataset_file, link_roots, refuse, safe_file

log = get_logger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
_CHANNEL = re.compile(r"^(?P<consultation>.+)_(?:doctor|patient)$", re.IGNORECASE)


def has_textgrids(path: Path) -> bool:
    return any(path.rglob("*.TextGrid"))


def group_of(stem: str, tier: str | None) -> str:
    """The recording group of the TextGrid file `stem` whose only interval tier is `tier` (None: several tiers;
    see the module docstring)."""
    if m := _CHANNEL.match(stem):
        return m["consultation"]
    suffix = f"_{(tier or '').lower()}"
    return stem[: -len(suffix)] if tier and stem.lower().endswith(suffix) and len(stem) > len(suffix) else stem


def _grids(root: Path, skipped: Counter) -> Iterator[tuple[Path, list[Any], Path | None, OutsideDataset | None]]:
    """(TextGrid, its interval tiers, its recording or None when missing, why that recording may not be read) for
    each readable TextGrid (any depth), matched to audio files (any depth) by file name. Unreadable TextGrids,
    intervals overlapping within a tier and audio without a transcript are counted."""
    from praatio import textgrid
    from praatio.utilities.errors import PraatioException

    links_to = link_roots(root)
    audio = {f.stem: f for f in sorted(root.rglob("*")) if f.suffix.lower() in AUDIO_SUFFIXES and f.is_file()}
    grids = sorted(root.rglob("*.TextGrid"))
    untranscribed = len(audio.keys() - {g.stem for g in grids})
    if untranscribed:
        skipped["audio_without_transcript"] = untranscribed
        log.warning("%d audio file(s) under %s have no TextGrid of the same name", untranscribed, root)
    for grid in grids:
        if safe_file(str(grid.relative_to(root)), root, links_to, skipped, str(grid)) is None:
            continue
        try:
            tg = textgrid.openTextgrid(str(grid), includeEmptyIntervals=False)
        except (PraatioException, ValueError, IndexError, UnicodeError) as exc:
            # praatio sorts a tier's intervals; only overlapping ones leave no time order to read them in
            reason = "unordered_transcript" if "overlap" in str(exc) else "malformed_textgrid"
            skipped[reason] += 1
            log.warning("%s skipped (%s): %s", grid, reason, exc)
            continue
        file = audio.get(grid.stem)
        refused: OutsideDataset | None = None
        try:
            if file is not None:
                dataset_file(str(file.relative_to(root)), root, links_to)
        except OutsideDataset as exc:
            refused = exc
        # point tiers (TextTier) mark instants, not utterances: nothing to cut
        tiers = [t for t in map(tg.getTier, tg.tierNames) if isinstance(t, textgrid.IntervalTier)]
        if tiers:
            yield grid, tiers, file, refused


def _group(grid: Path, tiers: list[Any]) -> str:
    return group_of(grid.stem, tiers[0].name if len(tiers) == 1 else None)


def read(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    """One clip per labelled interval; a missing recording reaches subset as missing audio. Columns do not apply:
    `p` is unused."""
    root = Path(location)
    index = 0
    for grid, tiers, file, refused in _grids(root, skipped):
        for tier, (start, end, label) in ((t, e) for t in tiers for e in t.entries):
            if not label.strip():
                continue
            if refused is not None:
                refuse(skipped, f"{grid}[{start:.3f},{end:.3f}]", refused)
                continue
            yield {
                "row": index,
                "source_id": clip_id(f"{grid.stem}-{tier.name}" if len(tiers) > 1 else grid.stem, start, end),
                "group": _group(grid, tiers),
                "audio": cut_segment(file, start, end - start) if file else None,
                "source_path": f"{grid.relative_to(root)}[{start:.3f},{end:.3f}]",
                "text": label,
            }
            index += 1


def read_recordings(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    """Long-form: one row per recording, the labelled intervals of all its tiers joined in order of start time (one
    interval spanning the whole channel is as good as many; speakers on different tiers may talk over each other).
    A missing recording reaches testsets as missing audio."""
    root = Path(location)
    index = 0
    for grid, tiers, file, refused in _grids(root, skipped):
        if refused is not None:
            refuse(skipped, str(grid), refused)
            continue
        # a stable sort: intervals starting together keep the tiers' order
        entries = sorted((e for t in tiers for e in t.entries), key=lambda e: e.start)
        yield {
            "row": index,
            "source_id": grid.stem,
            "group": _group(grid, tiers),
            "audio": file.read_bytes() if file else None,
            "source_path": str(grid.relative_to(root)),
            "text": " ".join(label.strip() for _, _, label in entries if label.strip()),
        }
        index += 1
