"""eval stage: the base model and the fine-tuned model transcribe the same audio, scored the same way.

Reads `eval.*` (plus `model.*`, `lora.*`, `train.seed` to rebuild the base), `data/manifests/{val,train}.json`,
the test sets prepared under `data/testsets/` and `models/canary-qwen-medical-lora/`. Writes the DVC metric
`metrics/eval.json`, one block per audio set: `val` (the split that also picked the checkpoint), `test.<name>` for
each of `eval.test_sets` (the headline: audio training never saw) and `train_sample` (`eval.train_sample` training
clips, picked by a hash of their ids; absent when 0): its gap to `val` shows over-fitting, and a poor score there
means targets, prompt or decoding disagree with training. Each block holds `finetuned` and `base` (WER, CER, raw
WER, error counts, medical-term WER, RTFx) and `wer_reduction`, so `dvc metrics diff` shows the gain per set.
`runtime` records where and in what each model ran: both run on the accelerator when there is one, in the
precision the model was trained in (medasr.json), and RTFx is measured there; the dtypes are observed during
decoding, not assumed. `metrics/predictions.jsonl` has one row per utterance, model and set. Decoding is batched
and greedy with the training prompt; WER is corpus-level on text normalised by medasr/scoring.py.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from medasr import StageError
from medasr.export import model_precision
from medasr.files import jsonl, read_jsonl, write_json_atomic, write_text_atomic
from medasr.inference import observed_dtypes, transcribe
from medasr.log import get_logger
from medasr.params import EvalParams, LoraParams, ModelParams
from medasr.paths import (
    EVAL_METRICS,
    MANIFEST_DIR,
    MODEL_DIR,
    PREDICTIONS,
    TESTSETS_DIR,
    split_manifest,
    testset_manifest,
)
from medasr.scoring import score_utterances

log = get_logger(__name__)


def evaluate(model: Any, name: str, rows: list[dict[str, Any]], base: Path, ev: EvalParams) -> tuple[dict, list[dict]]:
    """Decode every row with `model` and score it; unreadable audio is counted, not fatal."""
    readable = [row for row in rows if (base / row["audio_filepath"]).is_file()]
    started = _clock(model)
    hypotheses = transcribe(model, [base / r["audio_filepath"] for r in readable], ev.batch_size, ev.max_new_tokens)
    seconds = _clock(model) - started
    references = [r["text"] for r in readable]
    metrics, normalized, alignments = score_utterances(references, hypotheses)
    predictions = [
        {
            "id": row["id"],
            "model": name,
            "reference": row["text"],
            "hypothesis": hyp,
            "reference_norm": ref_norm,
            "hypothesis_norm": hyp_norm,
            "duration": row["duration"],
            "substitutions": a.substitutions,
            "deletions": a.deletions,
            "insertions": a.insertions,
            "reference_words": a.reference_words,
            "medical_term_errors": a.medical_term_errors,
            "medical_terms": a.medical_terms,
        }
        for row, hyp, (ref_norm, hyp_norm), a in zip(readable, hypotheses, normalized, alignments, strict=True)
    ]
    term_errors, term_total = sum(a.medical_term_errors for a in alignments), sum(a.medical_terms for a in alignments)
    audio_seconds = sum(r["duration"] for r in readable)
    metrics |= {
        "medical_term_wer": term_errors / term_total if term_total else None,
        "medical_terms": term_total,
        "skipped_audio": len(rows) - len(readable),
        "audio_seconds": round(audio_seconds, 3),
        "rtfx": round(audio_seconds / seconds, 2) if seconds > 0 else None,
    }
    return metrics, predictions


def compare(
    models: dict[str, Any], audio_set: str, rows: list[dict[str, Any]], base: Path, ev: EvalParams
) -> tuple[dict, list[dict]]:
    """Both models on one manifest's rows (audio paths relative to `base`): their metrics side by side, the WER
    gain, and the tagged predictions."""
    block: dict[str, Any] = {}
    predictions = []
    for name, model in models.items():
        block[name], preds = evaluate(model, name, rows, base, ev)
        predictions += [{**row, "set": audio_set} for row in preds]
        log.info("%s, %s: WER %s on %d utterances", audio_set, name, _pct(block[name]["wer"]), len(rows))
    wers = (block["base"]["wer"], block["finetuned"]["wer"])
    block["wer_reduction"] = None if None in wers else wers[0] - wers[1]
    return block, predictions


def run(
    ev: EvalParams,
    model_p: ModelParams,
    lora: LoraParams,
    seed: int,
    manifest_dir: Path = MANIFEST_DIR,
    testsets_dir: Path = TESTSETS_DIR,
    model_dir: Path = MODEL_DIR,
    metrics_file: Path = EVAL_METRICS,
    predictions_file: Path = PREDICTIONS,
) -> dict[str, Any]:
    """`seed` is train.seed: the base model is the preset built with the seed training started from."""
    manifest = split_manifest("val", manifest_dir)
    val_rows = read_jsonl(manifest) if manifest.is_file() else []
    if not val_rows:
        raise StageError(f"{manifest} is missing or empty: nothing to evaluate (raise subset.val_size)")
    train_manifest = split_manifest("train", manifest_dir)
    if ev.train_sample and not train_manifest.is_file():
        raise StageError(f"{train_manifest} is missing but eval.train_sample={ev.train_sample}: set it to 0")
    test_manifests = {ts.name: testset_manifest(ts.name, testsets_dir) for ts in ev.test_sets}
    missing = [str(m) for m in test_manifests.values() if not m.is_file()]
    if missing:  # before loading any model
        raise StageError(f"missing {', '.join(missing)}: run `medasr testsets` (or `dvc repro testsets`) first")
    precision = model_precision(model_dir)  # also refuses a missing model folder, before any model loads

    from medasr.device import place
    from medasr.export import load_model, read_meta
    from medasr.model import base_model

    models = {
        "finetuned": place(load_model(model_dir), precision),
        "base": place(base_model(model_p, lora, seed, read_meta(model_dir)["base"]), precision),
    }
    metrics: dict[str, Any] = {"test": {}}
    with ExitStack() as hooks:
        runtime = {name: hooks.enter_context(observed_dtypes(model)) for name, model in models.items()}
        metrics["val"], predictions = compare(models, "val", val_rows, manifest.parent, ev)
        for name, test_manifest in test_manifests.items():
            metrics["test"][name], preds = compare(models, name, read_jsonl(test_manifest), test_manifest.parent, ev)
            predictions += preds
        if ev.train_sample:
            sample = pick_sample(read_jsonl(train_manifest), ev.train_sample)
            metrics["train_sample"], preds = compare(models, "train_sample", sample, train_manifest.parent, ev)
            predictions += preds
    metrics["runtime"] = {"precision": precision, **runtime}
    write_text_atomic(predictions_file, jsonl(predictions))
    write_json_atomic(metrics_file, metrics)
    return metrics


def pick_sample(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`n` rows picked by a hash of their ids: the same clips on every run, a pick unrelated to the manifest's id
    order (which can group one speaker or one recording's sections), and adding rows only swaps one in by chance."""
    return sorted(rows, key=lambda row: hashlib.sha256(str(row["id"]).encode()).hexdigest())[:n]


def _clock(model: Any) -> float:
    """The time once the model's device has finished the work queued on it (CUDA kernels run asynchronously)."""
    if model.device.type == "cuda":
        import torch

        torch.cuda.synchronize(model.device)
    return time.perf_counter()


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
