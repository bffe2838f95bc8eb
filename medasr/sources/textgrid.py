"""Long recordings with Praat TextGrid transcripts, as PriMock57 publishes them (`transcripts/<name>.TextGrid`
beside `audio/<name>.wav`, one interval per utterance).

By clip (`read`): each labelled interval is cut out as a clip, id `<name>-<start ms>-<end ms>`. Long-form
(`read_recordings`): one row per recording and interval tier, id `<name>` (`<name>-<tier>` when the file has
several), the whole audio file, text = the labelled intervals' text in time order.

Group (both): PriMock57 names each channel's file `<consultation>_<doctor|patient>`, so the group is
`<consultation>` and both channels of a consultation stay on one side of the split. Its published files name their
only tier `Speaker` (112 of 114), so the tier name cannot be trusted for this; a name without that convention loses
a trailing `_<tier name>` (`visit_nurse` with tier `Nurse` -> `visit`), else the group is the whole name."""

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


def group_of(stem: str, tier: str) -> str:
    """The recording group of the TextGrid file `stem`'s tier `tier` (see the module docstring)."""
    if m := _CHANNEL.match(stem):
        return m["consultation"]
    suffix = f"_{tier.lower()}"
    return stem[: -len(suffix)] if stem.lower().endswith(suffix) and len(stem) > len(suffix) else stem


def _tiers(root: Path, skipped: Counter) -> Iterator[tuple[Path, Any, Path | None, OutsideDataset | None, bool]]:
    """(TextGrid, interval tier, its recording or None when missing, why that recording may not be read, whether
    the file has several interval tiers) for each interval tier of each readable TextGrid (any depth), matched to
    audio files (any depth) by file name. Unreadable TextGrids, overlapping intervals and audio without a
    transcript are counted."""
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
        for tier in tiers:
            yield grid, tier, file, refused, len(tiers) > 1


def _name(grid: Path, tier: Any, several: bool) -> str:
    return f"{grid.stem}-{tier.name}" if several else grid.stem


def read(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    """One clip per labelled interval; a missing recording reaches subset as missing audio. Columns do not apply:
    `p` is unused."""
    root = Path(location)
    index = 0
    for grid, tier, file, refused, several in _tiers(root, skipped):
        for start, end, label in tier.entries:
            if not label.strip():
                continue
            if refused is not None:
                refuse(skipped, f"{grid}[{start:.3f},{end:.3f}]", refused)
                continue
            yield {
                "row": index,
                "source_id": clip_id(_name(grid, tier, several), start, end),
                "group": group_of(grid.stem, tier.name),
                "audio": cut_segment(file, start, end - start) if file else None,
                "source_path": f"{grid.relative_to(root)}[{start:.3f},{end:.3f}]",
                "text": label,
            }
            index += 1


def read_recordings(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    """Long-form: one row per recording and interval tier, its labelled intervals' text joined in time order (one
    interval spanning the whole channel is as good as many). A missing recording reaches testsets as missing audio."""
    root = Path(location)
    index = 0
    for grid, tier, file, refused, several in _tiers(root, skipped):
        if refused is not None:
            refuse(skipped, str(grid), refused)
            continue
        yield {
            "row": index,
            "source_id": _name(grid, tier, several),
            "group": group_of(grid.stem, tier.name),
            "audio": file.read_bytes() if file else None,
            "source_path": str(grid.relative_to(root)) + (f"[{tier.name}]" if several else ""),
            "text": " ".join(label.strip() for _, _, label in tier.entries if label.strip()),
        }
        index += 1
