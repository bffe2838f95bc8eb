"""Long-form transcription: windows cut at silences, transcripts merged at the seams without duplicated or dropped
words, and a recording of several minutes through `medasr transcribe` without ever feeding the model more than
the window.

The merge and the window planner are pure and fast; the VAD runs on a real (espeak) demo consultation; the
five-minute recording goes through a tiny exported model (e2e).
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import REPO, run_env, tiny_params

from medasr.longform import Seam, merge_transcripts, plan_windows, seams_of, speech_regions

RATE = 16_000
CONSULTATION = (
    "The patient is a fifty two year old man with a three day history of burning on urination and lower "
    "abdominal pain he has no fever no back pain and no blood in the urine he takes metformin five hundred "
    "milligrams twice a day and ramipril five milligrams once a day we will send a urine sample for culture "
    "and start nitrofurantoin one hundred milligrams twice a day for three days"
)
SENTENCE = CONSULTATION.split()


def _cut(words: list[str], size: int, overlap: int) -> list[list[str]]:
    """Consecutive windows of `size` words, each sharing `overlap` words with the next."""
    out, start = [], 0
    while True:
        out.append(words[start : start + size])
        if start + size >= len(words):
            return out
        start += size - overlap


def _styled(window: list[str]) -> str:
    """What a recogniser makes of a window: a capital first word, a full stop at the end (the cut)."""
    return " ".join([window[0].capitalize(), *window[1:-1], window[-1] + "."])


@pytest.mark.parametrize(("size", "overlap"), [(20, 6), (30, 9), (12, 4), (25, 4)])  # 10 s of 35 s ~ 2 of 7
def test_overlapping_windows_merge_into_the_words_once_whatever_the_casing_and_punctuation_at_the_seams(size, overlap):
    windows = _cut(SENTENCE, size, overlap)
    assert len(windows) > 2
    merged = merge_transcripts([_styled(w) for w in windows]).split()
    assert [re.sub(r"\W", "", w.lower()) for w in merged] == [w.lower() for w in SENTENCE]
    # original words are emitted, not the comparison keys: the first window's capital survives
    assert merged[0] == "The" and merged[-1] == "days."


def test_a_seam_keeps_the_original_words_of_each_side():
    left = "Good morning, what brings you in today? I have had a"
    right = "In today? I have had a burning pain, Doctor."
    assert (
        merge_transcripts([left, right]) == "Good morning, what brings you in today? I have had a burning pain, Doctor."
    )


def test_recognition_errors_in_the_overlap_neither_duplicate_nor_drop_the_words_around_them():
    # the windows disagree on a drug name inside the overlap: the longest common run after it aligns the seam
    left = "we will start two tablets of amoxicillin daily for a"
    right = "tablets of amoxicilin daily for a week and come back"
    assert merge_transcripts([left, right]) == "we will start two tablets of amoxicillin daily for a week and come back"
    # and errors at both window edges (a word cut in two) are left out for the other window's reading
    left = "take one tablet twice a day with your fo"
    right = "ay with your food for seven days"
    assert merge_transcripts([left, right]) == "take one tablet twice a day with your food for seven days"


def test_windows_that_share_no_word_are_concatenated_dropping_nothing():
    assert merge_transcripts(["the pain started on monday", "ok good so tell me more"]) == (
        "the pain started on monday ok good so tell me more"
    )


def test_a_word_common_to_both_windows_but_outside_the_overlap_halves_is_not_a_seam():
    # "pain" is in the left window's first half and the right window's second half: not where the overlap lies
    left = "pain in the back since last week and"
    right = "since last week and now the pain"
    assert merge_transcripts([left, right]) == "pain in the back since last week and now the pain"


PATIENT = "yeah i have had a headache for about a week now and it is getting worse"
LATER = "okay yeah it started after the flu i think"


def test_one_common_word_is_no_seam_and_a_silent_overlap_is_never_merged():
    # "yeah" and "it" are in both halves, by chance: the patient's channel was silent in the overlap
    assert merge_transcripts([PATIENT, LATER]) == f"{PATIENT} {LATER}"
    silent = Seam(0.0, 0.0, False)
    assert merge_transcripts([PATIENT, LATER], [silent]) == f"{PATIENT} {LATER}"
    # even a long common run is no seam when the VAD heard nothing in the overlap (or there was no overlap)
    assert merge_transcripts(["i think it is the flu", "i think it is the flu"], [silent]) == (
        "i think it is the flu i think it is the flu"
    )
    # with speech in the overlap the same windows do merge
    assert merge_transcripts(["i think it is the flu", "is the flu"], [Seam(0.4, 1.0, True)]) == "i think it is the flu"


def test_a_seam_is_only_looked_for_in_the_overlaps_share_of_each_windows_words():
    left = "the pain is in my chest and it gets worse when i climb the stairs"  # 15 words
    right = "when i climb the stairs i get short of breath and the pain is in my chest again"  # 18 words
    # the overlap holds a fifth of each window's speech: "when i climb the stairs" is the seam, while the longer
    # "the pain is in my chest" lies far outside it (the left window's start, the right one's end)
    seam = Seam(0.2, 0.2, True)
    assert merge_transcripts([left, right], [seam]) == (
        "the pain is in my chest and it gets worse when i climb the stairs i get short of breath and the pain is "
        "in my chest again"
    )
    # the windows' first and last few words only: the run lies outside, so nothing is merged (nor dropped)
    assert merge_transcripts([left, right], [Seam(0.01, 0.01, True)]) == f"{left} {right}"
    with pytest.raises(ValueError, match="2 windows need 1 seams, got 0"):
        merge_transcripts([left, right], [])


def test_seams_carry_the_overlaps_share_of_each_windows_speech_and_whether_it_holds_any():
    windows = [(0.0, 10.0), (7.0, 17.0), (17.0, 25.0)]  # the last pair does not overlap (chunk_overlap_s = 0)
    speech = [(1.0, 3.0), (6.0, 8.0), (9.0, 12.0)]
    # the overlap 7-10 holds 1 + 1 = 2 s of speech; the left window 2 + 2 + 1 = 5 s, the right 1 + 3 = 4 s
    assert seams_of(windows, speech) == [Seam(2 / 5, 2 / 4, True), Seam(0, 0, False)]
    assert seams_of(windows, [(1.0, 6.5), (10.5, 20.0)]) == [Seam(0, 0, False), Seam(0, 0, False)]  # silent overlap
    assert seams_of([(0.0, 5.0)], speech) == []


def test_single_and_empty_windows():
    assert merge_transcripts([]) == ""
    assert merge_transcripts(["  Hello,   there.  "]) == "Hello, there."
    assert merge_transcripts(["", "", ""]) == ""
    # a silent window in between: its neighbours do not overlap each other, so they are joined as they are
    assert merge_transcripts(["one two three", "", "three four"]) == "one two three three four"
    assert merge_transcripts(["", "one two three", "two three four", ""]) == "one two three four"


def _assert_windows(windows, duration, chunk, overlap):
    assert windows[0][0] == 0 and windows[-1][1] == duration  # the whole recording is heard
    for start, end in windows:
        assert 0 < end - start <= chunk + 1e-9  # seconds as floats; the samples fed are checked e2e
    for (s1, e1), (s2, e2) in itertools.pairwise(windows):
        assert s1 < s2 <= e1 < e2  # each advances, and leaves no gap
        assert overlap / 2 - 1e-9 <= e1 - s2 <= overlap * 1.5 + 1e-9  # about the overlap asked for


def _speech_around(pauses: list[float], duration: float, width: float = 1.0):
    """Speech everywhere except `width`-second pauses centred on `pauses`."""
    edges = [0.0] + [x for p in pauses for x in (p - width / 2, p + width / 2)] + [duration]
    return [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]


@pytest.mark.parametrize(("chunk", "overlap"), [(35, 10), (10, 3), (40, 0), (20, 15)])
def test_windows_are_at_most_the_chunk_overlap_and_cover_the_recording(chunk, overlap):
    for duration in (chunk + 0.5, 100.0, 601.3):
        for speech in ([], [(0.0, duration)], _speech_around([7.2, 30.0, 33.3, 61.0, 90.5], duration)):
            windows = plan_windows(duration, speech, chunk, overlap)
            _assert_windows(windows, duration, chunk, overlap)
            assert windows == plan_windows(duration, list(speech), chunk, overlap)  # deterministic


def test_cuts_land_in_the_longest_silence_near_the_target_and_are_hard_cuts_without_one():
    # 35 s windows, 10 s overlap: the first window may end in [28.75, 35], the next start 5 s either side of end - 10
    speech = [(0.0, 29.0), (30.0, 32.0), (34.5, 200.0)]  # silences 29-30 and 32-34.5 (the longer)
    windows = plan_windows(200.0, speech, 35.0, 10.0)
    assert windows[0] == (0.0, 33.25)  # the middle of the longer silence
    assert windows[1][0] == 23.25  # speech all around end - 10: a hard cut there
    # nothing but speech: every cut is a hard cut, at full length and the exact overlap
    assert plan_windows(80.0, [(0.0, 80.0)], 35.0, 10.0) == [(0.0, 35.0), (25.0, 60.0), (50.0, 80.0)]
    # pauses near every target cut: each end and each start lies in a pause
    pauses = [float(x) for x in range(5, 600, 5)]
    speech = _speech_around(pauses, 600.0, width=0.8)
    windows = plan_windows(600.0, speech, 35.0, 10.0)
    silent = [(p - 0.4, p + 0.4) for p in pauses]
    for start, end in windows:
        assert start == 0 or any(a <= start <= b for a, b in silent), start
        assert end == 600 or any(a <= end <= b for a, b in silent), end


def test_a_recording_that_fits_is_one_window():
    assert plan_windows(12.5, [(1.0, 5.0)], 35.0, 10.0) == [(0.0, 12.5)]
    assert plan_windows(35.0, [], 35.0, 10.0) == [(0.0, 35.0)]
    with pytest.raises(ValueError, match="overlap_s < chunk_s"):
        plan_windows(100.0, [], 10.0, 10.0)


def _textgrid_speech(grid: Path) -> list[tuple[float, float]]:
    found = re.findall(r'xmin = ([\d.]+)\s*\n\s*xmax = ([\d.]+)\s*\n\s*text = "([^"]*)"', grid.read_text())
    return [(float(a), float(b)) for a, b, text in found if text.strip()]


def test_speech_regions_find_the_espeak_speech_of_a_demo_consultation_and_not_its_silences():
    from medasr.inference import load_audio

    root = REPO / "data" / "sources" / "demo-consultations"
    name = "demoday1_consultation01_doctor"
    audio = load_audio(root / "audio" / f"{name}.flac").numpy()
    said = _textgrid_speech(root / "transcripts" / f"{name}.TextGrid")
    assert len(said) == 3
    threads = torch.get_num_threads()
    found = speech_regions(audio)
    assert torch.get_num_threads() == threads  # importing silero_vad sets 1; the model decodes on all of them
    assert len(found) == len(said)
    for (start, end), (a, b) in zip(found, said, strict=True):  # each utterance, to within the VAD's padding
        assert abs(start - a) < 0.3 and abs(end - b) < 0.4, (found, said)
    silence = audio[int(4 * RATE) : int(7 * RATE)]  # between the first two utterances
    assert speech_regions(silence) == []
    assert speech_regions(np.zeros(RATE * 5, dtype=np.float32)) == []


def test_the_vad_runs_on_one_thread_and_hands_the_decoder_back_all_of_its_threads(monkeypatch):
    import silero_vad

    # frame by frame on tiny tensors, several threads make the VAD 4-30 times slower (100 s of silence took 52 s)
    seen: list[int] = []

    def timestamps(samples, model, **kwargs):
        seen.append(torch.get_num_threads())
        if len(seen) == 2:
            raise RuntimeError("the VAD failed")
        return [{"start": 0.5, "end": 1.0}]

    monkeypatch.setattr(silero_vad, "get_speech_timestamps", timestamps)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # more than one whatever the machine, so the test can fail
    try:
        assert speech_regions(np.zeros(RATE, dtype=np.float32)) == [(0.5, 1.0)]
        assert torch.get_num_threads() == 3
        with pytest.raises(RuntimeError, match="the VAD failed"):
            speech_regions(np.zeros(RATE, dtype=np.float32))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 1]


def test_window_plans_are_made_once_per_file_version_and_window_setting(tmp_path, monkeypatch):
    from medasr import longform
    from medasr.longform import WindowPlan, window_plans

    heard: list[int] = []  # the VAD's runs (each costs a second per minute of audio)

    def regions(audio):
        heard.append(len(audio))
        return [(0.5, len(audio) / RATE - 0.5)]

    monkeypatch.setattr(longform, "speech_regions", regions)
    long, short = tmp_path / "long.flac", tmp_path / "short.flac"
    sf.write(long, np.zeros(25 * RATE, dtype=np.float32), RATE)
    sf.write(short, np.zeros(4 * RATE, dtype=np.float32), RATE)
    plans = window_plans([long, short, long], 10.0, 3.0)
    assert len(heard) == 1  # the long file only, once
    windows = plan_windows(25.0, [(0.5, 24.5)], 10.0, 3.0)
    assert plans[0] == plans[2] == WindowPlan(tuple(windows), tuple(seams_of(windows, [(0.5, 24.5)])))
    assert plans[1] == WindowPlan(((0.0, 4.0),), ())  # fits in a window: no VAD
    assert len(plans[0].windows) == 4 and all(seam.speech for seam in plans[0].seams)
    # the same file however its path is spelt: no second VAD run
    (tmp_path / "sub").mkdir()
    assert window_plans([tmp_path / "sub" / ".." / "long.flac"], 10.0, 3.0) == [plans[0]]
    assert len(heard) == 1
    # other window settings, or the file rewritten: planned again
    assert window_plans([long], 10.0, 2.0)[0] != plans[0] and len(heard) == 2
    sf.write(long, np.zeros(30 * RATE, dtype=np.float32), RATE)
    assert window_plans([long], 10.0, 3.0)[0].windows[-1][1] == 30.0 and len(heard) == 3
    # a missing file is one window of nothing: decoding it raises the real error
    assert window_plans([tmp_path / "gone.flac"], 10.0, 3.0) == [WindowPlan(((0.0, 0.0),), ())]
    with pytest.raises(ValueError, match="0 <= overlap_s < chunk_s"):
        window_plans([long], 10.0, 10.0)


# ---------------------------------------------------------------------------------------------------- e2e


@pytest.fixture(scope="module")
def tiny_exported(tmp_path_factory) -> Path:
    """The tiny model, untrained, as an exported folder (what `medasr transcribe` loads): decoding, not learning,
    is under test here."""
    from medasr.export import export
    from medasr.model import base_model

    p = tiny_params()
    out = tmp_path_factory.mktemp("tiny") / "model"
    export(base_model(p.model, p.lora, p.train.seed), out, {"preset": "tiny", "precision": "32"}, self_contained=True)
    return out


def _five_minutes(out: Path) -> tuple[Path, float]:
    """The demo clips (any rate, resampled to 16 kHz mono) one after another with pauses of 1 to 5.5 s between."""
    from medasr.inference import load_audio

    pieces: list[np.ndarray] = []
    for k, clip in enumerate(sorted((REPO / "data" / "sources" / "demo" / "audio").glob("*.flac"))):
        pieces += [load_audio(clip).numpy(), np.zeros(int(RATE * (1.0 + 1.5 * (k % 4))), dtype=np.float32)]
    audio = np.concatenate(pieces)
    sf.write(out, audio, RATE, subtype="PCM_16")
    return out, len(audio) / RATE


# `medasr transcribe` as the console script runs it (`stages.cli:app` in a process of its own), watched from inside:
# the audio lengths its model's preprocessor receives, and each window plan (`plan_windows` is the real one).
WATCHED_CLI = """
import json, os
import medasr.export, medasr.longform
from stages.cli import app

