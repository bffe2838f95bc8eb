"""Long recordings with Praat TextGrid transcripts, as PriMock57 publishes them (`transcripts/<name>.TextGrid`
beside `audio/<name>.wav`, one interval per utterance). Each labelled interval is cut out as a clip, id
`<name>-<start ms>-<end ms>`; group = the name without a trailing `_<tier name>` (`day1_consultation01_doctor` ->
`day1_consultation01`), so both channels of a consultation stay together."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medasr.log import get_logger
from medasr.params import FetchParams
from medasr.sources.base import OutsideDataset, clip_id, cut_segment, dataset_file, link_roots, refuse, safe_file

log = get_logger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


def has_textgrids(path: Path) -> bool:
    return any(path.rglob("*.TextGrid"))


def read(location: str, p: FetchParams, skipped: Counter) -> Iterator[dict[str, Any]]:
    """TextGrid transcripts (any depth) matched by file name to audio files (any depth): one clip per labelled
    interval. Unreadable TextGrids and audio without a transcript are counted, and so is each interval whose
    TextGrid or audio is a link leading out of the folder; a missing recording reaches subset as missing audio.
    Columns do not apply: `p` is unused."""
    from praatio import textgrid
    from praatio.utilities.errors import PraatioException

    root = Path(location)
    links_to = link_roots(root)
    audio = {f.stem: f for f in sorted(root.rglob("*")) if f.suffix.lower() in AUDIO_SUFFIXES and f.is_file()}
    grids = sorted(root.rglob("*.TextGrid"))
    untranscribed = len(audio.keys() - {g.stem for g in grids})
    if untranscribed:
        skipped["audio_without_transcript"] = untranscribed
        log.warning("%d audio file(s) under %s have no TextGrid of the same name", untranscribed, root)
    index = 0
    for grid in grids:
        if safe_file(str(grid.relative_to(root)), root, links_to, skipped, str(grid)) is None:
            continue
        try:
            tg = textgrid.openTextgrid(str(grid), includeEmptyIntervals=False)
        except (PraatioException, ValueError, IndexError, UnicodeError) as exc:
            skipped["malformed_textgrid"] += 1
            log.warning("%s skipped, not a readable TextGrid: %s", grid, exc)
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
            # PriMock57 names a channel's file `<consultation>_<speaker>` and its only tier `<Speaker>`
            suffix = f"_{tier.name.lower()}"
            group = grid.stem[: -len(suffix)] if grid.stem.lower().endswith(suffix) else grid.stem
            prefix = grid.stem if len(tiers) == 1 else f"{grid.stem}-{tier.name}"
            for start, end, label in tier.entries:
                if not label.strip():
                    continue
                if refused is not None:
                    refuse(skipped, f"{grid}[{start:.3f},{end:.3f}]", refused)
                    continue
                yield {
                    "row": index,
                    "source_id": clip_id(prefix, start, end),
                    "group": group,
                    "audio": cut_segment(file, start, end - start) if file else None,
                    "source_path": f"{grid.relative_to(root)}[{start:.3f},{end:.3f}]",
                    "text": label,
                }
                index += 1
