"""train: how params become NeMo's data and optimizer config (fast: no model is built)."""

from __future__ import annotations

from pathlib import Path

from helpers import tiny_params

from stages.train.checkpoints import fingerprint
from stages.train.config import batching_config, data_config, optimizer_config


def test_fixed_batches_unless_a_token_budget_or_buckets_are_set():
    example = tiny_params(**{"train.batch_tokens": None, "train.num_buckets": 1})
    assert batching_config(example.train) == {}  # NeMo's example config: batch_size clips per batch
    ours = tiny_params(**{"train.batch_tokens": 4000, "train.num_buckets": 8})
    train_ds = data_config(Path("m"), ours.train)["train_ds"]
    assert train_ds["use_multimodal_sampling"] and train_ds["measure_total_length"]
    assert (train_ds["batch_tokens"], train_ds["batch_size"]) == (4000, ours.train.batch_size)
    assert train_ds["use_bucketing"] and train_ds["num_buckets"] == 8
    assert train_ds["concurrent_bucketing"] is False  # a background filler would make resume's replay inexact
    # validation always decodes fixed batches
    assert "batch_tokens" not in data_config(Path("m"), ours.train)["validation_ds"]


def test_workers_are_capped_at_the_usable_cores_and_do_not_change_the_fingerprint():
    import os

    many = tiny_params(**{"train.num_workers": 512})
    assert data_config(Path("m"), many.train)["train_ds"]["num_workers"] == len(os.sched_getaffinity(0))

    def fp(p) -> str:
        return fingerprint(p.model, p.lora, p.train, "d", world_size=1, precision="32")

    assert fp(many) == fp(tiny_params(**{"train.num_workers": 0}))
    assert fp(many) != fp(tiny_params(**{"train.batch_tokens": 123}))


def test_adamw_is_fused_on_gpu_only_and_8bit_is_bitsandbytes():
    p = tiny_params(**{"train.optimizer": "adamw"}).train
    gpu, cpu = optimizer_config(p, gpu=True)[0], optimizer_config(p, gpu=False)[0]
    assert gpu["fused"] is True and cpu["fused"] is False
    assert gpu == cpu | {"fused": True}  # nothing else differs
    assert gpu["_target_"] == "torch.optim.AdamW"
    eight = optimizer_config(tiny_params(**{"train.optimizer": "adamw8bit"}).train, gpu=True)[0]
    assert eight["_target_"] == "bitsandbytes.optim.AdamW8bit" and "fused" not in eight
