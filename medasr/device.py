"""Where a model runs and in what dtype: one rule for training, validation, eval, `transcribe` and `export`.

The accelerator when there is one, else the CPU; weights in the training precision (`bf16` or `32`); audio stays
fp32 into NeMo's preprocessor, which casts its features to the model's dtype itself (bf16 audio costs accuracy).
bf16 also runs on the CPU, slowly: it exists so the dtype path a GPU run takes can be tested without a GPU.
torch is imported inside the functions: the CLI's start-up and params validation stay light.
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from medasr import StageError

if TYPE_CHECKING:
    import torch

Precision = Literal["bf16", "32"]


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def accelerator() -> str:
    """The torch device type models run on: "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if gpu_available() else "cpu"


@cache
def cpu_bf16_supported() -> bool:
    """Whether torch runs bf16 on this CPU: its kernels for the ops a SALM uses (matmul, conv, softmax) accept
    bf16 here. (MKL-DNN's flag reports fast native bf16 instructions, not support: torch runs bf16 without them.)"""
    import torch

    try:
        x = torch.ones(2, 4, 8, dtype=torch.bfloat16)
        conv = torch.nn.functional.conv1d(x, torch.ones(4, 4, 3, dtype=torch.bfloat16), padding=1)
        out = torch.softmax(conv @ torch.ones(8, 8, dtype=torch.bfloat16), dim=-1)
        return bool(out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all())
    except (RuntimeError, NotImplementedError):
        return False


def resolve_precision(precision: str, gpu: bool | None = None) -> Precision:
    """`train.precision` as it will run: auto is bf16 on a GPU and fp32 on the CPU. Refuses bf16 on a CPU where
    torch has no bf16 support, before any work."""
    gpu = gpu_available() if gpu is None else gpu
    if precision == "auto":
        return "bf16" if gpu else "32"
    if precision == "bf16" and not gpu and not cpu_bf16_supported():
        raise StageError("train.precision=bf16: torch has no bf16 support on this CPU; use 32 (or auto) here")
    if precision not in ("bf16", "32"):
        raise StageError(f"train.precision={precision!r}: expected auto, 32 or bf16")
    return "bf16" if precision == "bf16" else "32"


def torch_dtype(precision: Precision) -> torch.dtype:
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def resolve_devices(devices: int | None, gpu: bool | None = None) -> int:
    """`train.devices` as it will run (the world size on one node): null is every visible GPU, or 1 on the CPU.
    Refuses a count this machine cannot provide, before any work."""
    gpu = gpu_available() if gpu is None else gpu
    if gpu:
        import torch

        visible = torch.cuda.device_count()
        if devices is None:
            return visible
        if devices > visible:
            raise StageError(f"train.devices={devices} but this machine has {visible} visible GPU(s)")
        return devices
    if devices is None:
        return 1
    cores = len(os.sched_getaffinity(0))
    if devices > cores:
        raise StageError(f"train.devices={devices}: no GPU, and {cores} CPU core(s) cannot hold {devices} ranks")
    return devices


def place(model: Any, precision: Precision) -> Any:
    """The model on the accelerator (else the CPU) in `precision`, in eval mode."""
    return model.to(device=accelerator(), dtype=torch_dtype(precision)).eval()
