"""Long recordings for a model that hears at most 40 s: where to cut them into overlapping windows, and how to stitch
the windows' transcripts back into one.

Silences come from silero-vad (MIT licence): a maintained voice-activity detector that ships its model inside the
wheel, so it works offline with nothing to download, and runs on the CPU at tens of times real time. Its `[audio]`
extra would pull a torchaudio that our torch pin forbids, so we never use its audio loading: callers decode with
soundfile (`medasr.audio`) and hand it 16 kHz mono samples.

A file's window plan (its windows, and per seam the overlap's share of each window's speech and whether there is
any) is computed once per process (`window_plans`): eval decodes every set with two models, and times decoding alone.
Windows only ever see the audio: nothing here reads a reference's timings.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

VAD_RATE = 16_000  # silero-vad's native rate, and the model's


@cache
def _vad() -> Any:
    """silero-vad's model, loaded once per process (a JIT module shipped in the wheel)."""
    import silero_vad

    return silero_vad.load_silero_vad()


def speech_regions(audio: np.ndarray, rate: int = VAD_RATE) -> list[tuple[float, float]]:
    """(start, end) seconds of speech in mono float samples at `rate` (16 kHz), in time order."""
    import torch

    if rate != VAD_RATE:
        raise ValueError(f"speech_regions needs {VAD_RATE} Hz audio, got {rate} Hz")
    samples = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    # The VAD runs a small model on 32 ms frames one at a time: more than one intra-op thread makes it several times
    # slower. Importing silero_vad also sets one thread for the whole process; the model decodes on all of them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _vad()
        from silero_vad import get_speech_timestamps

        with torch.inference_mode():
            found = get_speech_timestamps(samples, model, sampling_rate=rate, return_seconds=True)
    finally:
        torch.set_num_threads(threads)
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


def check_window_settings(chunk_s: float, overlap_s: float) -> None:
    """The window settings' one rule (eval.chunk_s / chunk_overlap_s, `medasr transcribe --chunk-s/--overlap-s`):
    windows the model can hear whole, and that advance. Raises ValueError."""
    from medasr.params import MODEL_MAX_AUDIO_SECONDS

    if not (0 < chunk_s <= MODEL_MAX_AUDIO_SECONDS and 0 <= overlap_s < chunk_s):
        raise ValueError(
            f"need 0 < chunk_s <= {MODEL_MAX_AUDIO_SECONDS:g} (the model's limit) and 0 <= overlap_s < chunk_s, "
            f"got chunk_s {chunk_s:g} and overlap_s {overlap_s:g}"
        )


def plan_windows(
    duration: float, speech: Sequence[tuple[float, float]], chunk_s: float, overlap_s: float
) -> list[tuple[float, float]]:
    """(start, end) seconds of the windows a recording of `duration` seconds is decoded in: one window when it fits
    in `chunk_s`; otherwise windows of at most `chunk_s` that cover it all, each overlapping the next by about
    `overlap_s` (between half and one and a half times it). Each window ends, and the next one starts, in the longest
    silence near where a fixed stride would cut (a window's end may move back by a quarter of the stride, the next
    start by half the overlap), so words are rarely cut in two; a hard cut where there is no silence there."""
    check_window_settings(chunk_s, overlap_s)
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


@dataclass(frozen=True)
class Seam:
    """Where two consecutive windows overlap, as the merge needs it: the overlap's share of each window's speech
    (seconds of speech in the overlap / seconds of speech in the window: words follow speech, not the clock, and a
    window silent but for its overlap holds all its words there), and whether the VAD heard speech in the overlap."""

    left_share: float
    right_share: float
    speech: bool


# A seam of unknown geometry (`merge_transcripts` without seams): speech assumed, in about each window's half next to
# the seam once the margin is added.
UNKNOWN_SEAM = Seam(1 / 3, 1 / 3, True)


def seams_of(windows: Sequence[tuple[float, float]], speech: Sequence[tuple[float, float]]) -> list[Seam]:
    """The seam between each pair of consecutive windows, from the speech regions (seconds) the windows were cut at."""

    def heard(lo: float, hi: float) -> float:
        return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in speech)

    out = []
    for (s1, e1), (s2, e2) in itertools.pairwise(windows):
        shared = heard(s2, e1)  # 0 with no overlap (chunk_overlap_s = 0) or silence in it
        out.append(Seam(shared / heard(s1, e1), shared / heard(s2, e2), True) if shared > 0 else Seam(0, 0, False))
    return out


def _span(words: int, share: float) -> int:
    """How many of a window's words next to the seam may belong to the overlap: its share of the window's speech,
    half as much again and two words more (speech rates vary, and a word cut at the window's edge)."""
    return min(words, math.ceil(words * share * 1.5) + 2)


def _key(word: str) -> str:
    return re.sub(r"\W+", "", word.lower())


