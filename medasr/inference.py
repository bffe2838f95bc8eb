"""Batched greedy transcription with a SALM: one prompt, identical in validation, eval and `medasr transcribe`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import soundfile as sf

from medasr.audio import decode, to_model_input


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
            audios=audios.to(model.device, dtype=next(model.perception.parameters()).dtype),
            audio_lens=lens.to(model.device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
        )


def transcribe(
    model: Any, paths: list[Path], batch_size: int, max_new_tokens: int = 128, min_new_tokens: int = 0
) -> list[str]:
    """Greedy transcripts, in input order.

    Clips are batched by length (a batch of similar lengths wastes little on padding), and the next batch is
    read and resampled in a thread while the model decodes the current one. `min_new_tokens` > 0 suppresses the
    end token until then: benchmarks use it to force a realistic output length from random weights."""
    order = sorted(range(len(paths)), key=lambda i: _length(paths[i]))
    batches = [[paths[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
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
    for i, text in zip(order, texts, strict=True):
        out[i] = text
    return out
