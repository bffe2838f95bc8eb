"""train stage: LoRA fine-tune of a SALM on the manifests, resumable from its own checkpoints.

Reads `model.*`, `lora.*`, `train.*` and `data/manifests/`. Writes `models/canary-qwen-medical-lora/` (see
medasr/model.py `export`) and the DVC metric `metrics/train.json`. Checkpoints go to `checkpoints/train/<fp>/`,
git-ignored and not a DVC output, where `<fp>` fingerprints everything that decides the weights at a given step.

Resume: on start, the newest complete checkpoint under the current fingerprint is used (a corrupt one is skipped
with a warning, falling back to the previous one), else the newest intact one mirrored to the DVC remote; anything
else starts fresh, with what the run folder held moved aside. A checkpoint that could not be read (disk or network
error, after retries) fails the stage instead: the loop around it retries, never starting over. Checkpoints of
fingerprints no longer trained are pruned to `train.keep_fingerprints` runs, here and, under runpod.sh's loop (which
holds the lease), on the remote, never a run used there within the lease's TTL. A checkpoint restores weights,
optimizer, LR schedule, step, RNG and the data position, so a resumed run ends with the same weights as an
uninterrupted one (stages/train/checkpoints.py, callback.py, data.py).

Training runs through NeMo's DataModule + SALMDataset and a Lightning Trainer: CPU fp32 here, bf16 on GPUs, DDP
over `train.devices` ranks (stages/train/config.py). Nothing is CUDA-specific, and every rank stays in the process
group DVC starts, so a signal to the group reaches all of them. Under DDP, Lightning's launcher re-runs this
command per rank once rank 0 reaches `trainer.fit`: rank 0 alone picks the checkpoint (and may delete or download),
hands its choice over (checkpoints.hand_over), mirrors, validates, exports and writes metrics.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from medasr import StageError
from medasr.export import export
from medasr.files import atomic_dir, read_jsonl, write_json_atomic
from medasr.log import get_logger
from medasr.model import base_description, build_model
from medasr.ops.mirror import Uploader, open_mirror
from medasr.params import LoraParams, ModelParams, TrainParams
from medasr.paths import (
    BEST_DIR,
    CHECKPOINT_META,
    CHECKPOINT_ROOT,
    CHECKPOINT_STATE,
    MANIFEST_DIR,
    MODEL_DIR,
    TRAIN_CURVES_DIR,
    TRAIN_METRICS,
    TRAINED_WEIGHTS,
    split_manifest,
)
from medasr.tracking import loggers, publish_curves
from stages.train.checkpoints import (
    data_hash,
    fingerprint,
    hand_over,
    handed_over,
    prune_fingerprints,
    rank_zero_checkpoint,
    resume_point,
    set_aside,
)
from stages.train.config import make_trainer, node_count, prepare_model, process_rank

log = get_logger(__name__)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _read_split(manifest_dir: Path, split: str) -> list[dict[str, Any]]:
    path = split_manifest(split, manifest_dir)
    return read_jsonl(path) if path.is_file() else []


def run(
    model_p: ModelParams,
    lora: LoraParams,
    train: TrainParams,
    manifest_dir: Path = MANIFEST_DIR,
    ckpt_root: Path = CHECKPOINT_ROOT,
    model_dir: Path = MODEL_DIR,
    metrics_file: Path = TRAIN_METRICS,
    curves_dir: Path = TRAIN_CURVES_DIR,
    mirror_checkpoints: bool = True,
    val_max_new_tokens: int = 128,
    fresh: bool = False,
) -> dict[str, Any]:
    """Train; under DDP every rank runs this (Lightning's launcher re-runs the command), rank 0 alone sets up
    resume and writes. `val_max_new_tokens`: eval's decode limit, so validation WER is eval's WER."""
    import torch

    from medasr.device import resolve_devices, resolve_precision

    gpu = torch.cuda.is_available()
    devices, precision = resolve_devices(train.devices, gpu), resolve_precision(train.precision, gpu)
    nodes = node_count(devices)
    world_size, rank = devices * nodes, process_rank(devices)
    train_rows, val_rows = _read_split(manifest_dir, "train"), _read_split(manifest_dir, "val")
    if not train_rows:
        raise StageError(f"{split_manifest('train', manifest_dir)} is missing or empty: nothing to train on")
    if train.val_every and not val_rows:
        raise StageError(
            f"{split_manifest('val', manifest_dir)} is empty but train.val_every={train.val_every}: set it to 0"
        )
    if train.optimizer == "adamw8bit" and not gpu:
        raise StageError("train.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on this machine")
    # Lightning and NeMo load only now (10+ s): the checks above cost next to nothing
    from lightning import seed_everything

    from stages.train.callback import StopRequest, TrainingCallback, TrainingInterrupted, ValSet, stop_on_signals
    from stages.train.data import make_datamodule

    started = time.time()
    handed = handed_over() if rank else None
    data_sha256 = handed["data_sha256"] if handed else data_hash(manifest_dir)
    fp = fingerprint(model_p, lora, train, data_sha256, world_size=world_size, precision=precision)
    run_dir = ckpt_root / fp
    uploader = None
    if rank == 0:
        mirror = open_mirror(fp) if mirror_checkpoints else None
        if fresh:  # `--fresh`: this fingerprint's checkpoints, here and mirrored, moved aside
            set_aside(run_dir, mirror)
        resume, source = resume_point(run_dir, fp, mirror)
        prune_fingerprints(run_dir, mirror, train.keep_fingerprints)  # only now: a failed restore prunes nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        uploader = Uploader(mirror, train.keep_checkpoints) if mirror else None
        if world_size > 1:
            hand_over(data_sha256, resume)
    else:  # never repeats rank 0's setup: no deleting, no download, no uploader
        resume, source = rank_zero_checkpoint(run_dir, fp, handed), "rank 0's"
    log.info("fingerprint %s: %s", fp, f"resuming from step {resume.step} ({source})" if resume else "starting fresh")
    stop = StopRequest()
    seed_everything(train.seed, workers=True)
    work_dir = run_dir if rank == 0 else Path(tempfile.mkdtemp(prefix=f"medasr-rank{rank}-"))  # files it generates
    model = build_model(model_p, lora, train.seed, work_dir)
    trainable = prepare_model(model, train, gpu)
    datamodule = make_datamodule(model, manifest_dir, train)
    datamodule.position = (resume.meta["epoch"], resume.meta["epoch_batches"]) if resume else None
    val_rows = val_rows[: train.val_max_utts]
    val = ValSet(
        [manifest_dir / r["audio_filepath"] for r in val_rows],
        [r["text"] for r in val_rows],
        val_max_new_tokens,
        [r["id"] for r in val_rows],
    )
    callback = TrainingCallback(train, fp, run_dir, val if train.val_every else None, uploader, stop)
    run_config = {"model": model_p.model_dump(), "lora": lora.model_dump(), "train": train.model_dump()}
    trackers: Any = False
    wandb_run = None
    if rank == 0:
        trackers, wandb_run = loggers(
            model_p.preset, lora.rank, run_config, run_dir, fp, resume.step if resume else None
        )
    trainer = make_trainer(train, gpu, devices, [callback], trackers, nodes)
    if resume and resume.step >= train.max_steps:
        log.info("checkpoint at step %d already reaches max_steps=%d: exporting it", resume.step, train.max_steps)
    with stop_on_signals(stop):
        try:
            trainer.fit(model, datamodule, ckpt_path=str(resume.path / CHECKPOINT_STATE) if resume else None)
        except BaseException as exc:
            # rank 0 failing alone (out of memory in validation, a full disk) would leave the other ranks waiting
            # in a collective, holding their GPUs, until the process group times out (30 min)
            if world_size > 1 and rank == 0 and not isinstance(exc, TrainingInterrupted):
                kill = getattr(getattr(trainer.strategy, "launcher", None), "kill", None)
                if kill is not None:
                    kill(signal.SIGKILL)
            raise
    if rank != 0:
        shutil.rmtree(work_dir, ignore_errors=True)
        return {}
    if wandb_run is not None:
        import wandb

        wandb.finish()
    publish_curves(run_dir, curves_dir)
    if uploader is not None and not uploader.drain(train.stop_grace_s):
        log.warning("the last checkpoint was not mirrored within %ss", train.stop_grace_s)

    best = run_dir / BEST_DIR / TRAINED_WEIGHTS
    exported_from, exported_step = "last", trainer.global_step
    if train.val_every and best.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(best)), strict=False)
        exported_from = "best"
        exported_step = int(json.loads((run_dir / BEST_DIR / CHECKPOINT_META).read_text())["step"])
    meta = {
        "preset": model_p.preset,
        "base": base_description(model_p),
        "lora": lora.model_dump(),
        "trainable": list(model_p.trainable),
        "seed": train.seed,
        "precision": precision,  # eval runs the model in the precision it was trained in
        "world_size": world_size,
        "step": exported_step,
        "fingerprint": fp,
        "data_sha256": data_sha256,
        "git_commit": _git_commit(),
        "wandb": wandb_run,
        "params": run_config,
    }
    with atomic_dir(model_dir) as tmp:
        # only the canary preset can rebuild its base from a pinned checkpoint; the others ship their full weights
        export(model, tmp, meta, self_contained=model_p.preset != "canary-qwen-2.5b")
    metrics = {
        "global_step": trainer.global_step,
        "train_loss": callback.last_loss,
        "resumed_from_step": resume.step if resume else 0,
        "resume_source": source,
        "trainable_params": trainable,
        "precision": precision,
        "world_size": world_size,
        "exported_step": exported_step,
        "exported_from": exported_from,
        "best_val_wer": callback.best_wer,
        "first_step": callback.first_step[0] if callback.first_step else None,
        "first_step_s": callback.first_step[1] if callback.first_step else None,
        "wall_time_s": round(time.time() - started, 1),
    }
    write_json_atomic(metrics_file, metrics)
    log.info("exported %s (step %d, %s) to %s", model_p.preset, exported_step, exported_from, model_dir)
    return metrics
