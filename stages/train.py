"""train stage: LoRA fine-tune of a SALM on the manifests, resumable from its own checkpoints.

Reads `model.*`, `lora.*`, `train.*` and `data/manifests/`. Writes `models/canary-qwen-medical-lora/` (see
stages/model.py `export`) and the DVC metric `metrics/train.json`. Checkpoints go to `checkpoints/train/<fp>/`,
git-ignored and not a DVC output, where `<fp>` fingerprints everything that decides the weights at a given step.

Resume: on start, the newest complete checkpoint under the current fingerprint is used (a corrupt one is skipped
with a warning, falling back to the previous one); anything else starts fresh. A checkpoint restores weights,
optimizer, LR schedule, step, RNG and the data position, so a resumed run ends with the same weights as an
uninterrupted one. The data position works because each epoch of NeMo's training stream is a seeded shuffle: resuming
at epoch E, batch N sets the lhotse sampler to epoch E and fast-forwards it N batches (metadata only, no audio)
as the training loader is built.

Training runs through NeMo's DataModule + SALMDataset and a Lightning Trainer: CPU fp32 here, bf16 on GPUs, DDP
across several GPUs. Nothing is CUDA-specific, and the process stays in the group DVC starts, so a signal to the
group reaches it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages import StageError
from stages.files import atomic_dir, read_jsonl, write_json_atomic, write_text_atomic
from stages.log import get_logger
from stages.params import Params
from stages.remote import Mirror, Uploader, open_mirror
from stages.tracking import CURVES_DIR

log = get_logger(__name__)

MANIFEST_DIR = Path("data/manifests")
CHECKPOINT_ROOT = Path("checkpoints/train")
MODEL_DIR = Path("models/canary-qwen-medical-lora")
METRICS_FILE = Path("metrics/train.json")
LATEST = "latest"
STATE = "state.ckpt"
META = "meta.json"  # written last: a checkpoint folder without it is incomplete
# Bumped whenever what a checkpoint holds changes: a checkpoint from another format is never resumed.
CHECKPOINT_FORMAT = 3

# train.* keys that do not change the weights at a given step, so they stay out of the fingerprint.
NOT_FINGERPRINTED = {
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "val_every",
    "val_max_utts",
    "early_stop_patience",
    "early_stop_delta",
    "stop_grace_s",
    "num_workers",  # decoding in workers or inline yields the same batches
}
# Files beside the checkpoints that travel with each one (to the remote and back): the W&B run id, the DVCLive
# history and the best-by-WER adapter.
EXTRAS = ("wandb_run_id", "dvclive", "best")


def copy_extras(src: Path, dst: Path) -> None:
    """Copy the files that travel with a checkpoint (EXTRAS) from `src` to `dst`, replacing what is there."""
    for extra in EXTRAS:
        if (src / extra).is_dir():
            shutil.rmtree(dst / extra, ignore_errors=True)
            shutil.copytree(src / extra, dst / extra)
        elif (src / extra).is_file():
            shutil.copy2(src / extra, dst / extra)


class TrainingInterrupted(SystemExit):
    """SIGTERM/SIGINT after the last checkpoint was saved (and mirrored): exit non-zero, so DVC never records an
    unfinished stage as done."""


def _digest_file(digest: Any, path: Path) -> Any:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def data_hash(manifest_dir: Path = MANIFEST_DIR) -> str:
    """sha256 over every file under the manifest folder (manifests and audio), in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in manifest_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(manifest_dir)).encode() + b"\0")
        _digest_file(digest, path)
    return digest.hexdigest()


def fingerprint(p: Params, data: str) -> str:
    """What a checkpoint must match to be resumed: model, LoRA, optimisation params, seed, data."""
    relevant = {
        "model": p.model.model_dump(),
        "lora": p.lora.model_dump(),
        "train": p.train.model_dump(exclude=NOT_FINGERPRINTED),
        "data": data,
        "checkpoint_format": CHECKPOINT_FORMAT,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]


def _sha256(path: Path) -> str:
    return _digest_file(hashlib.sha256(), path).hexdigest()


