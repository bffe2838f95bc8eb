"""eval stage: the base model and the fine-tuned model transcribe the same held-out audio, scored the same way.

Reads `eval.*` (plus `model.*`, `lora.*`, `train.seed` to rebuild the base), `data/manifests/val.json`, the test
sets prepared under `data/testsets/` and `models/canary-qwen-medical-lora/`. Writes the DVC metric
`metrics/eval.json`, one block per audio set: `val` (the split that also picked the checkpoint) and
`test.<name>` for each of `eval.test_sets` (the headline: audio training never saw). Each block holds `finetuned`
and `base` (WER, CER, raw WER, error counts, medical-term WER, RTFx) and `wer_reduction`, so `dvc metrics diff`
shows the gain per set. `metrics/predictions.jsonl` has one row per utterance, model and set. Decoding is batched
and greedy with the training prompt; WER is corpus-level on text normalised by medasr/scoring.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medasr import StageError
from medasr.files import jsonl, read_jsonl, write_json_atomic, write_text_atomic
from medasr.inference import transcribe
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
    started = time.perf_counter()
    hypotheses = transcribe(model, [base / r["audio_filepath"] for r in readable], ev.batch_size, ev.max_new_tokens)
    seconds = time.perf_counter() - started
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
    test_manifests = {ts.name: testset_manifest(ts.name, testsets_dir) for ts in ev.test_sets}
    missing = [str(m) for m in test_manifests.values() if not m.is_file()]
    if missing:  # before loading any model
        raise StageError(f"missing {', '.join(missing)}: run `medasr testsets` (or `dvc repro testsets`) first")

    from medasr.export import load_model
    from medasr.model import base_model

    models = {"finetuned": load_model(model_dir), "base": base_model(model_p, lora, seed)}
    metrics: dict[str, Any] = {"test": {}}
    metrics["val"], predictions = compare(models, "val", val_rows, manifest.parent, ev)
    for name, test_manifest in test_manifests.items():
        metrics["test"][name], preds = compare(models, name, read_jsonl(test_manifest), test_manifest.parent, ev)
        predictions += preds
    write_text_atomic(predictions_file, jsonl(predictions))
    write_json_atomic(metrics_file, metrics)
    return metrics


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
