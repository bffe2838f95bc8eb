"""Audio decoding and repair shared by the data stages: soundfile (libsndfile: WAV, FLAC, OGG, MP3) to decode,
soxr to resample. No torchcodec/FFmpeg, which `datasets` would otherwise need."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import soundfile as sf
import soxr

T = TypeVar("T")
R = TypeVar("R")

# NeMo's canary/FastConformer preprocessor expects 16 kHz mono.
TARGET_SAMPLE_RATE = 16_000


class AudioDecodeError(ValueError):
    """The bytes are not audio libsndfile can read (corrupt, truncated, unknown format)."""


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32, shape (frames, channels)
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration(self) -> float:
        return self.samples.shape[0] / self.sample_rate


@dataclass(frozen=True)
class Probe:
    frames: int
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


# Uncompressed integer PCM: libsndfile's header frame count is exactly what a full decode returns (it clamps a
# truncated file's count to the bytes present), and integer samples are always finite. Anything else (FLAC, MP3,
# OGG, float PCM) can only be trusted after decoding it in full.
_HEADER_EXACT_SUBTYPES = {"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32"}
_HEADER_EXACT_FORMATS = {"WAV", "WAVEX", "RF64", "W64", "AIFF"}
_NAN_POSSIBLE_SUBTYPES = {"FLOAT", "DOUBLE"}


def _unreadable(exc: Exception) -> AudioDecodeError:
    # libsndfile names the in-memory buffer ("Error opening <_io.BytesIO object at 0x..>: ..."): keep the reason
    reason = re.sub(r"^Error opening <[^>]*>:\s*", "", str(exc).strip()) or type(exc).__name__
    return AudioDecodeError(f"not readable audio: {reason}")


def decode(data: bytes | None) -> Audio:
    if not data:
        raise AudioDecodeError("no audio bytes")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            samples, rate, subtype = f.read(dtype="float32", always_2d=True), f.samplerate, f.subtype
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise _unreadable(exc) from None
    # only floating-point encodings can hold NaN or inf; integer PCM, FLAC and MP3 decode to finite values
    if subtype in _NAN_POSSIBLE_SUBTYPES and not np.isfinite(samples).all():
        raise AudioDecodeError("audio contains NaN or infinite samples")
    return Audio(samples, int(rate))


def probe(data: bytes | None) -> Probe:
    """Length, rate and channels, with the checks `decode` makes, decoding only what its header cannot vouch for."""
    if not data:
        raise AudioDecodeError("no audio bytes")
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise _unreadable(exc) from None
    if info.format in _HEADER_EXACT_FORMATS and info.subtype in _HEADER_EXACT_SUBTYPES:
        return Probe(int(info.frames), int(info.samplerate), int(info.channels))
    audio = decode(data)
    return Probe(audio.samples.shape[0], audio.sample_rate, audio.channels)


def audio_problem(path: Path) -> str | None:
    """Why the file at `path` cannot be decoded as the model reads it (missing, corrupt, no samples), or None:
    eval and `medasr transcribe` leave such a file out and say so, instead of failing the whole run."""
    try:
        samples = to_model_input(decode(Path(path).read_bytes()))
    except (OSError, AudioDecodeError) as exc:
        return str(exc)
    return None if samples.size else "no audio samples"


def map_clips(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """`map(fn, items)` in order, on as many threads as usable cores: libsndfile, soxr and hashlib release the GIL
    while they work, so per-clip audio work scales with cores without process start-up or pickling costs."""
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        yield from pool.map(fn, items)


def to_model_input(audio: Audio, rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Downmix to mono (channel mean) and resample with soxr's high-quality filter; returns float32 (frames,)."""
    if audio.channels == 1:
        mono = audio.samples[:, 0]
    else:  # a matrix-vector product (BLAS) averages interleaved channels ~10x faster than .mean(axis=1)
        mono = audio.samples @ np.full(audio.channels, 1 / audio.channels, dtype=np.float32)
    if audio.sample_rate != rate:
        mono = soxr.resample(mono, audio.sample_rate, rate, quality="HQ").astype(np.float32, copy=False)
    return mono


def write_flac(target: Path | io.BytesIO, samples: np.ndarray, rate: int) -> None:
    """16-bit FLAC: lossless for what the model hears, about half the size of WAV in the DVC cache."""
    # Clip first: soxr's filter can overshoot full scale slightly, and libsndfile would wrap, not clip.
    sf.write(target, np.clip(samples, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")


def encode_flac(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    write_flac(buf, samples, rate)
    return buf.getvalue()
