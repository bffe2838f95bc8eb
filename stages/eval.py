"""eval stage: the base model and the fine-tuned model transcribe the same held-out audio, scored the same way.

Reads `eval.*` (plus `model.*`, `lora.*`, `train.seed` to rebuild the base), `data/manifests/val.json`, the test
sets prepared under `data/testsets/` and `models/canary-qwen-medical-lora/`. Writes the DVC metric
`metrics/eval.json`, one block per audio set: `val` (the split that also picked the checkpoint) and
`test.<name>` for each of `eval.test_sets` (the headline: audio training never saw). Each block holds `finetuned`
and `base` (WER, CER, raw WER, error counts, medical-term WER, RTFx) and `wer_reduction`, so `dvc metrics diff`
shows the gain per set. `metrics/predictions.jsonl` has one row per utterance, model and set. Decoding is batched
and greedy with the training prompt; WER is corpus-level on text normalised by stages/scoring.py.
"""

from __future__ import annotations

import time
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from stages import StageError, testsets
from stages.files import jsonl, read_jsonl, write_json_atomic, write_text_atomic
from stages.log import get_logger
from stages.params import Params
from stages.scoring import normalize, score

log = get_logger(__name__)

MANIFEST = Path("data/manifests/val.json")
TESTSETS_DIR = testsets.TESTSETS_DIR
MODEL_DIR = Path("models/canary-qwen-medical-lora")
METRICS_FILE = Path("metrics/eval.json")
PREDICTIONS_FILE = Path("metrics/predictions.jsonl")


@lru_cache(maxsize=1)
def medical_terms() -> frozenset[str]:
    text = resources.files("stages.resources").joinpath("medical_terms.txt").read_text(encoding="utf-8")
    return frozenset(w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#"))


def medical_term_errors(reference_norm: str, hypothesis_norm: str) -> tuple[int, int]:
    """(lexicon words in the reference that were not recognised exactly, lexicon words in the reference)."""
    import jiwer

    ref = reference_norm.split()
    terms = medical_terms()
    total = sum(1 for w in ref if w in terms)
    if not total:
        return 0, 0
    correct = 0
    alignment = jiwer.process_words(reference_norm, hypothesis_norm or "")
    for chunk in alignment.alignments[0]:
        if chunk.type == "equal":
            correct += sum(1 for w in ref[chunk.ref_start_idx : chunk.ref_end_idx] if w in terms)
    return total - correct, total


def utterance_errors(reference_norm: str, hypothesis_norm: str) -> dict[str, int]:
    import jiwer

    if not reference_norm:
        return {"substitutions": 0, "deletions": 0, "insertions": len(hypothesis_norm.split()), "reference_words": 0}
    words = jiwer.process_words(reference_norm, hypothesis_norm or "")
    return {
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "reference_words": len(reference_norm.split()),
    }


def evaluate(model: Any, name: str, rows: list[dict[str, Any]], base: Path, p: Params) -> tuple[dict, list[dict]]:
    """Decode every row with `model` and score it; unreadable audio is counted, not fatal."""
    from stages.inference import transcribe

    readable, skipped = [], 0
    for row in rows:
        if (base / row["audio_filepath"]).is_file():
            readable.append(row)
        else:
            skipped += 1
    started = time.perf_counter()
    hypotheses = transcribe(
        model, [base / r["audio_filepath"] for r in readable], p.eval.batch_size, p.eval.max_new_tokens
    )
    seconds = time.perf_counter() - started
    references = [r["text"] for r in readable]
    metrics = score(references, hypotheses)
    term_errors = term_total = 0
    predictions = []
    for row, hyp in zip(readable, hypotheses, strict=True):
        ref_norm, hyp_norm = normalize(row["text"]), normalize(hyp)
        errors, total = medical_term_errors(ref_norm, hyp_norm)
        term_errors, term_total = term_errors + errors, term_total + total
        predictions.append(
            {
                "id": row["id"],
                "model": name,
                "reference": row["text"],
                "hypothesis": hyp,
                "reference_norm": ref_norm,
                "hypothesis_norm": hyp_norm,
                "duration": row["duration"],
                **utterance_errors(ref_norm, hyp_norm),
                "medical_term_errors": errors,
                "medical_terms": total,
            }
        )
    audio_seconds = sum(r["duration"] for r in readable)
    metrics |= {
        "medical_term_wer": term_errors / term_total if term_total else None,
        "medical_terms": term_total,
        "skipped_audio": skipped,
        "audio_seconds": round(audio_seconds, 3),
        "rtfx": round(audio_seconds / seconds, 2) if seconds > 0 else None,
    }
    return metrics, predictions


def compare(
    models: dict[str, Any], audio_set: str, rows: list[dict[str, Any]], base: Path, p: Params
) -> tuple[dict, list[dict]]:
    """Both models on one manifest's rows (audio paths relative to `base`): their metrics side by side, the WER
    gain, and the tagged predictions."""
    block: dict[str, Any] = {}
    predictions = []
    for name, model in models.items():
        block[name], preds = evaluate(model, name, rows, base, p)
        predictions += [{**row, "set": audio_set} for row in preds]
        log.info("%s, %s: WER %s on %d utterances", audio_set, name, _pct(block[name]["wer"]), len(rows))
    wers = (block["base"]["wer"], block["finetuned"]["wer"])
    block["wer_reduction"] = None if None in wers else wers[0] - wers[1]
    return block, predictions


def run(
    p: Params,
    manifest: Path = MANIFEST,
    model_dir: Path = MODEL_DIR,
    metrics_file: Path = METRICS_FILE,
    predictions_file: Path = PREDICTIONS_FILE,
    testsets_dir: Path = TESTSETS_DIR,
) -> dict[str, Any]:
    val_rows = read_jsonl(manifest) if manifest.is_file() else []
    if not val_rows:
        raise StageError(f"{manifest} is missing or empty: nothing to evaluate (raise subset.val_size)")
    test_manifests = testsets.manifests(p, testsets_dir)
    missing = [str(m) for m in test_manifests.values() if not m.is_file()]
    if missing:  # before loading any model
        raise StageError(f"missing {', '.join(missing)}: run `medasr testsets` (or `dvc repro testsets`) first")

    from stages.model import base_model, load_model

    models = {"finetuned": load_model(model_dir), "base": base_model(p.model, p.lora, p.train.seed)}
    metrics: dict[str, Any] = {"test": {}}
    metrics["val"], predictions = compare(models, "val", val_rows, manifest.parent, p)
    for name, test_manifest in test_manifests.items():
        metrics["test"][name], preds = compare(models, name, read_jsonl(test_manifest), test_manifest.parent, p)
        predictions += preds
    write_text_atomic(predictions_file, jsonl(predictions))
    write_json_atomic(metrics_file, metrics)
    return metrics


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
