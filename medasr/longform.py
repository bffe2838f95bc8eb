"""Long recordings for a model that hears at most 40 s: where to cut them into overlapping windows, and how to stitch
the windows' transcripts back into one.

Silences come from silero-vad (MIT licence): a maintained voice-activity detector that ships its model inside the
wheel, so it works offline with nothing to download, and runs on the CPU at tens of times real time. Its `[audio]`
extra would pull a torchaudio that our torch pin forbids, so we never use its audio loading: callers decode with
soundfile (`medasr.audio`) and hand it 16 kHz mono samples.

Windows only ever see the audio: nothing here reads a reference's timings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

VAD_RATE = 16_000  # silero-vad's native rate, and the model's


@cache
def _vad() -> Any:
    """silero-vad's model, loaded once per process (a JIT module shipped in the wheel)."""
    import torch

    threads = torch.get_num_threads()
    import silero_vad  # importing it sets torch's intra-op threads to 1 for the whole process: put them back

    torch.set_num_threads(threads)
    return silero_vad.load_silero_vad()


def speech_regions(audio: np.ndarray, rate: int = VAD_RATE) -> list[tuple[float, float]]:
    """(start, end) seconds of speech in mono float samples at `rate` (16 kHz), in time order."""
    import torch

    if rate != VAD_RATE:
        raise ValueError(f"speech_regions needs {VAD_RATE} Hz audio, got {rate} Hz")
    model = _vad()  # first: it imports silero_vad
    from silero_vad import get_speech_timestamps

    samples = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    with torch.inference_mode():
        found = get_speech_timestamps(samples, model, sampling_rate=rate, return_seconds=True)
    return [(float(r["start"]), float(r["end"])) for r in found]


def _silences(speech: Sequence[tuple[float, float]], duration: float) -> list[tuple[float, float]]:
    """The gaps between speech regions (and before the first, after the last) inside [0, duration]."""
    gaps, cursor = [], 0.0
    for start, end in sorted(speech):
        if start > cursor:
            gaps.append((cursor, min(start, duration)))
        cursor = max(cursor, end)
    if cursor < duration:
        gaps.append((cursor, duration))
    return [(a, b) for a, b in gaps if b > a]


def _cut(lo: float, hi: float, target: float, silences: Sequence[tuple[float, float]]) -> float:
    """A cut point in [lo, hi]: the middle of the longest silence there (the nearest to `target` on a tie), or
    `target` itself (a hard cut) when no silence reaches into the range."""
    best: tuple[float, float, float] | None = None  # (-length, distance to target, cut)
    for a, b in silences:
        a, b = max(a, lo), min(b, hi)
        if b > a:
            middle = (a + b) / 2
            candidate = (-(b - a), abs(middle - target), middle)
            best = candidate if best is None or candidate < best else best
    return target if best is None else best[2]


def plan_windows(
    duration: float, speech: Sequence[tuple[float, float]], chunk_s: float, overlap_s: float
) -> list[tuple[float, float]]:
    """(start, end) seconds of the windows a recording of `duration` seconds is decoded in: one window when it fits
    in `chunk_s`; otherwise windows of at most `chunk_s` that cover it all, each overlapping the next by about
    `overlap_s` (between half and one and a half times it). Each window ends, and the next one starts, in the longest
    silence near where a fixed stride would cut (a window's end may move back by a quarter of the stride, the next
    start by half the overlap), so words are rarely cut in two; a hard cut where there is no silence there."""
    if not 0 <= overlap_s < chunk_s:
        raise ValueError(f"need 0 < chunk_s and 0 <= overlap_s < chunk_s, got {chunk_s} and {overlap_s}")
    if duration <= chunk_s:
        return [(0.0, duration)]
    silences = _silences(speech, duration)
    # Bounded moves keep every window at most chunk_s long, and make each advance by at least half the stride
    end_slack = (chunk_s - overlap_s) / 4
    start_slack = min(overlap_s / 2, end_slack)
    windows, start = [], 0.0
    while start + chunk_s < duration:
        end = _cut(start + chunk_s - end_slack, start + chunk_s, start + chunk_s, silences)
        windows.append((start, end))
        start = _cut(end - overlap_s - start_slack, end - overlap_s + start_slack, end - overlap_s, silences)
    windows.append((start, duration))
    return windows


def _key(word: str) -> str:
    return re.sub(r"\W+", "", word.lower())


def _seam(left: Sequence[str], right: Sequence[str]) -> tuple[int, int, int] | None:
    """The longest run of words (compared lower-cased without punctuation) common to `left` and `right`, as
    (start in left, start in right, length); of equally long runs, the one that leaves out the fewest words at the
    seam. None when they share no word."""
    a, b = [_key(w) for w in left], [_key(w) for w in right]
    best: tuple[int, int, int, int] | None = None  # (-length, words left out, i, j)
    run = [0] * (len(b) + 1)  # run[j + 1]: length of the common run ending at a[i], b[j]
    for i in range(len(a)):
        for j in reversed(range(len(b))):
            run[j + 1] = run[j] + 1 if a[i] and a[i] == b[j] else 0
            if run[j + 1]:
                k = run[j + 1]
                candidate = (-k, (len(a) - 1 - i) + (j + 1 - k), i + 1 - k, j + 1 - k)
                best = candidate if best is None or candidate < best else best
    return None if best is None else (best[2], best[3], -best[0])


def merge_transcripts(texts: Sequence[str]) -> str:
    """One transcript from the transcripts of consecutive overlapping windows, in order.

    At each seam the longest common word run between the second half of the left window and the first half of the
    right one (the overlap lies there) is found on lower-cased, punctuation-free words; the left window's words are
    kept up to the middle of that run and the right window's from there on, so each word of the overlap is emitted
    once, as one of the windows wrote it. When the halves share no word (the windows heard the overlap differently,
    or it holds no speech) the two are simply concatenated: dropping nothing, at the risk of repeating a few words.
    An empty window (silence) contributes nothing and its neighbours are concatenated, as they do not overlap."""
    merged: list[str] = []
    previous: list[str] = []  # the last window's words; its second half is the tail of `merged`
    for text in texts:
        words = text.split()
        if previous and words:
            tail = len(previous) - len(previous) // 2
            head = (len(words) + 1) // 2
            found = _seam(merged[len(merged) - tail :], words[:head])
            if found is not None:
                i, j, k = found
                del merged[len(merged) - tail + i + k // 2 :]
                words_from = j + k // 2
                merged.extend(words[words_from:])
                previous = words
                continue
        merged.extend(words)
        previous = words
    return " ".join(merged)
