"""Benchmark: subset + manifest throughput (audio hours per wall-clock minute) against a plain per-file baseline.

Run: `.venv/bin/python bench/data_stages.py [--clips 300] [--out bench/results/data_stages.json]`

Builds an audiofolder of synthetic clips (2-20 s; the mix of formats real sources bring: 16 kHz WAV, 44.1 kHz
stereo WAV, 8 kHz WAV, 48 kHz FLAC, 44.1 kHz MP3 like the OSCE interviews) and fetches it once (fetch is I/O and
not compared). Then, in the same process, it times:
  - ours: `subset.run` + `manifest.run`, on 1 core and on all usable cores (the process pinned with
    sched_setaffinity; both stages spread per-clip work over threads, one per usable core). Subset validates each
    clip (uncompressed integer PCM by its header, anything else by a full decode), hashes and dedupes it and
    filters by length; manifest decodes, downmixes, resamples (soxr HQ) and writes 16 kHz FLAC;
  - baseline: per file `librosa.load(path, sr=16000)` (mono, soxr_hq) + `soundfile.write` as 16-bit FLAC, one
    process on 1 core, no validation, librosa imported and warmed up before the clock starts.
Prints a markdown table and writes the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import soundfile as sf

from medasr.params import FetchParams, ManifestParams, SubsetParams
from stages import fetch, manifest, subset

FORMATS = [  # (share, sample rate, channels, container)
    (0.35, 16_000, 1, "WAV"),
    (0.25, 44_100, 2, "WAV"),
    (0.15, 8_000, 1, "WAV"),
    (0.15, 48_000, 1, "FLAC"),
    (0.10, 44_100, 1, "MP3"),
]


def make_clips(folder: Path, n: int, seed: int = 0) -> float:
    """Write n clips and metadata.csv; returns the total audio seconds. Noise-modulated tones stand in for speech
    (codec and resampler cost depend on length and rate, not on content)."""
    rng = np.random.default_rng(seed)
    (folder / "audio").mkdir(parents=True)
    shares = np.array([f[0] for f in FORMATS])
    total, rows = 0.0, []
    for i in range(n):
        _, rate, channels, container = FORMATS[rng.choice(len(FORMATS), p=shares / shares.sum())]
        seconds = float(rng.uniform(2.0, 20.0))
        t = np.arange(int(seconds * rate)) / rate
        mono = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
        mono += 0.02 * rng.standard_normal(len(t))
        samples = np.stack([mono] * channels, axis=1) if channels > 1 else mono
        name = f"audio/clip{i:04d}.{container.lower()}"
        subtype = None if container == "MP3" else "PCM_16"
        sf.write(folder / name, samples.astype(np.float32), rate, format=container, subtype=subtype)
        rows.append({"file_name": name, "text": f"synthetic clip number {i}"})
        total += seconds
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return total


def ours(work: Path, raw: Path) -> float:
    p = SubsetParams(seed=1, train_size=100_000, val_size=10_000, min_duration=0.5, max_duration=30.0)
    style = ManifestParams(text_normalization="unicode", annotation_tags="strip", all_caps="sentence_case")
    started = time.perf_counter()
    subset.run(p, raw_dir=raw, out_dir=work / "subset", metrics_file=work / "data.json")
    manifest.run(style, raw, work / "subset", work / "manifests")
    return time.perf_counter() - started


def baseline(folder: Path, out: Path) -> float:
    import librosa

    out.mkdir()
    files = sorted((folder / "audio").iterdir())
    librosa.load(files[0], sr=16_000)  # warm-up: librosa's first call spends ~1.5 s on lazy imports
    started = time.perf_counter()
    for path in files:
        samples, rate = librosa.load(path, sr=16_000)
        sf.write(out / f"{path.stem}.flac", samples, rate, subtype="PCM_16")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/results/data_stages.json"))
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="medasr-bench-") as tmp:
        root = Path(tmp)
        seconds = make_clips(root / "source", args.clips)
        fetch_started = time.perf_counter()
        fetch.run(
            FetchParams(dataset=str(root / "source"), split="train", audio_column="audio", text_column="text"),
            out_dir=root / "raw",
        )
        fetch_s = time.perf_counter() - fetch_started
        everything = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(everything)})
        runs = {"baseline (librosa.load + soundfile.write, 1 core)": baseline(root / "source", root / "base")}
        runs["ours (subset + manifest, 1 core)"] = ours(root / "ours1", root / "raw")
        os.sched_setaffinity(0, everything)
        runs[f"ours (subset + manifest, {cores} cores)"] = ours(root / "ours", root / "raw")
    hours = seconds / 3600
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({cores} usable)",
        "python": platform.python_version(),
        "clips": args.clips,
        "audio_hours": round(hours, 4),
        "fetch_seconds": round(fetch_s, 2),
        "runs": {
            name: {"seconds": round(s, 2), "audio_hours_per_minute": round(hours / (s / 60), 3)}
            for name, s in runs.items()
        },
    }
    base = next(v for k, v in result["runs"].items() if k.startswith("baseline"))["seconds"]
    for run in result["runs"].values():
        run["speedup_vs_baseline"] = round(base / run["seconds"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.clips} clips, {hours:.2f} h of audio; fetch {fetch_s:.1f} s; {result['machine']}\n")
    print("| run | seconds | audio h / min | vs baseline |\n|---|---|---|---|")
    for name, run in result["runs"].items():
        print(f"| {name} | {run['seconds']} | {run['audio_hours_per_minute']} | {run['speedup_vs_baseline']}x |")


if __name__ == "__main__":
    main()