seen = {"fed": [], "plans": []}
real_load, real_plan = medasr.export.load_model, medasr.longform.plan_windows

def load_model(folder):
    model = real_load(folder)
    hook = lambda _module, _args, kwargs: seen["fed"].extend(kwargs["length"].tolist())
    model.perception.preprocessor.register_forward_pre_hook(hook, with_kwargs=True)
    return model

def plan_windows(duration, speech, chunk_s, overlap_s):
    windows = real_plan(duration, speech, chunk_s, overlap_s)
    seen["plans"].append({"duration": duration, "speech": list(speech), "windows": windows})
    return windows

medasr.export.load_model, medasr.longform.plan_windows = load_model, plan_windows
try:
    app(prog_name="medasr")
finally:
    with open(os.environ["WATCH_OUT"], "w") as f:
        json.dump(seen, f)
"""


@pytest.mark.e2e
def test_transcribe_decodes_a_five_minute_recording_in_windows_of_at_most_the_chunk(tmp_path, tiny_exported):
    recording, seconds = _five_minutes(tmp_path / "consultation.flac")
    assert seconds >= 300
    chunk, overlap = 35.0, 10.0
    options = ["--max-new-tokens", "8", "--chunk-s", str(chunk), "--overlap-s", str(overlap)]
    proc = subprocess.run(
        [sys.executable, "-c", WATCHED_CLI, "transcribe", str(tiny_exported), str(recording), *options],
        cwd=tmp_path,
        env=run_env() | {"PYTHONPATH": str(REPO), "WATCH_OUT": str(tmp_path / "seen.json")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and proc.stdout.startswith(f"{recording}\t")  # ONE transcript

    seen = json.loads((tmp_path / "seen.json").read_text())
    [plan] = seen["plans"]
    windows = [tuple(w) for w in plan["windows"]]
    assert abs(plan["duration"] - seconds) < 1e-3 and len(windows) >= seconds / chunk
    _assert_windows(windows, plan["duration"], chunk, overlap)  # at most the chunk, overlapping, covering it all
    # what reached the model: exactly those windows (to the sample), none longer than the chunk
    fed, planned = sorted(seen["fed"]), sorted((end - start) * RATE for start, end in windows)
    assert len(fed) == len(planned) and all(abs(f - p) <= 1 for f, p in zip(fed, planned, strict=True))
    assert max(fed) <= chunk * RATE
    # a pause between clips lies near every target cut: each window ends, and the next starts, outside speech
    speech = plan["speech"]
    assert len(speech) >= 40  # the VAD heard the clips
    for start, end in windows:
        assert not any(a < start < b or a < end < b for a, b in speech), (start, end)
