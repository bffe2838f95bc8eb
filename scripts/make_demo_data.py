"""Generate the bundled demo data: medical dictation and doctor-patient turns spoken by espeak-ng.

Run: `.venv/bin/python scripts/make_demo_data.py` (needs the `espeak-ng` Debian package). The output is committed,
so nothing else in the project needs espeak-ng. espeak-ng's voices stand in for speakers.

- `data/sources/demo/`: the training data, a Hugging Face "audiofolder" (audio files plus `metadata.csv`), the
  layout a team's own recordings would use. Most clips are 16 kHz mono FLAC; a few are stored at 8 kHz, 22.05 kHz
  or 44.1 kHz stereo on purpose, so the demo also exercises the downmix/resample repair.
- `data/sources/demo-consultations/`: the demo's held-out test set, two short consultations in PriMock57's layout
  (`audio/<consultation>_{doctor,patient}` one channel per speaker, `transcripts/<same>.TextGrid` with one interval
  per utterance and PriMock57's `<UNSURE>`/`<UNIN/>` tags), with voices and sentences the training data lacks.
  FLAC rather than PriMock57's WAV, to keep the repository small.
- `data/sources/demo-general/`: the demo's forgetting check (`kind: general`), everyday sentences with no medicine
  in them, an audiofolder like `demo/`.

`--only consultations|general|demo` regenerates one folder and leaves the others' committed audio alone (another
espeak-ng version speaks slightly differently).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

OUT = Path("data/sources/demo")
CONSULTATIONS_OUT = Path("data/sources/demo-consultations")
GENERAL_OUT = Path("data/sources/demo-general")

VOICES = ["en-us+m3", "en-gb+f2", "en-us+f4", "en-gb-x-rp+m1", "en-us+m7", "en-029+f3"]

# Dictation (drug names, doses, findings) and conversation turns; kept short so the demo stays small.
SENTENCES = [
    "Patient is a fifty two year old male presenting with chest pain radiating to the left arm.",
    "Start metoprolol twenty five milligrams by mouth twice daily.",
    "Blood pressure is one forty over ninety, heart rate eighty eight.",
    "Impression: community acquired pneumonia of the right lower lobe.",
    "Continue atorvastatin forty milligrams at bedtime.",
    "The patient denies fever, chills or night sweats.",
    "Prescribe amoxicillin five hundred milligrams three times a day for seven days.",
    "History of type two diabetes mellitus, managed with metformin.",
    "Lungs are clear to auscultation bilaterally.",
    "Order a complete blood count and a basic metabolic panel.",
    "Follow up in the cardiology clinic in two weeks.",
    "Hemoglobin A1c is seven point eight percent.",
    "No known drug allergies.",
    "Abdomen is soft, non tender, non distended.",
    "Plan: increase lisinopril to twenty milligrams daily.",
    "Chest x ray shows no acute cardiopulmonary process.",
    "The wound is healing well with no signs of infection.",
    "Administer ondansetron four milligrams intravenously as needed for nausea.",
    "Patient reports shortness of breath on exertion.",
    "Electrocardiogram shows normal sinus rhythm.",
    "Discontinue ibuprofen because of gastric irritation.",
    "Start insulin glargine ten units at night.",
    "Refer to physical therapy for lower back pain.",
    "Thyroid stimulating hormone is within normal limits.",
    "How long have you had this cough?",
    "It started about three weeks ago and it is worse at night.",
    "Are you taking any medications at the moment?",
    "Just my inhaler and some paracetamol for the headaches.",
    "Does the pain get worse when you breathe in?",
    "Yes, especially when I take a deep breath.",
    "Have you noticed any swelling in your ankles?",
    "A little in the evenings, it goes down overnight.",
    "Any history of asthma in your family?",
    "My mother has asthma and my brother has eczema.",
    "I would like to listen to your chest now.",
    "We will send a blood test to check your kidney function.",
    "Take the antibiotic with food to avoid an upset stomach.",
    "Come back if the fever does not settle in two days.",
    "Do you smoke or drink alcohol?",
    "I quit smoking five years ago.",
    "The rash appeared after I started the new tablets.",
    "We will switch you to a different blood pressure medicine.",
    "Your oxygen saturation is ninety six percent on room air.",
    "Rate the pain from zero to ten for me.",
    "About a seven, it is a sharp stabbing pain.",
    "Any numbness or tingling in your hands or feet?",
    "I get dizzy when I stand up too quickly.",
    "We will check your blood sugar before breakfast tomorrow.",
]

# (index modulo 12) -> how the clip is stored; most are plain 16 kHz mono.
ODD_FORMATS = {3: ("8k", 8000, 1), 7: ("44k-stereo", 44100, 2), 10: ("22k", 22050, 1)}


def speak(text: str, voice: str) -> tuple[np.ndarray, int]:
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", "155", "--stdout", text], check=True, capture_output=True
    ).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return audio, rate


def store(audio: np.ndarray, rate: int, target_rate: int, channels: int) -> np.ndarray:
    out = soxr.resample(audio, rate, target_rate) if rate != target_rate else audio
    if channels == 2:  # a slightly delayed, quieter second channel, like a second microphone
        delayed = np.concatenate([np.zeros(int(0.002 * target_rate), dtype=out.dtype), out])[: len(out)]
        out = np.stack([out, 0.8 * delayed], axis=1)
    return out


# (name, doctor voice, patient voice, turns as (speaker, transcript)); none of these voices is in VOICES
CONSULTATIONS = [
    (
        "demoday1_consultation01",
        "en-gb-scotland+m2",
        "en-gb-x-gbcwmd+f1",
        [
            ("doctor", "Good morning, what brings you in today?"),
            ("patient", "I have had a burning pain when I pass urine for two days."),
            ("doctor", "Any fever, or pain in your back or side?"),
            ("patient", "<UNSURE>No</UNSURE>, no fever, just the burning."),
            ("doctor", "I will prescribe nitrofurantoin one hundred milligrams twice a day for three days."),
            ("patient", "Okay, thank you doctor. <UNIN/>"),
        ],
    ),
    (
        "demoday1_consultation02",
        "en-gb-x-gbclan+m4",
        "en-gb-scotland+f5",
        [
            ("doctor", "How is your breathing since we started the salbutamol inhaler?"),
            ("patient", "Better, but I still wheeze at night."),
            ("doctor", "Let us add a low dose beclometasone inhaler every morning and evening."),
            ("patient", "Should I stop the salbutamol?"),
            ("doctor", "No, keep it for when you feel tight chested."),
        ],
    ),
]
GAP_S = 0.6  # silence between turns

# Everyday English for the forgetting check: no medical word, voices of both the training data and others.
GENERAL = [
    ("en-us+m3", "The train to the city leaves at half past eight every morning."),
    ("en-gb+f2", "Could you pass me the salt and the pepper, please?"),
    ("en-gb-scotland+m2", "We are planning a trip to the mountains next summer."),
    ("en-us+f4", "The library closes early on Sundays, so let us go tomorrow."),
    ("en-gb-x-gbclan+m4", "My sister bought a new bicycle with a red basket."),
    ("en-029+f3", "It rained all afternoon and the garden is full of puddles."),
    ("en-gb-x-rp+m1", "Please remember to switch off the lights when you leave."),
    ("en-gb-scotland+f5", "The football match was cancelled because of the storm."),
]


def make_consultations() -> None:
    from praatio import textgrid

    for folder in ("audio", "transcripts"):
        (CONSULTATIONS_OUT / folder).mkdir(parents=True, exist_ok=True)
    rate = 16_000
    for name, doctor, patient, turns in CONSULTATIONS:
        voices = {"doctor": doctor, "patient": patient}
        clips, t = [], GAP_S
        for speaker, text in turns:
            spoken = re.sub(r"<[^>]+>", "", text)  # the tags are the transcriber's, not spoken
            audio, native = speak(spoken, voices[speaker])
            audio = soxr.resample(audio, native, rate)
            clips.append((speaker, text, t, audio))
            t += len(audio) / rate + GAP_S
        total = round(t * rate)
        for speaker, label in (("doctor", "Doctor"), ("patient", "Patient")):
            channel = np.zeros(total, dtype=np.float32)
            intervals = []
            for who, text, start, audio in clips:
                if who == speaker:
                    first = round(start * rate)
                    channel[first : first + len(audio)] = audio
                    intervals.append((round(start, 3), round(start + len(audio) / rate, 3), text))
            sf.write(CONSULTATIONS_OUT / "audio" / f"{name}_{speaker}.flac", channel, rate, subtype="PCM_16")
            grid = textgrid.Textgrid()
            grid.addTier(textgrid.IntervalTier(label, intervals, 0, total / rate))
            grid.save(
                str(CONSULTATIONS_OUT / "transcripts" / f"{name}_{speaker}.TextGrid"),
                format="long_textgrid",
                includeBlankSpaces=True,
            )
    print(f"wrote {len(CONSULTATIONS)} consultations to {CONSULTATIONS_OUT}")


def write_metadata(folder: Path, rows: list[dict[str, str]]) -> None:
    """An audiofolder's metadata.csv (file_name, text, speaker, utterance_id) for the clips written under `folder`."""
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} clips to {folder}")