def _seam(left: Sequence[str], right: Sequence[str]) -> tuple[int, int, int] | None:
    """The longest run of at least two words (compared lower-cased without punctuation) common to `left` and `right`,
    as (start in left, start in right, length); of equally long runs, the one that leaves out the fewest words at
    the seam. None when there is none: one shared word is as likely a coincidence ("yeah", "it") as the overlap."""
    a, b = [_key(w) for w in left], [_key(w) for w in right]
    best: tuple[int, int, int, int] | None = None  # (-length, words left out, i, j)
    run = [0] * (len(b) + 1)  # run[j + 1]: length of the common run ending at a[i], b[j]
    for i in range(len(a)):
        for j in reversed(range(len(b))):
            run[j + 1] = run[j] + 1 if a[i] and a[i] == b[j] else 0
            if run[j + 1] >= 2:
                k = run[j + 1]
                candidate = (-k, (len(a) - 1 - i) + (j + 1 - k), i + 1 - k, j + 1 - k)
                best = candidate if best is None or candidate < best else best
    return None if best is None else (best[2], best[3], -best[0])


def merge_transcripts(texts: Sequence[str], seams: Sequence[Seam] | None = None) -> str:
    """One transcript from the transcripts of consecutive windows, in order; `seams[k]` describes the overlap of
    windows k and k + 1 (`UNKNOWN_SEAM` for each when not given).

    Where the VAD heard speech in the overlap, the longest run of at least two words common to the words of each
    window that may belong to the overlap (its share of the window's speech, with a margin: `_span`) is found on
    lower-cased, punctuation-free words; the left window's words are kept up to the middle of that run and the
    right window's from there on, so each word of the overlap is emitted once, as one of the windows wrote it.
    With no speech in the overlap (a one-speaker channel while the other person talks; no overlap at all), or no
    such run (the windows heard it differently), the two are simply concatenated: dropping nothing, at the risk of
    repeating a few words. An empty window (silence) contributes nothing and its neighbours are concatenated."""
    if seams is not None and len(seams) != max(len(texts) - 1, 0):
        raise ValueError(f"{len(texts)} windows need {max(len(texts) - 1, 0)} seams, got {len(seams)}")
    merged: list[str] = []
    previous: list[str] = []  # the last window's words
    kept = 0  # how many of them end `merged`
    for k, text in enumerate(texts):
        words = text.split()
        seam = UNKNOWN_SEAM if seams is None or k == 0 else seams[k - 1]
        if previous and words and seam.speech:
            tail = min(_span(len(previous), seam.left_share), kept)
            found = _seam(merged[len(merged) - tail :], words[: _span(len(words), seam.right_share)])
            if found is not None:
                i, j, n = found
                del merged[len(merged) - tail + i + n // 2 :]
                merged.extend(words[j + n // 2 :])
                previous, kept = words, len(words) - j - n // 2
                continue
        merged.extend(words)
        previous, kept = words, len(words)
    return " ".join(merged)


@dataclass(frozen=True)
class WindowPlan:
    windows: tuple[tuple[float, float], ...]  # (start, end) seconds in time order; one (0, length) for a short file
    seams: tuple[Seam, ...]  # between consecutive windows


def window_plans(paths: Sequence[Path], chunk_s: float, overlap_s: float) -> list[WindowPlan]:
    """Each file's window plan, in input order: one window for a file up to `chunk_s` seconds (its header's length;
    0 for an unreadable file, whose decode raises the real error), else the windows `plan_windows` cuts at the VAD's
    silences, with their seams. Computed once per process for a file's version (resolved path, size, mtime) and the
    window settings; only plans are kept (a few numbers each), never audio."""
    check_window_settings(chunk_s, overlap_s)
    plans = []
    for path in paths:
        try:
            found = os.stat(path)
        except OSError:
            plans.append(WindowPlan(((0.0, 0.0),), ()))
            continue
        key = (str(Path(path).resolve()), found.st_size, found.st_mtime_ns, float(chunk_s), float(overlap_s))
        plans.append(_plan(*key))
    return plans


@lru_cache(maxsize=1 << 16)  # a short file's plan is a few hundred bytes: tens of MB at most
def _plan(path: str, _size: int, _mtime_ns: int, chunk_s: float, overlap_s: float) -> WindowPlan:
    from medasr.audio import decode, to_model_input

    try:
        seconds = float(sf.info(path).duration)  # header only
    except (sf.LibsndfileError, RuntimeError, OSError):
        seconds = 0.0
    if seconds <= chunk_s:
        return WindowPlan(((0.0, seconds),), ())
    audio = to_model_input(decode(Path(path).read_bytes()))
    speech = speech_regions(audio)
    windows = plan_windows(len(audio) / VAD_RATE, speech, chunk_s, overlap_s)
    return WindowPlan(tuple(windows), tuple(seams_of(windows, speech)))
