"""Build and freeze the SALM (speech-augmented LM) that the train and eval stages share.

Three presets (`model.preset`), all the same NeMo class `nemo.collections.speechlm2.models.SALM`:
  - `canary-qwen-2.5b`: the released checkpoint (`model.pretrained` at `model.revision`) through
    `SALM.from_pretrained`. Its own LoRA (r=128) is merged into the LLM first, so fine-tuning starts from exactly
    the released weights and `lora.*` shapes only our new adapter.
  - `tiny`: a tiny SALM built offline and deterministically from `train.seed`: a byte-level BPE tokenizer trained on
    a corpus shipped in this package, a 2-layer Qwen3 config, and a 2-layer FastConformer. For tests and the demo.
  - `compose`: any NeMo ASR encoder (`model.pretrained_asr`) with any HF causal LM (`model.pretrained_llm`).
NeMo is imported lazily (10+ s): nothing here runs at CLI start-up. The exported folder: medasr/export.py.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medasr import StageError
from medasr.architectures import RELEASED_LLM, RELEASED_PERCEPTION, TINY, TINY_LLM, random_llm_dir, tiny_perception
from medasr.log import get_logger
from medasr.params import LoraParams, ModelParams

if TYPE_CHECKING:
    from nemo.collections.speechlm2.models import SALM

log = get_logger(__name__)

AUDIO_TAG = "<|audioplaceholder|>"
# canary-qwen's training prompt, identical in training, validation, eval and `medasr transcribe`: training data
# configs carry its text as the conversation context, inference sends the whole of it.
PROMPT_TEXT = "Transcribe the following:"
PROMPT = f"{PROMPT_TEXT} {AUDIO_TAG}"

# Parameter-name patterns of SALM's parts (names as in SALM.named_parameters(), matched with re.match).
PARTS = {
    "llm": [r"^llm\..+$", r"^embed_tokens\..+$"],
    "preprocessor": [r"^perception\.preprocessor\..+$"],
    "encoder": [r"^perception\.encoder\..+$"],
    "projection": [r"^perception\.(proj|modality_adapter)\..+$"],
}


def freeze_patterns(trainable: Sequence[str]) -> list[str]:
    """Regexes of the parameters to freeze: every part not listed as trainable (LoRA always trains)."""
    return [pattern for part, patterns in PARTS.items() if part not in trainable for pattern in patterns]


def lora_config(p: LoraParams) -> dict[str, Any]:
    """The `lora` block NeMo passes to `peft.LoraConfig`."""
    return {
        "task_type": "CAUSAL_LM",
        "r": p.rank,
        "lora_alpha": p.alpha,
        "lora_dropout": p.dropout,
        "target_modules": list(p.target_modules),
    }


def salm_config(
    pretrained_llm: str,
    pretrained_asr: str,
    perception: dict[str, Any] | None,
    trainable: Sequence[str],
    lora: LoraParams,
    pretrained_weights: bool,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "pretrained_llm": pretrained_llm,
        "pretrained_asr": pretrained_asr,
        "pretrained_weights": pretrained_weights,
        "prompt_format": "qwen",
        "audio_locator_tag": AUDIO_TAG,
        "freeze_params": freeze_patterns(trainable),
        "prevent_freeze_params": [],  # NeMo appends the LoRA pattern
        "lora": lora_config(lora),
        # the train stage sets optimizer and lr_scheduler from train.*
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-4},
    }
    if perception is not None:
        cfg["perception"] = perception
    return cfg


def build_random(
    size: Literal["tiny", "full"], lora: LoraParams, trainable: Sequence[str], seed: int, llm_dir: Path
) -> SALM:
    """A SALM with random weights, built offline: `tiny` (tests, demo) or `full`, canary-qwen-2.5b's architecture
    at its released shapes (benchmarks: speed and memory do not depend on the weights). Deterministic for `seed`.
    Built on torch's current default device (a `with torch.device("cuda"):` block builds it on the GPU)."""
    import torch
    from nemo.collections.speechlm2.models import SALM

    if size == "tiny":
        random_llm_dir(llm_dir, TINY_LLM)
        perception = tiny_perception(TINY["hidden"])
    else:
        random_llm_dir(llm_dir, RELEASED_LLM)
        perception = copy.deepcopy(RELEASED_PERCEPTION)
    cfg = salm_config(str(llm_dir), f"none (random {size})", perception, trainable, lora, False)
    torch.manual_seed(seed)
    return SALM(cfg)


def merge_released_lora(model: SALM) -> None:
    """Fold a checkpoint's own LoRA into the LLM weights, so a new adapter starts from the released model."""
    from nemo.collections.speechlm2.parts.pretrained import move_embedding
    from omegaconf import open_dict
    from peft import PeftModel

    if isinstance(model.llm, PeftModel):
        with move_embedding(model):
            model.llm = model.llm.merge_and_unload()
        with open_dict(model.cfg):
            model.cfg.pop("lora", None)
            model.cfg.prevent_freeze_params = [p for p in model.cfg.get("prevent_freeze_params", []) if "lora" not in p]