def make_general() -> None:
    (GENERAL_OUT / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (voice, text) in enumerate(GENERAL):
        audio, rate = speak(text, voice)
        name = f"audio/general_{i:03d}.flac"
        sf.write(GENERAL_OUT / name, store(audio, rate, 16000, 1), 16000, subtype="PCM_16")
        rows.append({"file_name": name, "text": text, "speaker": voice, "utterance_id": f"general_{i:03d}"})
    write_metadata(GENERAL_OUT, rows)


def make_demo() -> None:
    (OUT / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(SENTENCES):
        voice = VOICES[i % len(VOICES)]
        audio, rate = speak(text, voice)
        tag, target_rate, channels = ODD_FORMATS.get(i % 12, ("16k", 16000, 1))
        name = f"audio/demo_{i:03d}_{tag}.flac"
        sf.write(OUT / name, store(audio, rate, target_rate, channels), target_rate, subtype="PCM_16")
        rows.append({"file_name": name, "text": text, "speaker": voice, "utterance_id": f"demo_{i:03d}"})
    write_metadata(OUT, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("consultations", "general", "demo"), help="regenerate one folder")
    only = parser.parse_args().only
    for name, make in (("consultations", make_consultations), ("general", make_general), ("demo", make_demo)):
        if only in (None, name):
            make()


if __name__ == "__main__":
    main()