def find_resumable(run_dir: Path, fp: str) -> Checkpoint | None:
    """The newest valid checkpoint of this fingerprint: `latest` first, then older ones, skipping corrupt ones."""
    if not run_dir.is_dir():
        return None
    candidates = sorted((d for d in run_dir.glob("step-*") if d.is_dir()), reverse=True)
    latest = run_dir / LATEST
    if latest.is_file() and (pointed := run_dir / latest.read_text().strip()) in candidates:
        candidates.remove(pointed)
        candidates.insert(0, pointed)
    for folder in candidates:
        try:
            meta = json.loads((folder / META).read_text())
            if meta["fingerprint"] != fp:
                raise ValueError(f"fingerprint {meta['fingerprint']} is not this run's {fp}")
            if _sha256(folder / STATE) != meta["sha256"]:
                raise ValueError("state file does not match its recorded sha256 (truncated or corrupt)")
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring checkpoint %s: %s", folder, exc)
            continue
        return Checkpoint(folder, int(meta["step"]), meta)
    return None


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _train_sampler(trainer: Any) -> Any:
    return _train_sampler_of(trainer.train_dataloader)


def _train_sampler_of(loader: Any) -> Any:
    """The lhotse sampler behind NeMo's training dataloader (it lives in the main process for audio manifests)."""
    loader = getattr(loader, "_source", loader)  # NeMo's BroadcastingDataLoader wraps a torch DataLoader
    sampler = getattr(loader, "sampler", None)
    if sampler is None or not hasattr(sampler, "load_state_dict"):
        raise StageError("cannot restore the data position: the training dataloader has no lhotse sampler")
    return sampler


def fast_forward(sampler: Any, batches: int) -> None:
    """Make the sampler's next batch the one an uninterrupted run would draw after `batches` batches of the
    sampler's current epoch.

    This replays the seeded shuffle over metadata only (no audio is read), as lhotse's own restore does. Its
    `state_dict()` refuses samplers with a custom constraint, which NeMo always sets, so the replay is done
    here. `_just_restored_state` is lhotse's documented restore flag: the next `iter()` continues from here.
    """
    sampler.allow_iter_to_reset_state()
    iter(sampler)  # restart this epoch's seeded shuffle from its beginning
    for _ in range(batches):
        next(sampler)
    sampler._just_restored_state = True


def _resumable_datamodule(base: type) -> type:
    """NeMo's DataModule whose training loader starts at a saved data position (epoch, batches drawn)."""

    class ResumableDataModule(base):
        position: tuple[int, int] | None = None

        def train_dataloader(self):
            loader = super().train_dataloader()
            if self.position is not None:
                epoch, batches = self.position
                sampler = _train_sampler_of(loader)
                sampler.set_epoch(epoch)
                fast_forward(sampler, batches)
                self.position = None
            return loader

    return ResumableDataModule


