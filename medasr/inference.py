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
from pathlib import Path
from typing import Any

import soundfile as sf

from medasr.audio import decode, to_model_input

# LLM positions per second of audio: canary-qwen's encoder emits a frame every 80 ms (NeMo's
# `token_equivalent_duration`). Decode batches are budgeted in positions, as training's batches are.
FRAMES_PER_SECOND = 12.5


def load_audio(path: Path) -> Any:
    """Any audio file as a 16 kHz mono float32 tensor (the same repair the manifest stage applies)."""
    import torch

    return torch.from_numpy(to_model_input(decode(Path(path).read_bytes())))


def _length(path: Path) -> float:
    try:
        return float(sf.info(str(path)).duration)  # header only
    except (sf.LibsndfileError, RuntimeError, OSError):
        return 0.0  # unreadable: load_audio raises the real error when its batch is loaded


def load_batch(paths: list[Path]) -> tuple[Any, Any]:
    """Zero-padded audio (batch, samples) with the true lengths."""
    import torch

    clips = [load_audio(p) for p in paths]
    lens = torch.tensor([len(c) for c in clips], dtype=torch.long)
    audios = torch.zeros(len(clips), int(lens.max()))
    for i, clip in enumerate(clips):
        audios[i, : len(clip)] = clip
    return audios, lens


def generate_ids(model: Any, audios: Any, lens: Any, max_new_tokens: int, min_new_tokens: int = 0) -> Any:
    """Greedy new token ids (batch, tokens) for a padded audio batch, with the training prompt."""
    import torch

    from medasr.model import PROMPT

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
    """Greedy transcripts, in input order.

    Batches per `plan_batches` (`batch_tokens`: a budget of LLM positions per batch, each clip costing its audio
    frames + prompt + `max_new_tokens`), and the next batch is read and resampled in a thread while the model
    decodes the current one. `min_new_tokens` > 0 suppresses the end token until then: benchmarks use it to force
    a realistic output length from random weights."""
    fixed = prompt_tokens(model) + max_new_tokens if batch_tokens is not None else 0
    planned = plan_batches([_length(p) for p in paths], batch_size, batch_tokens, fixed)
    batches = [[paths[i] for i in b] for b in planned]
    was_training = model.training
    model.eval()
    eos = model.text_eos_id
    texts: list[str] = []
    try:
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
    finally:
        model.train(was_training)
    out = [""] * len(paths)
    for i, text in zip((i for b in planned for i in b), texts, strict=True):
        out[i] = text
    return out
