"""eval stage: the base model and the fine-tuned model transcribe the same audio, scored the same way.

Reads `eval.*` (plus `model.*`, `lora.*`, `train.seed` to rebuild the base), `data/manifests/{val,train}.json`,
the test sets prepared under `data/testsets/` and `models/canary-qwen-medical-lora/`. Writes the DVC metric
`metrics/eval.json`, one block per audio set: `val` (the split that also picked the checkpoint), `test.<name>` for
each of `eval.test_sets` (the headline: audio training never saw) and `train_sample` (`eval.train_sample` training
clips, picked by a hash of their ids; absent when 0): its gap to `val` shows over-fitting, and a poor score there
means targets, prompt or decoding disagree with training. Each block holds `finetuned` and `base` (WER with its 95 %
interval `wer_ci`, CER, raw WER, error counts, medical-term WER and `term_categories`, utterances flagged as likely
hallucinated, windows decoded, RTFx), `wer_reduction` with `wer_reduction_ci` (paired bootstrap: medasr.evidence),
and the set's `kind` and `long_form` (a test set's also its source: `dataset`, `config`, `split`, `revision`, `hub`),
so `dvc metrics diff` shows the gain per set. `summary` pools the test sets by kind, each source once (a recording
scored by utterance and long-form counts once): the medical gain and the general forgetting check; the headline
sentence is drawn from it where people read it (medasr.report). `runtime` records which model was scored (`model`:
medasr.json's fingerprint and step) and where and in what each model ran: both run on the accelerator when there is
one, in the precision the model was trained in (medasr.json), and RTFx is measured there; the dtypes are observed
during decoding, not assumed. Audio that is missing or does not decode is counted (`skipped_audio`), not fatal.
`metrics/predictions.jsonl` has one row per utterance (recording, for a long-form set), model and set;
`metrics/report.md` and the WER plot's rows are drawn from both (medasr.report). Decoding is batched and greedy
with the training prompt, audio longer than eval.chunk_s in overlapping windows; WER is corpus-level on text
normalised by medasr/scoring.py.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from medasr import StageError, report
from medasr.audio import audio_problem, map_clips
from medasr.clips import speaker_role
from medasr.evidence import add_intervals, summary
from medasr.export import model_identity, model_precision
from medasr.files import jsonl, read_jsonl, write_json_atomic, write_text_atomic
from medasr.inference import observed_dtypes, transcribe_long
from medasr.log import get_logger
from medasr.longform import window_plans
from medasr.params import EvalParams, LoraParams, ModelParams, TestSetParams
from medasr.paths import (
    EVAL_METRICS,
    MANIFEST_DIR,
    MODEL_DIR,
    PREDICTIONS,
    REPORT,
    SOURCE_INFO,
    TESTSETS_DIR,
    WER_PLOT,
    split_manifest,
    testset_manifest,
)
from medasr.scoring import hallucination_flags, score_utterances
from medasr.terms import category_metrics, term_categories

log = get_logger(__name__)


def evaluate(
    model: Any,
    name: str,
    readable: list[dict[str, Any]],
    base: Path,
    ev: EvalParams,
    long_form: bool = False,
    skipped: int = 0,
) -> tuple[dict, list[dict]]:
    """Decode every row (its audio readable: `readable_rows`) with `model`, audio longer than eval.chunk_s in
    windows, and score it; `skipped`: the set's rows left out as unreadable audio."""
    paths = [base / r["audio_filepath"] for r in readable]
    started = _clock(model)
    done = transcribe_long(model, paths, ev.batch_size, ev.max_new_tokens, ev.chunk_s, ev.chunk_overlap_s)
    seconds = _clock(model) - started
    hypotheses = [t.text for t in done]
    metrics, normalized, alignments = score_utterances([r["text"] for r in readable], hypotheses)
    predictions = [
        {
            "id": row["id"],
            "model": name,
            "reference": row["text"],
            "hypothesis": t.text,
            "reference_norm": ref_norm,
            "hypothesis_norm": hyp_norm,
            "duration": row["duration"],
            "substitutions": a.substitutions,
            "deletions": a.deletions,
            "insertions": a.insertions,
            "reference_words": a.reference_words,
            "medical_term_errors": a.medical_term_errors,
            "medical_terms": a.medical_terms,
            "windows": t.windows,
            "role": speaker_role(str(row["id"])),
            "long_form": long_form,
            "ref_terms": list(a.ref_terms),
            "missed_terms": list(a.missed_terms),
            "inserted_terms": list(a.inserted_terms),
            "hallucination": hallucination_flags(hyp_norm, row["duration"]),
        }
        for row, t, (ref_norm, hyp_norm), a in zip(readable, done, normalized, alignments, strict=True)
    ]
    term_errors, term_total = sum(a.medical_term_errors for a in alignments), sum(a.medical_terms for a in alignments)
    audio_seconds = sum(r["duration"] for r in readable)
    metrics |= {
        "medical_term_wer": term_errors / term_total if term_total else None,
        "medical_terms": term_total,
        "skipped_audio": skipped,
        "audio_seconds": round(audio_seconds, 3),
        "rtfx": round(audio_seconds / seconds, 2) if seconds > 0 else None,
        "term_categories": category_metrics(alignments),
        "hallucinated": sum(1 for p in predictions if p["hallucination"]),
        "windows": sum(t.windows for t in done),
    }
    return metrics, predictions


