"""The NeMo and Lightning settings the train stage derives from `train.*`: the data config (NeMo's DataModule),
batching, optimizer and schedule, the freeze policy applied to a model, and the Lightning Trainer.

Pure builders (dicts from params), so their tests need no model; torch and Lightning are imported only by the two
functions that build live objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medasr import StageError
from medasr.audio import TARGET_SAMPLE_RATE
from medasr.device import resolve_precision
from medasr.inference import FRAMES_PER_SECOND
from medasr.log import get_logger
from medasr.model import AUDIO_TAG, PROMPT_TEXT, apply_freeze
from medasr.params import MODEL_MAX_AUDIO_SECONDS, TrainParams
from medasr.paths import split_manifest

log = get_logger(__name__)

# Seconds of audio per encoder frame (LLM position), as NeMo's samplers measure clips.
TOKEN_EQUIVALENT_DURATION = 1 / FRAMES_PER_SECOND


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


def node_count(devices: int) -> int:
    """Nodes taking part: WORLD_SIZE (all ranks, set by torchrun, or by the user on several nodes as the README
    says) over this node's `devices`; 1 when it is unset."""
    world = int(os.environ.get("WORLD_SIZE", devices))
    if world < devices or world % devices:
        raise StageError(f"WORLD_SIZE={world} is not a multiple of train.devices={devices} (ranks per node)")
    return world // devices


def process_rank(devices: int) -> int:
    """This process's global rank, known before any Trainer exists: torchrun sets RANK; Lightning's launcher
    starts rank 0 with none of these set and the other ranks with LOCAL_RANK (and NODE_RANK on several nodes)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("NODE_RANK", 0)) * devices + int(os.environ.get("LOCAL_RANK", 0))


def precision_plugin(train: TrainParams, gpu: bool) -> Any:
    """Lightning's precision for `train.precision` as it runs here (medasr/device.py): fp32, or bf16-true with the
    batch's audio left fp32. NeMo's preprocessor computes features in fp32 and casts them to the model's dtype
    itself; Lightning's own bf16-true casts every float tensor of the batch, so the audio would reach it rounded to
    bf16 (which costs accuracy)."""
    from lightning.pytorch.plugins.precision import HalfPrecision, Precision

    if resolve_precision(train.precision, gpu) == "32":
        return Precision()

    class Bf16WithFp32Audio(HalfPrecision):
        def convert_input(self, data: Any) -> Any:
            if isinstance(data, dict):  # SALMDataset's batch, or validation's {dataset name: batch}
                return {key: value if key == "audios" else self.convert_input(value) for key, value in data.items()}
            return super().convert_input(data)

    return Bf16WithFp32Audio("bf16-true")


def make_trainer(
    train: TrainParams, gpu: bool, devices: int, callbacks: list[Any], trackers: Any, num_nodes: int = 1
) -> Any:
    """The Lightning Trainer: bf16 on GPUs, fp32 on CPU; `world_size` > 1 is DDP (NCCL on GPUs, gloo on CPU),
    whose ranks Lightning's launcher starts by re-running this command (plain Popen: they stay in its process
    group, so a signal to the group reaches every rank)."""
    from lightning import Trainer
    from lightning.pytorch.strategies import DDPStrategy

    strategy: Any = "auto"
    if devices * num_nodes > 1:
        # find_unused_parameters as upstream NeMo: a frozen or skipped branch leaves parameters without gradients
        strategy = DDPStrategy(process_group_backend="nccl" if gpu else "gloo", find_unused_parameters=True)
    return Trainer(
        max_steps=train.max_steps,
        accelerator="gpu" if gpu else "cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        plugins=[precision_plugin(train, gpu)],
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
