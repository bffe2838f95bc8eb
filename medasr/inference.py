"""Batched greedy transcription with a SALM: one prompt, identical in validation, eval and `medasr transcribe`.

The model decodes where `medasr.device.place` put it, in the precision it was trained in (an exported folder's
medasr.json says which: `medasr.export.model_precision`). Audio goes to the model's device as float32 whatever the
model's dtype: NeMo's preprocessor computes features in fp32 and casts them to the model's dtype itself (bf16
audio costs accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medasr.audio import TARGET_SAMPLE_RATE as SAMPLE_RATE
from medasr.audio import decode, to_model_input

# LLM positions per second of audio: canary-qwen's encoder emits a frame every 80 ms (NeMo's
# `token_equivalent_duration`). Decode batches are budgeted in positions, as training's batches are.
FRAMES_PER_SECOND = 12.5


def load_audio(path: Path) -> Any:
    """Any audio file as a 16 kHz mono float32 tensor (the same repair the manifest stage applies)."""
    import torch

    return torch.from_numpy(to_model_input(decode(Path(path).read_bytes())))


def load_batch(pieces: list[Path | Any]) -> tuple[Any, Any]:
    """Zero-padded audio (batch, samples) with the true lengths, of files (read whole) or audio already in memory."""
    import torch

    clips = [load_audio(p) if isinstance(p, Path) else p for p in pieces]
    lens = torch.tensor([len(c) for c in clips], dtype=torch.long)
    audios = torch.zeros(len(clips), int(lens.max()))
    for i, clip in enumerate(clips):
        audios[i, : len(clip)] = clip
    return audios, lens


def generate_ids(model: Any, audios: Any, lens: Any, max_new_tokens: int, min_new_tokens: int = 0) -> Any:
    """Greedy new token ids (batch, tokens) for a padded audio batch, with the training prompt.

    Refuses (ValueError) a batch holding audio longer than the model hears (MODEL_MAX_AUDIO_SECONDS): the one gate
    every decode passes, so nothing longer is ever fed whole; `transcribe_long` cuts such audio into windows."""
    import torch

    from medasr.model import PROMPT
    from medasr.params import MODEL_MAX_AUDIO_SECONDS

    longest = int(lens.max()) / SAMPLE_RATE if len(lens) else 0.0
    if longest > MODEL_MAX_AUDIO_SECONDS:
        raise ValueError(
            f"audio of {longest:g} s in a decode batch: the model hears at most {MODEL_MAX_AUDIO_SECONDS:g} s "
            "at once (decode long audio with transcribe_long, which cuts it into windows)"
        )

    with torch.inference_mode():
        return model.generate(
            prompts=[[{"role": "user", "content": PROMPT}] for _ in range(len(lens))],
            audios=audios.to(model.device, dtype=torch.float32),  # fp32 into the preprocessor (module docstring)
            audio_lens=lens.to(model.device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
        )


@contextmanager
def observed_dtypes(model: Any) -> Iterator[dict[str, str]]:
    """What the model computes in while inside, filled in on exit: its device and parameter dtypes, and the dtypes
    that reached its preprocessor (the audio) and its encoder (the features). Eval records them: what a run did,
    not what it was asked to do."""
    seen: dict[str, set[str]] = {"preprocessor_input": set(), "encoder_input": set()}

    def recorder(key: str, argument: str) -> Any:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen[key].add(_dtype_name(kwargs[argument] if argument in kwargs else args[0]))

        return hook

    perception = model.perception
    handles = [
        perception.preprocessor.register_forward_pre_hook(
            recorder("preprocessor_input", "input_signal"), with_kwargs=True
        ),
        perception.encoder.register_forward_pre_hook(recorder("encoder_input", "audio_signal"), with_kwargs=True),
    ]
    record: dict[str, str] = {}
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
        record["device"] = str(model.device)
        record["parameters"] = ",".join(sorted({_dtype_name(p) for p in model.parameters() if p.is_floating_point()}))
        record |= {key: ",".join(sorted(dtypes)) for key, dtypes in seen.items()}


def _dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def plan_batches(seconds: list[float], batch_size: int, batch_tokens: int | None, fixed_tokens: int) -> list[list[int]]:
    """Indices of the clips in each decode batch, shortest clips first (a batch of similar lengths wastes little on
    padding): at most `batch_size` clips and, with `batch_tokens`, at most that many LLM positions, counted as
    training's sampler counts them: the longest clip's positions (audio frames + `fixed_tokens`) times the clips
    in the batch. A clip over the budget on its own decodes alone."""
    batches: list[list[int]] = []
    for i in sorted(range(len(seconds)), key=lambda i: seconds[i]):
        positions = math.ceil(seconds[i] * FRAMES_PER_SECOND) + fixed_tokens  # the longest so far
        last = batches[-1] if batches else []
        if last and len(last) < batch_size and (batch_tokens is None or positions * (len(last) + 1) <= batch_tokens):
            last.append(i)
        else:
            batches.append([i])
    return batches


def prompt_tokens(model: Any) -> int:
    """Tokens of the formatted prompt `generate_ids` sends (chat template and audio tag included)."""
    from nemo.collections.common.prompts import PromptFormatter

    from medasr.model import PROMPT

    formatter = PromptFormatter.resolve(model.cfg.prompt_format)(model.tokenizer)
    return len(formatter.encode_dialog(turns=[{"role": "user", "content": PROMPT}])["input_ids"])


def transcribe(
    model: Any,
    paths: list[Path],
    batch_size: int,
    max_new_tokens: int = 128,
    min_new_tokens: int = 0,
    batch_tokens: int | None = None,
) -> list[str]:
    """Greedy transcripts, in input order: `transcribe_long` with its default windows (a file longer than 35 s is
    decoded in overlapping windows). `min_new_tokens` > 0 suppresses the end token until then: benchmarks use it to
    force a realistic output length from random weights."""
    done = transcribe_long(
        model, paths, batch_size, max_new_tokens, batch_tokens=batch_tokens, min_new_tokens=min_new_tokens
    )
    return [t.text for t in done]


@dataclass(frozen=True)
class Transcript:
    text: str
    windows: int  # windows decoded: 1 for a file up to chunk_s


def transcribe_long(
    model: Any,
    paths: list[Path],
    batch_size: int,
    max_new_tokens: int,
    chunk_s: float = 35.0,
    overlap_s: float = 10.0,
    batch_tokens: int | None = None,
    min_new_tokens: int = 0,
) -> list[Transcript]:
    """Greedy transcripts of files of any length, in input order.

    A file up to `chunk_s` seconds is decoded whole; a longer one is read and cut into the overlapping windows of its
    plan (`medasr.longform.window_plans`: at silences, computed once per process), held in memory, and its windows'
    transcripts merged at the seams the plan describes. Files are taken in groups of about an hour of audio (what a
    group's windows hold in memory); within a group, short files and windows decode together in `plan_batches`'
    batches (`batch_tokens`: a budget of LLM positions per batch, each piece costing its audio frames + prompt +
    `max_new_tokens`), the next batch read in a thread while the model decodes the current one."""
    from medasr.longform import merge_transcripts, window_plans

    plans = window_plans(paths, chunk_s, overlap_s)  # refuses a bad chunk_s / overlap_s
    lengths = [plan.windows[-1][1] for plan in plans]
    texts: list[list[str]] = [[] for _ in paths]
    was_training = model.training
    model.eval()
    try:
        for group in _groups(lengths, GROUP_SECONDS):
            owners, pieces = [], []
            for i in group:
                for piece in _pieces(paths[i], plans[i].windows, chunk_s):
                    owners.append(i)
                    pieces.append(piece)
            decoded = _decode(model, pieces, batch_size, max_new_tokens, min_new_tokens, batch_tokens)
            for i, text in zip(owners, decoded, strict=True):
                texts[i].append(text)  # a file's windows in time order
    finally:
        model.train(was_training)
    # a file decoded whole keeps its text exactly as decoded
    return [
        Transcript(merge_transcripts(t, plan.seams) if len(t) > 1 else t[0], len(t))
        for t, plan in zip(texts, plans, strict=True)
    ]


# Audio per group of files (~230 MB as float32 at 16 kHz): bounds what long recordings' windows hold in memory.
GROUP_SECONDS = 3600.0


def _groups(lengths: list[float], budget: float) -> list[list[int]]:
    """Consecutive file indices in groups of at most `budget` seconds (a longer file forms a group of its own)."""
    groups: list[list[int]] = []
    total = 0.0
    for i, seconds in enumerate(lengths):
        if not groups or total + seconds > budget:
            groups.append([])
            total = 0.0
        groups[-1].append(i)
        total += seconds
    return groups


def _pieces(path: Path, windows: tuple[tuple[float, float], ...], chunk_s: float) -> list[tuple[Path | Any, float]]:
    """What to decode for one file, with its seconds: the file itself when its plan is one window (read in the batch
    reader; an unreadable file's load raises its real error there), else its windows in time order (16 kHz mono
    float32 tensors, views of the file's audio)."""
    if len(windows) == 1:
        return [(path, windows[0][1])]
    audio = load_audio(path)
    most = math.floor(chunk_s * SAMPLE_RATE)  # seconds as floats can round a window one sample over the chunk
    bounds = [(round(start * SAMPLE_RATE), round(end * SAMPLE_RATE)) for start, end in windows]
    slices = [audio[start : min(end, start + most)] for start, end in bounds]
    return [(piece, len(piece) / SAMPLE_RATE) for piece in slices]


def _decode(
    model: Any,
    pieces: list[tuple[Path | Any, float]],
    batch_size: int,
    max_new_tokens: int,
    min_new_tokens: int,
    batch_tokens: int | None,
) -> list[str]:
    """Greedy transcripts of (audio, seconds) pieces, in order, in planned batches (see `transcribe_long`)."""
    fixed = prompt_tokens(model) + max_new_tokens if batch_tokens is not None else 0
    planned = plan_batches([seconds for _, seconds in pieces], batch_size, batch_tokens, fixed)
    batches = [[pieces[i][0] for i in b] for b in planned]
    eos = model.text_eos_id
    texts: list[str] = []
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(load_batch, batches[0]) if batches else None
        for k in range(len(batches)):
            assert pending is not None
            audios, lens = pending.result()
            pending = reader.submit(load_batch, batches[k + 1]) if k + 1 < len(batches) else None
            ids = generate_ids(model, audios, lens, max_new_tokens, min_new_tokens)
            for row in ids.tolist():
                if eos in row:
                    row = row[: row.index(eos)]
                texts.append(model.tokenizer.ids_to_text(row).strip())
    out = [""] * len(pieces)
    for i, text in zip((i for b in planned for i in b), texts, strict=True):
        out[i] = text
    return out