def compare(
    models: dict[str, Any],
    audio_set: str,
    rows: list[dict[str, Any]],
    base: Path,
    ev: EvalParams,
    kind: str = "medical",
    long_form: bool = False,
) -> tuple[dict, list[dict]]:
    """Both models on one manifest's rows (audio paths relative to `base`): their metrics side by side, the WER
    gain with its paired-bootstrap interval, and the tagged predictions."""
    block: dict[str, Any] = {"kind": kind, "long_form": long_form}
    predictions = []
    readable = readable_rows(audio_set, rows, base)
    # each file's windows planned (VAD) once, here, untimed: RTFx measures decoding, and both models share one plan
    window_plans([base / row["audio_filepath"] for row in readable], ev.chunk_s, ev.chunk_overlap_s)
    for name, model in models.items():
        block[name], preds = evaluate(model, name, readable, base, ev, long_form, len(rows) - len(readable))
        predictions += [{**row, "set": audio_set} for row in preds]
        log.info("%s, %s: WER %s on %d utterances", audio_set, name, _pct(block[name]["wer"]), len(readable))
    wers = (block["base"]["wer"], block["finetuned"]["wer"])
    block["wer_reduction"] = None if None in wers else wers[0] - wers[1]
    return add_intervals(block, predictions, ev.bootstrap_resamples, ev.bootstrap_seed), predictions


def readable_rows(audio_set: str, rows: list[dict[str, Any]], base: Path) -> list[dict[str, Any]]:
    """The rows whose audio decodes as the model will read it; a missing or corrupt file is left out with a warning
    (counted as `skipped_audio`), so one bad file never ends an eval run."""

    ok = list(map_clips(lambda row: audio_problem(base / row["audio_filepath"]) is None, rows))
    if bad := [str(row["id"]) for row, good in zip(rows, ok, strict=True) if not good]:
        log.warning("%s: %d unreadable audio file(s) skipped: %s", audio_set, len(bad), ", ".join(bad[:5]))
    return [row for row, good in zip(rows, ok, strict=True) if good]


def source(ts: TestSetParams, manifest: Path) -> dict[str, Any]:
    """What a test set read (its source.json from the testsets stage, hub-only keys null for a local source), so
    eval's summary pools each source once and export's model-index names it; `hub`: a hub dataset id."""
    info_file = manifest.parent / SOURCE_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    fields = {key: info.get(key, getattr(ts, key)) for key in ("dataset", "config", "split", "revision")}
    return fields | {"hub": info.get("kind") == "hub" or bool(info.get("hub_snapshot"))}


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
    report_file: Path = REPORT,
    plot_file: Path = WER_PLOT,
) -> dict[str, Any]:
    """`seed` is train.seed: the base model is the preset built with the seed training started from."""
    term_categories()  # an empty or missing category file: one line, before any model loads
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
        test_rows = []
        for ts in ev.test_sets:
            where = test_manifests[ts.name]
            block, preds = compare(models, ts.name, read_jsonl(where), where.parent, ev, ts.kind, ts.long_form)
            metrics["test"][ts.name] = block | source(ts, where)
            test_rows += preds
        predictions += test_rows
        if ev.train_sample:
            sample = pick_sample(read_jsonl(train_manifest), ev.train_sample)
            metrics["train_sample"], preds = compare(models, "train_sample", sample, train_manifest.parent, ev)
            predictions += preds
    metrics["summary"] = summary(metrics["test"], test_rows, ev.bootstrap_resamples, ev.bootstrap_seed)
    metrics["runtime"] = {"precision": precision, "model": model_identity(model_dir), **runtime}
    write_text_atomic(predictions_file, jsonl(predictions))
    write_text_atomic(report_file, report.render(metrics, predictions))
    write_json_atomic(plot_file, report.plot_rows(metrics))
    write_json_atomic(metrics_file, metrics)  # last: DVC's metric, whole or the previous one
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
