"""The NeMo and Lightning settings the train stage derives from `train.*`: the data config (NeMo's DataModule),
batching, optimizer and schedule, the freeze policy applied to a model, and the Lightning Trainer.

Pure builders (dicts from params), so their tests need no model; torch and Lightning are imported only by the two
functions that build live objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medasr.audio import TARGET_SAMPLE_RATE
from medasr.log import get_logger
from medasr.model import AUDIO_TAG, PROMPT_TEXT, apply_freeze
from medasr.params import MODEL_MAX_AUDIO_SECONDS, TrainParams
from medasr.paths import split_manifest

log = get_logger(__name__)

# Seconds of audio per encoder frame: canary-qwen's encoder emits 12.5 frames (LLM tokens) per second.
TOKEN_EQUIVALENT_DURATION = 0.08


def data_config(manifest_dir: Path, train: TrainParams) -> dict[str, Any]:
    """NeMo DataModule config for the train and val manifests (lhotse, SALM conversations with our prompt)."""

    def source(split: str) -> list[dict[str, Any]]:
        return [
            {
                "type": "lhotse_as_conversation",
                "manifest_filepath": str(split_manifest(split, manifest_dir)),
                "audio_locator_tag": AUDIO_TAG,
                "tags": {"context": PROMPT_TEXT},
            }
        ]

    common = {
        "sample_rate": TARGET_SAMPLE_RATE,
        "prompt_format": "qwen",
        "token_equivalent_duration": TOKEN_EQUIVALENT_DURATION,
        "num_workers": min(train.num_workers, len(os.sched_getaffinity(0))),  # more than cores only thrashes
        "batch_size": train.batch_size,
        "max_duration": MODEL_MAX_AUDIO_SECONDS,
        "use_lhotse": True,
    }
    return {
        # NeMo seeds the sampler's shuffle from `shard_seed`, which defaults to "trng" (a fresh true-random seed
        # on every pass). Fixed integers make each epoch's order reproducible, which resume relies on.
        "train_ds": {
            "input_cfg": source("train"),
            "shuffle": True,
            "seed": train.seed,
            "shard_seed": train.seed,
            **common,
            **batching_config(train),
        },
        "validation_ds": {"datasets": {"val": {"input_cfg": source("val")}}, **common},
    }


def batching_config(train: TrainParams) -> dict[str, Any]:
    """How training batches are drawn. Fixed `batch_size` batches (NeMo's example config) unless a token budget
    or length buckets are set; then lhotse measures each example as audio frames + text tokens (NeMo's multimodal
    sampling) and, with buckets, a DynamicBucketingSampler draws each batch from clips of similar length.
    Bucket bins are estimated by lhotse from the training manifest. Its background bucket filler is off: with
    it, which clips are ready when a batch is drawn depends on thread timing, and resume replays the draws."""
    if train.batch_tokens is None and train.num_buckets == 1:
        return {}
    return {
        "use_multimodal_sampling": True,
        "measure_total_length": True,  # audio frames + prompt + transcript: what the LLM's sequence holds
        "batch_tokens": train.batch_tokens,
        "use_bucketing": train.num_buckets > 1,
        "num_buckets": train.num_buckets,
        "concurrent_bucketing": False,
    }


def optimizer_config(train: TrainParams, gpu: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The optimizer and LR schedule, as the `_target_` dicts NeMo's SALM instantiates."""
    optimizer: dict[str, Any] = {"lr": train.lr, "betas": [0.9, 0.98], "weight_decay": train.weight_decay}
    if train.optimizer == "adamw8bit":
        optimizer["_target_"] = "bitsandbytes.optim.AdamW8bit"
    else:  # one fused CUDA kernel per step instead of NeMo's example's `foreach` loop over tensors
        optimizer |= {"_target_": "torch.optim.AdamW", "fused": gpu}
    schedule = {
        "_target_": "nemo.core.optim.lr_scheduler.CosineAnnealing",
        "warmup_steps": train.warmup_steps,
        "min_lr": train.lr / 100,
        "max_steps": train.max_steps,
    }
    return optimizer, schedule


def prepare_model(model: Any, train: TrainParams, gpu: bool) -> int:
    """Optimizer, schedule, freeze policy and activation checkpointing, as training needs them; returns the number of
    trainable parameters."""
    from omegaconf import open_dict

    optimizer, schedule = optimizer_config(train, gpu)
    with open_dict(model.cfg):
        model.cfg.optimizer, model.cfg.lr_scheduler = optimizer, schedule
    trainable = apply_freeze(model)
    log.info("trainable parameters: %s of %s", f"{trainable:,}", f"{sum(x.numel() for x in model.parameters()):,}")
    model.strict_loading = False  # checkpoints hold only what training changes (see trained_state)
    if train.grad_checkpointing:
        # Only the LLM: it holds most activations (28 layers over audio frames + text). The encoder's own
        # activations stay stored. SALM keeps the LLM in train mode when LoRA trains in it, which HF's
        # checkpointing requires; non-reentrant, so gradients reach the encoder through the LLM's input.
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return trainable


def make_trainer(train: TrainParams, gpu: bool, callbacks: list[Any], trackers: Any) -> Any:
    """The Lightning Trainer: bf16 on GPUs (DDP across several), fp32 on CPU."""
    import torch
    from lightning import Trainer

    return Trainer(
        max_steps=train.max_steps,
        accelerator="gpu" if gpu else "cpu",
        devices="auto" if gpu else 1,
        strategy="ddp" if gpu and torch.cuda.device_count() > 1 else "auto",
        precision="bf16-true" if gpu and train.precision != "32" else "32-true",
        gradient_clip_val=train.grad_clip or None,
        use_distributed_sampler=False,  # lhotse samplers shard by rank themselves
        limit_val_batches=max(1, -(-train.val_max_utts // train.batch_size)) if train.val_every else 0,
        val_check_interval=train.val_every or None,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=trackers,
        # at least once per run, or DVCLive writes no curves and DVC misses the stage's declared plots output
        log_every_n_steps=max(1, min(10, train.checkpoint_every, train.max_steps)),
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=callbacks,
    )
