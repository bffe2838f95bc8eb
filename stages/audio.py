"""Audio decoding and repair shared by the data stages: soundfile (libsndfile: WAV, FLAC, OGG, MP3) to decode,
soxr to resample. No torchcodec/FFmpeg, which `datasets` would otherwise need."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

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


def decode(data: bytes | None) -> Audio:
    if not data:
        raise AudioDecodeError("no audio bytes")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            samples, rate, subtype = f.read(dtype="float32", always_2d=True), f.samplerate, f.subtype
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # libsndfile names the in-memory buffer ("Error opening <_io.BytesIO object at 0x..>: ..."): keep the reason
        reason = re.sub(r"^Error opening <[^>]*>:\s*", "", str(exc).strip()) or type(exc).__name__
        raise AudioDecodeError(f"not readable audio: {reason}") from None
    # only floating-point encodings can hold NaN or inf; integer PCM, FLAC and MP3 decode to finite values
    if subtype in ("FLOAT", "DOUBLE") and not np.isfinite(samples).all():
        raise AudioDecodeError("audio contains NaN or infinite samples")
    return Audio(samples, int(rate))


def to_model_input(audio: Audio, rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Downmix to mono (channel mean) and resample with soxr's high-quality filter; returns float32 (frames,)."""
    if audio.channels == 1:
        mono = audio.samples[:, 0]
    else:  # a matrix-vector product (BLAS) averages interleaved channels ~10x faster than .mean(axis=1)
        mono = audio.samples @ np.full(audio.channels, 1 / audio.channels, dtype=np.float32)
    if audio.sample_rate != rate:
        mono = soxr.resample(mono, audio.sample_rate, rate, quality="HQ").astype(np.float32, copy=False)
    return mono


def encode_flac(samples: np.ndarray, rate: int) -> bytes:
    """16-bit FLAC: lossless for what the model hears, about half the size of WAV in the DVC cache."""
    buf = io.BytesIO()
    # Clip first: soxr's filter can overshoot full scale slightly, and libsndfile would wrap, not clip.
    sf.write(buf, np.clip(samples, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()
