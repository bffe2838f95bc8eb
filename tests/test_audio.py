"""Decoding and repair: channel downmix, resampling with soxr, corrupt and empty input."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import audio_bytes, tone, wav

from medasr.audio import TARGET_SAMPLE_RATE, AudioDecodeError, decode, encode_flac, probe, to_model_input


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize(("rate", "channels"), [(8_000, 1), (22_050, 1), (44_100, 2), (48_000, 2), (16_000, 1)])
def test_any_rate_and_layout_becomes_16k_mono_with_pitch_kept(rate, channels):
    audio = decode(wav(2.0, rate, channels, freq=440.0))
    assert (audio.sample_rate, audio.channels) == (rate, channels)

    out = to_model_input(audio)

    assert out.ndim == 1 and out.dtype == np.float32
    assert abs(len(out) - 2 * TARGET_SAMPLE_RATE) <= 1
    assert dominant_frequency(out, TARGET_SAMPLE_RATE) == pytest.approx(440.0, abs=1.0)
    assert 0.45 < np.abs(out[1000:-1000]).max() < 0.55  # amplitude survives the filter


def test_downmix_averages_channels():
    left, right = tone(1.0, 16_000, freq=300.0), tone(1.0, 16_000, freq=700.0)
    audio = decode(audio_bytes(np.stack([left, right], axis=1)))
    np.testing.assert_allclose(to_model_input(audio), (left + right) / 2, atol=1e-4)


def test_flac_round_trip_clips_overshoot():
    samples = np.array([0.0, 0.5, 1.2, -1.3], dtype=np.float32)
    back = decode(encode_flac(samples, 16_000))
    np.testing.assert_allclose(back.samples[:, 0], [0.0, 0.5, 1.0, -1.0], atol=1e-4)


@pytest.mark.parametrize(
    ("data", "match"),
    [(b"", "no audio bytes"), (None, "no audio bytes"), (b"RIFF\x00\x00garbage" * 10, None), (wav(1.0)[:30], None)],
)
def test_corrupt_or_empty_bytes_raise_a_clear_error(data, match):
    with pytest.raises(AudioDecodeError, match=match):
        decode(data)


def test_zero_length_audio_decodes_to_no_frames():
    audio = decode(audio_bytes(np.zeros(0, dtype=np.float32)))
    assert audio.samples.shape[0] == 0 and audio.duration == 0


def test_float_audio_with_nan_is_refused_but_integer_pcm_is_not_scanned():
    import io

    import soundfile as sf

    from medasr.audio import AudioDecodeError, decode

    samples = np.zeros(1600, dtype=np.float32)
    samples[100] = np.nan
    buf = io.BytesIO()
    sf.write(buf, samples, 16_000, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="NaN or infinite"):
        decode(buf.getvalue())
    with pytest.raises(AudioDecodeError, match="NaN or infinite"):  # float PCM: probe decodes it in full
        probe(buf.getvalue())
    pcm = io.BytesIO()
    sf.write(pcm, np.zeros(1600, dtype=np.float32), 16_000, format="WAV", subtype="PCM_16")
    assert decode(pcm.getvalue()).duration == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "channels"),
    [
        ("WAV", "PCM_16", 16_000, 1),  # header only
        ("WAV", "PCM_24", 44_100, 2),  # header only
        ("WAV", "FLOAT", 8_000, 1),  # decoded: float PCM may hold NaN
        ("FLAC", "PCM_16", 48_000, 2),  # decoded: compressed
        ("MP3", None, 44_100, 1),  # decoded: compressed
    ],
)
def test_probe_agrees_with_a_full_decode(fmt, subtype, rate, channels):
    import io

    import soundfile as sf

    buf = io.BytesIO()
    samples = np.zeros((int(rate * 1.3), channels), dtype=np.float32)
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    found, audio = probe(buf.getvalue()), decode(buf.getvalue())
    assert (found.frames, found.sample_rate, found.channels) == (audio.samples.shape[0], rate, channels)
    # a WAV cut short: its header count is clamped to what is there, exactly what decoding returns
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    if fmt == "WAV":
        assert probe(cut).frames == decode(cut).samples.shape[0] > 0


def test_probe_decodes_a_compressed_stream_to_prove_it_whole():
    import io

    import soundfile as sf

    flac = io.BytesIO()
    sf.write(flac, np.random.default_rng(0).uniform(-0.5, 0.5, 16_000).astype(np.float32), 16_000, format="FLAC")
    with pytest.raises(AudioDecodeError, match="not readable"):  # header intact, stream truncated
        probe(flac.getvalue()[: len(flac.getvalue()) // 2])