def install_lora(model: SALM, lora: LoraParams, trainable: Sequence[str]) -> None:
    """Install our adapter on a merged model and set the freeze policy, exactly as NeMo's constructor would."""
    from nemo.collections.speechlm2.parts.lora import maybe_install_lora
    from omegaconf import open_dict

    with open_dict(model.cfg):
        model.cfg.lora = lora_config(lora)
        model.cfg.prevent_freeze_params = []
        model.cfg.freeze_params = freeze_patterns(trainable)
    maybe_install_lora(model)


def load_released(pretrained: str, revision: str | None, lora: LoraParams, trainable: Sequence[str]) -> SALM:
    """The canary-qwen-2.5b preset: the released weights (hub id or local dir), its LoRA merged, ours installed."""
    from nemo.collections.speechlm2.models import SALM

    try:
        model = SALM.from_pretrained(pretrained, revision=revision)
    except (OSError, RuntimeError, ValueError) as exc:
        raise StageError(f"could not load model.pretrained={pretrained!r} (offline, or not cached?): {exc}") from None
    merge_released_lora(model)
    install_lora(model, lora, trainable)
    return model


def build_composed(pretrained_asr: str, pretrained_llm: str, lora: LoraParams, trainable: Sequence[str]) -> SALM:
    """The compose preset: a pretrained NeMo ASR encoder + a pretrained HF causal LM, joined by a new projection."""
    from nemo.collections.asr.models import ASRModel
    from nemo.collections.speechlm2.models import SALM

    # The projection is Linear(d_model -> LLM width) only when the adapter declares d_model: read the encoder's
    # width from the checkpoint's config (no weights are loaded for this).
    try:
        if Path(pretrained_asr).is_file():
            asr_cfg = ASRModel.restore_from(pretrained_asr, return_config=True)
        else:
            asr_cfg = ASRModel.from_pretrained(pretrained_asr, return_config=True)
    except (OSError, RuntimeError, ValueError, FileNotFoundError) as exc:
        raise StageError(f"could not read model.pretrained_asr={pretrained_asr!r}: {exc}") from None
    perception = {
        "target": "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
        "modality_adapter": {
            "_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector",
            "d_model": int(asr_cfg.encoder.d_model),
        },
    }
    cfg = salm_config(pretrained_llm, pretrained_asr, perception, trainable, lora, True)
    return SALM(cfg)


def build_model(p: ModelParams, lora: LoraParams, seed: int, work_dir: Path) -> SALM:
    """The model the train stage starts from, per `model.preset`. `work_dir` holds generated files (tiny LLM)."""
    if p.preset == "tiny":
        return build_random("tiny", lora, p.trainable, seed, work_dir / "tiny_llm")
    if p.preset == "canary-qwen-2.5b":
        return load_released(p.pretrained, p.revision, lora, p.trainable)
    assert p.pretrained_asr and p.pretrained_llm  # params validation guarantees both for compose
    return build_composed(p.pretrained_asr, p.pretrained_llm, lora, p.trainable)


def apply_freeze(model: SALM) -> int:
    """Apply the config's freeze policy now (NeMo otherwise does it in configure_optimizers); return #trainable."""
    from nemo.collections.speechlm2.parts.optim_setup import freeze_and_subset

    kept = freeze_and_subset(
        model.named_parameters(),
        exclude_patterns=list(model.cfg.get("freeze_params", [])),
        keep_patterns=list(model.cfg.get("prevent_freeze_params", [])),
    )
    count = sum(p.numel() for p in kept)
    if count == 0:
        raise StageError("no trainable parameters: check model.trainable and lora.*")
    return count


def trained_names(model: SALM) -> set[str]:
    """The state-dict keys training changes: trainable parameters plus all buffers (e.g. the encoder's batch-norm
    statistics)."""
    return {name for name, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}


def trained_state(model: SALM) -> dict[str, Any]:
    """What training changes (`trained_names`), as CPU tensors."""
    names = trained_names(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}


def base_model(p: ModelParams, lora: LoraParams, seed: int) -> SALM:
    """The model before fine-tuning, for the base-vs-fine-tuned comparison: the same preset and seed, untrained,
    with our (zero-initialised, so inert) adapter installed."""
    with tempfile.TemporaryDirectory() as tmp:
        return build_model(p, lora, seed, Path(tmp)).eval()


def base_description(p: ModelParams) -> dict[str, Any]:
    """The base model as the exported card and medasr.json name it (hub id and revision where there is one)."""
    if p.preset == "canary-qwen-2.5b":
        return {"id": p.pretrained, "revision": p.revision}
    if p.preset == "compose":
        return {"id": f"{p.pretrained_asr} + {p.pretrained_llm}", "revision": None}
    return {"id": "tiny", "revision": None}
