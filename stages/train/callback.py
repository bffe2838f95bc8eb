"""The Lightning callback that makes training resumable and stoppable: it saves checkpoints (with the RNG state and
the data position), restores them, validates WER and keeps the best weights, stops early, and turns SIGTERM/SIGINT
into a checkpoint followed by a non-zero exit.

Under DDP every rank runs this callback. Decisions that end or save a step are agreed across ranks (a rank that
decided alone would wait forever in the next collective): the stop request is reduced over ranks, early stop is
rank 0's and broadcast. Only rank 0 validates, writes, hashes and mirrors; every rank takes part in
`trainer.save_checkpoint` (collective), and each rank's RNG state is saved and restored as its own.
"""

from __future__ import annotations

import random
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from medasr import StageError
from medasr.files import atomic_dir, sha256_file, write_json_atomic, write_text_atomic
from medasr.log import get_logger
from medasr.model import trained_names, trained_state
from medasr.params import TrainParams
from medasr.paths import (
    BEST_DIR,
    CHECKPOINT_META,
    CHECKPOINT_STATE,
    LATEST,
    TRAINED_WEIGHTS,
    VALIDATION_STATUS,
    step_dir_name,
)
from medasr.tracking import VAL_SAMPLES, report_validation
from stages.train.checkpoints import copy_extras, step_dirs
from stages.train.data import train_sampler

log = get_logger(__name__)


class TrainingInterrupted(SystemExit):
    """SIGTERM/SIGINT after the last checkpoint was saved (and mirrored): exit non-zero, so DVC never records an
    unfinished stage as done."""


@dataclass
class StopRequest:
    """Set by a SIGTERM/SIGINT handler; the callback checkpoints after the current step, then exits."""

    signal: int | None = None
    at: float = 0.0  # time.monotonic() of the first signal: the grace time counts from there

    def handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            log.warning("received %s: checkpointing after this step, then exiting", signal.Signals(signum).name)
            self.at = time.monotonic()
        self.signal = signum

    def grace_left(self, grace_s: float) -> float:
        """What is left of `grace_s` since the signal (all of it when this rank stops on another rank's signal):
        runpod.sh kills the stage train.stop_grace_s plus a margin after the signal, not after the save."""
        return max(1.0, grace_s - (time.monotonic() - self.at)) if self.signal is not None else grace_s


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """While training: SIGTERM/SIGINT only set `stop`; the callback acts on it between steps."""
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # this rank's own device: another rank or a restart may see other GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def rank_local(model: Any) -> Iterator[None]:
    """While one rank decodes alone: NeMo's Conformer encoder otherwise agrees its longest input with the other
    ranks in every forward (an all_reduce they never join: a deadlock)."""
    synced = [m for m in model.modules() if getattr(m, "sync_max_audio_length", False)]
    for module in synced:
        module.sync_max_audio_length = False
    try:
        yield
    finally:
        for module in synced:
            module.sync_max_audio_length = True


@dataclass(frozen=True)
class ValSet:
    """The fixed slice of the val split that validation decodes, and eval's decode length limit."""

    audio: list[Path]
    texts: list[str]
    max_new_tokens: int
    ids: list[str]