def _callbacks(
    p: Params,
    fp: str,
    run_dir: Path,
    val_rows: list[dict[str, Any]],
    base: Path,
    uploader: Any,
    stop: dict[str, int | None],
) -> Any:
    """The Lightning callback that checkpoints, resumes RNG + data position, validates WER and stops early."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from stages.model import trained_state

    class MedasrTraining(Callback):
        def __init__(self) -> None:
            self.pending_rng: dict[str, Any] | None = None
            self.epoch_batches = 0  # batches drawn in the current epoch: the data position
            self.restarted_epoch = False
            self.last_saved = -1
            self.best_wer: float | None = None  # the best adapter's step is in best/meta.json
            self.bad_evals = 0
            self.last_loss: float | None = None
            self.stepped = False

        # --- checkpoint contents ---
        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            keep = set(trained_state(pl_module))
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
            checkpoint["medasr"] = {
                "fingerprint": fp,
                "rng": _rng_state(),
                "epoch_batches": self.epoch_batches,
                "best": self.state(),
            }

        def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            info = checkpoint["medasr"]
            self.pending_rng = info["rng"]
            self.epoch_batches = info["epoch_batches"]
            self.best_wer, self.bad_evals = info["best"]["best_wer"], info["best"]["bad_evals"]

        def state(self) -> dict[str, Any]:
            return {"best_wer": self.best_wer, "bad_evals": self.bad_evals}

        # --- resume. The data position is restored when the loader is built (ResumableDataModule): Lightning
        # draws the first batch before any hook runs. RNG is restored here, after NeMo reseeded it while building
        # the loader and before the first step.
        def on_train_start(self, trainer, pl_module) -> None:
            for config in trainer.lr_scheduler_configs:  # a raised max_steps stretches the schedule
                if getattr(config.scheduler, "max_steps", p.train.max_steps) != p.train.max_steps:
                    log.info("LR schedule stretched to max_steps=%d", p.train.max_steps)
                    config.scheduler.max_steps = p.train.max_steps
            if self.pending_rng is not None:
                _set_rng_state(self.pending_rng)
                self.pending_rng = None
                self.restarted_epoch = True
                log.info(
                    "resumed at step %d, epoch %d batch %d (weights, optimizer, schedule, RNG, data position)",
                    trainer.global_step,
                    trainer.current_epoch,
                    self.epoch_batches,
                )

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if self.restarted_epoch:  # the resumed epoch continues; its position is already set
                self.restarted_epoch = False
                return
            # Lightning cannot reach the sampler through NeMo's loader wrapper, so the epoch is set here, before
            # this epoch's iter(): each epoch gets its own seeded shuffle.
            _train_sampler(trainer).set_epoch(trainer.current_epoch)
            self.epoch_batches = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if not self.stepped:  # what a (re)start costs before training continues; bench/ reads this line
                import psutil

                self.stepped = True
                log.info(
                    "first training step of this process (step %d) done %.1f s after process start",
                    step,
                    time.time() - psutil.Process().create_time(),
                )
            self.epoch_batches += 1
            self.last_loss = float(outputs["loss"]) if outputs is not None else self.last_loss
            if p.train.val_every and step % p.train.val_every == 0:
                self.validate(trainer, pl_module, step)
            if step % p.train.checkpoint_every == 0 or step >= p.train.max_steps or trainer.should_stop:
                self.save(trainer, step)
            if stop["signal"] is not None:
                self.save(trainer, step)
                if uploader is not None and not uploader.drain(p.train.stop_grace_s):
                    log.error(
                        "stop grace time (%ss) ran out before the last checkpoint was mirrored", p.train.stop_grace_s
                    )
                log.warning("stopped at step %d on signal %d; rerun to resume", step, stop["signal"])
                raise TrainingInterrupted(128 + stop["signal"])

        def save(self, trainer, step: int) -> None:
            if step == self.last_saved:
                return
            name = f"step-{step:08d}"
            with atomic_dir(run_dir / name) as tmp:
                trainer.save_checkpoint(tmp / STATE)
                copy_extras(run_dir, tmp)  # what must travel with this checkpoint
                meta = {
                    "fingerprint": fp,
                    "step": step,
                    "epoch": trainer.current_epoch,
                    "epoch_batches": self.epoch_batches,
                    "sha256": _sha256(tmp / STATE),
                    "time": time.time(),
                }
                write_json_atomic(tmp / META, meta)
            write_text_atomic(run_dir / LATEST, name + "\n")
            self.last_saved = step
            if uploader is not None:
                uploader.submit(run_dir / name)
            for old in sorted(d for d in run_dir.glob("step-*") if d.is_dir())[: -p.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

        def validate(self, trainer, pl_module, step: int) -> None:
            from stages.inference import transcribe
            from stages.scoring import score

            hyps = transcribe(pl_module, [base / r["audio_filepath"] for r in val_rows], p.train.batch_size)
            wer = score([r["text"] for r in val_rows], hyps)["wer"]
            pl_module.log("val_wer", wer)
            log.info("step %d: val WER %.4f on %d utterances", step, wer, len(val_rows))
            if self.best_wer is None or wer < self.best_wer - p.train.early_stop_delta:
                self.best_wer, self.bad_evals = wer, 0
                from safetensors.torch import save_file

                with atomic_dir(run_dir / "best") as tmp:
                    save_file(trained_state(pl_module), str(tmp / "trained.safetensors"))
                    write_json_atomic(tmp / META, {"fingerprint": fp, "step": step, "wer": wer})
            else:
                self.bad_evals += 1
                if p.train.early_stop_patience and self.bad_evals >= p.train.early_stop_patience:
                    log.info(
                        "early stop: no WER gain of %s in %d validations", p.train.early_stop_delta, self.bad_evals
                    )
                    trainer.should_stop = True
            pl_module.train()
            torch.set_grad_enabled(True)

    return MedasrTraining()


def restore_from_mirror(mirror: Mirror, run_dir: Path, fp: str) -> Checkpoint | None:
    """The newest complete, intact mirrored checkpoint, downloaded into `run_dir` with what travels with it."""
    try:
        names = mirror.complete_steps()
    except Exception as exc:  # the loop around us retries; starting fresh here could throw away a long run
        raise StageError(f"DVC remote {mirror.remote!r} unreachable while looking for a checkpoint: {exc}") from None
    for name in names:
        try:
            folder = mirror.download(name, run_dir)
        except Exception as exc:
            log.warning("could not download mirrored checkpoint %s: %s", name, exc)
            continue
        copy_extras(folder, run_dir)
        write_text_atomic(run_dir / LATEST, name + "\n")
        found = find_resumable(run_dir, fp)
        if found is not None and found.path.name == name:
            log.info("restored %s from DVC remote %r", name, mirror.remote)
            return found
        shutil.rmtree(folder, ignore_errors=True)
    return None


@contextmanager
def _stop_signals_set_flag(stop: dict[str, int | None]) -> Iterator[None]:
    """While training: SIGTERM/SIGINT only set a flag; the loop checkpoints after the current step, then exits."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        if stop["signal"] is None:
            log.warning("received %s: checkpointing after this step, then exiting", signal.Signals(signum).name)
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _base_description(p: Params) -> dict[str, Any]:
    if p.model.preset == "canary-qwen-2.5b":
        return {"id": p.model.pretrained, "revision": p.model.revision}
    if p.model.preset == "compose":
        return {"id": f"{p.model.pretrained_asr} + {p.model.pretrained_llm}", "revision": None}
    return {"id": "tiny", "revision": None}


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def data_config(manifest_dir: Path, p: Params) -> dict[str, Any]:
    from stages.model import AUDIO_TAG

    def source(name: str) -> list[dict[str, Any]]:
        return [
            {
                "type": "lhotse_as_conversation",
                "manifest_filepath": str(manifest_dir / f"{name}.json"),
                "audio_locator_tag": AUDIO_TAG,
                "tags": {"context": "Transcribe the following:"},
            }
        ]

    common = {
        "sample_rate": 16000,
        "prompt_format": "qwen",
        "token_equivalent_duration": 0.08,  # seconds of audio per encoder frame: 12.5 frames (tokens) per second
        "num_workers": min(p.train.num_workers, len(os.sched_getaffinity(0))),  # more than cores only thrashes
        "batch_size": p.train.batch_size,
        "max_duration": 40.0,
        "use_lhotse": True,
    }
    return {
        # NeMo seeds the sampler's shuffle from `shard_seed`, which defaults to "trng" (a fresh true-random seed
        # on every pass). Fixed integers make each epoch's order reproducible, which resume relies on.
        "train_ds": {
            "input_cfg": source("train"),
            "shuffle": True,
            "seed": p.train.seed,
            "shard_seed": p.train.seed,
            **common,
            **batching_config(p),
        },
        "validation_ds": {"datasets": {"val": {"input_cfg": source("val")}}, **common},
    }


