"""Batched greedy transcription with a SALM: one prompt, identical in validation, eval and `medasr transcribe`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.audio import decode, to_model_input


def load_audio(path: Path) -> Any:
    """Any audio file as a 16 kHz mono float32 tensor (the same repair the manifest stage applies)."""
    import torch

    return torch.from_numpy(to_model_input(decode(Path(path).read_bytes())))


def transcribe(model: Any, paths: list[Path], batch_size: int, max_new_tokens: int = 128) -> list[str]:
    """Greedy transcripts, in input order. Audio is batched (zero-padded, with true lengths)."""
    import torch

    from stages.model import PROMPT

    was_training = model.training
    model.eval()
    out: list[str] = []
    eos = model.text_eos_id
    try:
        for start in range(0, len(paths), batch_size):
            clips = [load_audio(p) for p in paths[start : start + batch_size]]
            lens = torch.tensor([len(c) for c in clips], dtype=torch.long)
            audios = torch.zeros(len(clips), int(lens.max()))
            for i, clip in enumerate(clips):
                audios[i, : len(clip)] = clip
            prompts = [[{"role": "user", "content": PROMPT}] for _ in clips]
            with torch.inference_mode():
                ids = model.generate(
                    prompts=prompts,
                    audios=audios.to(model.device, dtype=next(model.perception.parameters()).dtype),
                    audio_lens=lens.to(model.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                )
            for row in ids.tolist():
                if eos in row:
                    row = row[: row.index(eos)]
                out.append(model.tokenizer.ids_to_text(row).strip())
    finally:
        model.train(was_training)
    return out