class TrainingCallback(Callback):
    def __init__(
        self, train: TrainParams, fp: str, run_dir: Path, val: ValSet | None, uploader: Any, stop: StopRequest
    ) -> None:
        self.train, self.fp, self.run_dir, self.val, self.uploader, self.stop = train, fp, run_dir, val, uploader, stop
        self.pending_rng: dict[str, Any] | None = None
        self.epoch_batches = 0  # batches drawn in the current epoch: the data position
        self.restarted_epoch = False
        self.last_saved = -1
        self.best_wer: float | None = None  # the best weights' step is in best/meta.json
        self.bad_evals = 0
        self.last_loss: float | None = None
        # what a (re)start costs before training continues: (step, seconds from process start); train.json has it
        self.first_step: tuple[int, float] | None = None

    # --- checkpoint contents ---
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        keep = trained_names(pl_module)  # names only: no copy of the weights to the CPU
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        rngs: list[Any] = [rng_state()]  # indexed by rank; rank 0 writes the file, so it gathers everyone's
        if trainer.world_size > 1:
            rngs = [None] * trainer.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        checkpoint["medasr"] = {
            "fingerprint": self.fp,
            "rng": rngs,
            "epoch_batches": self.epoch_batches,
            "best": {"best_wer": self.best_wer, "bad_evals": self.bad_evals},
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        info = checkpoint["medasr"]
        self.pending_rng = info["rng"][trainer.global_rank]
        self.epoch_batches = info["epoch_batches"]
        self.best_wer, self.bad_evals = info["best"]["best_wer"], info["best"]["bad_evals"]

    # --- resume. The data position is restored when the loader is built (ResumableDataModule): Lightning draws the
    # first batch before any hook runs. RNG is restored here, after NeMo reseeded it while building the loader and
    # before the first step.
    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning installs its own SIGTERM handler when fit starts, which ends the run at the end of a step with
        # exit status 0 and no checkpoint, on that rank alone (the others then wait forever): this stage's decides
        signal.signal(signal.SIGTERM, self.stop.handle)
        # a SIGTERM between fit's start and now went through Lightning's handler too (it wraps ours, so `stop` has
        # it): its flag would end the first step with exit status 0 and no model; ours checkpoints, then exits 143
        trainer._signal_connector.received_sigterm = False
        # each rank chose its checkpoint itself (rank 0 hands its choice over, but another launcher may not)
        first = trainer.strategy.broadcast(trainer.global_step, src=0)
        if not trainer.strategy.reduce_boolean_decision(first == trainer.global_step, all=True):
            raise StageError(f"rank {trainer.global_rank} resumes step {trainer.global_step}, rank 0 step {first}")
        for config in trainer.lr_scheduler_configs:  # a raised max_steps stretches the schedule
            if getattr(config.scheduler, "max_steps", self.train.max_steps) != self.train.max_steps:
                log.info("LR schedule stretched to max_steps=%d", self.train.max_steps)
                config.scheduler.max_steps = self.train.max_steps
        if trainer.is_global_zero:  # an earlier training's last verdict is not this one's
            (self.run_dir.parent / VALIDATION_STATUS).unlink(missing_ok=True)
        if self.pending_rng is not None:
            set_rng_state(self.pending_rng)
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
        # Lightning cannot reach the sampler through NeMo's loader wrapper, so the epoch is set here, before this
        # epoch's iter(): each epoch gets its own seeded shuffle.
        train_sampler(trainer.train_dataloader).set_epoch(trainer.current_epoch)
        self.epoch_batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.first_step is None:
            import psutil

            self.first_step = (step, round(time.time() - psutil.Process().create_time(), 2))
            ids = [c.id for c in batch.get("conversations", [])] if batch else []  # under DDP: each rank's own share
            log.info(
                "rank %d of %d: first training step of this process (step %d) done %.1f s after process start; "
                "its batch: %s",
                trainer.global_rank,
                trainer.world_size,
                *self.first_step,
                " ".join(ids),
            )
        self.epoch_batches += 1
        self.last_loss = float(outputs["loss"]) if outputs is not None else self.last_loss
        if self.val is not None and self.train.val_every and step % self.train.val_every == 0:
            if trainer.is_global_zero:
                self.validate(trainer, pl_module, step)
            trainer.strategy.barrier("validation")  # the other ranks wait for rank 0's decode
            trainer.should_stop = trainer.strategy.broadcast(trainer.should_stop, src=0)  # early stop: rank 0's
        # each rank's handler sets its flag at its own moment: any rank's request stops all at this step
        stopping = trainer.strategy.reduce_boolean_decision(self.stop.signal is not None, all=False)
        if step % self.train.checkpoint_every == 0 or step >= self.train.max_steps or trainer.should_stop:
            self.save(trainer, step)
        if stopping:
            self.save(trainer, step)
            if self.uploader is not None and not self.uploader.drain(self.stop.grace_left(self.train.stop_grace_s)):
                log.error(
                    "stop grace time (%ss) ran out before the last checkpoint was mirrored", self.train.stop_grace_s
                )
            signum = self.stop.signal or signal.SIGTERM  # this rank may stop on another rank's signal
            # Every rank waits until rank 0 has written and mirrored the checkpoint: Lightning's launcher kills
            # rank 0 the moment another rank exits non-zero, so the other ranks leave quietly after it (DVC and
            # runpod.sh read rank 0's status).
            trainer.strategy.barrier("stopped")
            log.warning("stopped at step %d on signal %d; rerun to resume", step, signum)
            raise TrainingInterrupted(128 + signum if trainer.is_global_zero else 0)

    def save(self, trainer, step: int) -> None:
        if step == self.last_saved:
            return
        self.last_saved = step
        name = step_dir_name(step)
        if not trainer.is_global_zero:  # Lightning writes on rank 0 only, but every rank takes part
            trainer.save_checkpoint(self.run_dir / name / CHECKPOINT_STATE)
            return
        with atomic_dir(self.run_dir / name) as tmp:
            trainer.save_checkpoint(tmp / CHECKPOINT_STATE)
            copy_extras(self.run_dir, tmp)  # what must travel with this checkpoint
            meta = {
                "fingerprint": self.fp,
                "step": step,
                "epoch": trainer.current_epoch,
                "epoch_batches": self.epoch_batches,
                "sha256": sha256_file(tmp / CHECKPOINT_STATE),
                "time": time.time(),
            }
            write_json_atomic(tmp / CHECKPOINT_META, meta)
        write_text_atomic(self.run_dir / LATEST, name + "\n")
        if self.uploader is not None:
            self.uploader.submit(self.run_dir / name)
        for old in step_dirs(self.run_dir)[: -self.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def validate(self, trainer, pl_module, step: int) -> None:
        from safetensors.torch import save_file

        from medasr.inference import transcribe
        from medasr.scoring import score_utterances

        assert self.val is not None
        started = time.monotonic()
        # decoded as eval decodes (its max_new_tokens, this run's token budget per batch)
        with rank_local(pl_module):
            texts = transcribe(
                pl_module,
                self.val.audio,
                self.train.batch_size,
                max_new_tokens=self.val.max_new_tokens,
                batch_tokens=self.train.batch_tokens,
            )
        scores, _, aligned = score_utterances(self.val.texts, texts)
        wer = scores["wer"]
        pl_module.log("val_wer", wer, rank_zero_only=True)
        took = time.monotonic() - started
        log.info("step %d: val WER %.4f on %d utterances (%.1f s)", step, wer, len(self.val.texts), took)
        samples = [
            [uid, round((a.substitutions + a.deletions + a.insertions) / max(1, a.reference_words), 4), ref, hyp]
            for uid, ref, hyp, a in list(zip(self.val.ids, self.val.texts, texts, aligned, strict=True))[:VAL_SAMPLES]
        ]
        # the samples to the trackers; a warning when markedly worse than the best so far, for the pod's heartbeat
        report_validation(trainer.loggers, self.run_dir.parent / VALIDATION_STATUS, step, wer, self.best_wer, samples)
        if self.best_wer is None or wer < self.best_wer - self.train.early_stop_delta:
            self.best_wer, self.bad_evals = wer, 0
            with atomic_dir(self.run_dir / BEST_DIR) as tmp:
                save_file(trained_state(pl_module), str(tmp / TRAINED_WEIGHTS))
                write_json_atomic(tmp / CHECKPOINT_META, {"fingerprint": self.fp, "step": step, "wer": wer})
        else:
            self.bad_evals += 1
            if self.train.early_stop_patience and self.bad_evals >= self.train.early_stop_patience:
                log.info("early stop: no WER gain of %s in %d validations", self.train.early_stop_delta, self.bad_evals)
                trainer.should_stop = True
        pl_module.train()
        torch.set_grad_enabled(True)