def batching_config(p: Params) -> dict[str, Any]:
    """How training batches are drawn. Fixed `batch_size` batches (NeMo's example config) unless a token budget
    or length buckets are set; then lhotse measures each example as audio frames + text tokens (NeMo's multimodal
    sampling) and, with buckets, a DynamicBucketingSampler draws each batch from clips of similar length.
    Bucket bins are estimated by lhotse from the training manifest. Its background bucket filler is off: with
    it, which clips are ready when a batch is drawn depends on thread timing, and resume replays the draws."""
    if p.train.batch_tokens is None and p.train.num_buckets == 1:
        return {}
    return {
        "use_multimodal_sampling": True,
        "measure_total_length": True,  # audio frames + prompt + transcript: what the LLM's sequence holds
        "batch_tokens": p.train.batch_tokens,
        "use_bucketing": p.train.num_buckets > 1,
        "num_buckets": p.train.num_buckets,
        "concurrent_bucketing": False,
    }


def optimizer_config(p: Params, gpu: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    optimizer: dict[str, Any] = {"lr": p.train.lr, "betas": [0.9, 0.98], "weight_decay": p.train.weight_decay}
    if p.train.optimizer == "adamw8bit":
        optimizer["_target_"] = "bitsandbytes.optim.AdamW8bit"
    else:  # one fused CUDA kernel per step instead of NeMo's example's `foreach` loop over tensors
        optimizer |= {"_target_": "torch.optim.AdamW", "fused": gpu}
    schedule = {
        "_target_": "nemo.core.optim.lr_scheduler.CosineAnnealing",
        "warmup_steps": p.train.warmup_steps,
        "min_lr": p.train.lr / 100,
        "max_steps": p.train.max_steps,
    }
    return optimizer, schedule


def prepare_model(model: Any, p: Params, gpu: bool) -> int:
    """Optimizer, schedule, freeze policy and activation checkpointing, as training needs them; returns the number of
    trainable parameters."""
    from omegaconf import open_dict

    from stages.model import apply_freeze

    optimizer, schedule = optimizer_config(p, gpu)
    with open_dict(model.cfg):
        model.cfg.optimizer, model.cfg.lr_scheduler = optimizer, schedule
    trainable = apply_freeze(model)
    log.info("trainable parameters: %s of %s", f"{trainable:,}", f"{sum(x.numel() for x in model.parameters()):,}")
    model.strict_loading = False  # checkpoints hold only what training changes (see trained_state)
    if p.train.grad_checkpointing:
        # Only the LLM: it holds most activations (28 layers over audio frames + text). The encoder's own
        # activations stay stored. SALM keeps the LLM in train mode when LoRA trains in it, which HF's
        # checkpointing requires; non-reentrant, so gradients reach the encoder through the LLM's input.
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return trainable


def make_datamodule(model: Any, manifest_dir: Path, p: Params) -> Any:
    """NeMo's DataModule + SALMDataset over the manifests, able to start at a saved data position."""
    from nemo.collections.speechlm2.data import DataModule, SALMDataset
    from omegaconf import OmegaConf

    return _resumable_datamodule(DataModule)(
        OmegaConf.create(data_config(manifest_dir, p)), tokenizer=model.tokenizer, dataset=SALMDataset(model.tokenizer)
    )


def make_trainer(p: Params, gpu: bool, callbacks: list[Any], trackers: Any) -> Any:
    """The Lightning Trainer: bf16 on GPUs (DDP across several), fp32 on CPU."""
    import torch
    from lightning import Trainer

    return Trainer(
        max_steps=p.train.max_steps,
        accelerator="gpu" if gpu else "cpu",
        devices="auto" if gpu else 1,
        strategy="ddp" if gpu and torch.cuda.device_count() > 1 else "auto",
        precision="bf16-true" if gpu and p.train.precision != "32" else "32-true",
        gradient_clip_val=p.train.grad_clip or None,
        use_distributed_sampler=False,  # lhotse samplers shard by rank themselves
        limit_val_batches=max(1, -(-p.train.val_max_utts // p.train.batch_size)) if p.train.val_every else 0,
        val_check_interval=p.train.val_every or None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=trackers,
        log_every_n_steps=min(10, p.train.checkpoint_every),
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=callbacks,
    )


def run(
    p: Params,
    manifest_dir: Path = MANIFEST_DIR,
    ckpt_root: Path = CHECKPOINT_ROOT,
    model_dir: Path = MODEL_DIR,
    metrics_file: Path = METRICS_FILE,
    curves_dir: Path = CURVES_DIR,
    mirror_checkpoints: bool = True,
) -> dict[str, Any]:
    train_rows = read_jsonl(manifest_dir / "train.json") if (manifest_dir / "train.json").is_file() else []
    val_rows = read_jsonl(manifest_dir / "val.json") if (manifest_dir / "val.json").is_file() else []
    if not train_rows:
        raise StageError(f"{manifest_dir}/train.json is missing or empty: nothing to train on")
    if p.train.val_every and not val_rows:
        raise StageError(f"{manifest_dir}/val.json is empty but train.val_every={p.train.val_every}: set it to 0")

    import torch

    if p.train.optimizer == "adamw8bit" and not torch.cuda.is_available():
        raise StageError("train.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on this machine")

    started = time.time()
    data_sha256 = data_hash(manifest_dir)
    fp = fingerprint(p, data_sha256)
    run_dir = ckpt_root / fp
    mirror = open_mirror(fp) if mirror_checkpoints else None
    resume, source = find_resumable(run_dir, fp), "local"
    if resume is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # nothing usable in it (all corrupt or incomplete)
        resume, source = (restore_from_mirror(mirror, run_dir, fp) if mirror else None), "remote"
    if resume is None:
        source = "none"
    log.info("fingerprint %s: %s", fp, f"resuming from step {resume.step} ({source})" if resume else "starting fresh")
    run_dir.mkdir(parents=True, exist_ok=True)
    uploader = Uploader(mirror, p.train.keep_checkpoints) if mirror else None
    stop: dict[str, int | None] = {"signal": None}

    from lightning import seed_everything

    from stages.model import build_model, export
    from stages.tracking import loggers, publish_curves

    seed_everything(p.train.seed, workers=True)
    gpu = torch.cuda.is_available()
    model = build_model(p.model, p.lora, p.train.seed, run_dir)
    trainable = prepare_model(model, p, gpu)
    datamodule = make_datamodule(model, manifest_dir, p)
    datamodule.position = (resume.meta["epoch"], resume.meta["epoch_batches"]) if resume else None
    callback = _callbacks(p, fp, run_dir, val_rows[: p.train.val_max_utts], manifest_dir, uploader, stop)
    trackers, wandb_run = loggers(p, run_dir, fp, resume.step if resume else None)
    trainer = make_trainer(p, gpu, [callback], trackers)
    if resume and resume.step >= p.train.max_steps:
        log.info("checkpoint at step %d already reaches max_steps=%d: exporting it", resume.step, p.train.max_steps)
    with _stop_signals_set_flag(stop):
        trainer.fit(model, datamodule, ckpt_path=str(resume.path / STATE) if resume else None)
    if wandb_run is not None:
        import wandb

        wandb.finish()
    publish_curves(run_dir, curves_dir)
    if uploader is not None and not uploader.drain(p.train.stop_grace_s):
        log.warning("the last checkpoint was not mirrored within %ss", p.train.stop_grace_s)

    best = run_dir / "best" / "trained.safetensors"
    exported_from = "last"
    exported_step = trainer.global_step
    if p.train.val_every and best.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(best)), strict=False)
        exported_from, exported_step = "best", int(json.loads((run_dir / "best" / META).read_text())["step"])
    meta = {
        "preset": p.model.preset,
        "base": _base_description(p),
        "lora": p.lora.model_dump(),
        "trainable": list(p.model.trainable),
        "seed": p.train.seed,
        "step": exported_step,
        "fingerprint": fp,
        "data_sha256": data_sha256,
        "git_commit": _git_commit(),
        "wandb": wandb_run,
        "params": p.model_dump(),
    }
    with atomic_dir(model_dir) as tmp:
        # only the canary preset can rebuild its base from a pinned checkpoint; the others ship their full weights
        export(model, tmp, meta, self_contained=p.model.preset != "canary-qwen-2.5b")
    metrics = {
        "global_step": trainer.global_step,
        "train_loss": callback.last_loss,
        "resumed_from_step": resume.step if resume else 0,
        "resume_source": source,
        "trainable_params": trainable,
        "exported_step": exported_step,
        "exported_from": exported_from,
        "best_val_wer": callback.best_wer,
        "wall_time_s": round(time.time() - started, 1),
    }
    write_json_atomic(metrics_file, metrics)
    log.info("exported %s (step %d, %s) to %s", p.model.preset, exported_step, exported_from, model_dir)
    return metrics
