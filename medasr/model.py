"""Build and freeze the SALM (speech-augmented LM) that the train and eval stages share.

Three presets (`model.preset`), all the same NeMo class `nemo.collections.speechlm2.models.SALM`:
  - `canary-qwen-2.5b`: the released checkpoint (`model.pretrained` at `model.revision`), built the way
    `SALM.from_pretrained` builds it but with the tokenizer/LLM config at a resolved commit (medasr/release.py) and
    every tensor of the file required to fit (`load_salm`). Its own LoRA (r=128) is merged into the LLM first, so
    fine-tuning starts from exactly the released weights and `lora.*` shapes only our new adapter.
  - `tiny`: a tiny SALM built offline and deterministically from `train.seed`: a byte-level BPE tokenizer trained on
    a corpus shipped in this package, a 2-layer Qwen3 config, and a 2-layer FastConformer. For tests and the demo.
  - `compose`: any NeMo ASR encoder (`model.pretrained_asr`) with any HF causal LM (`model.pretrained_llm`).
NeMo is imported lazily (10+ s): nothing here runs at CLI start-up. The exported folder: medasr/export.py.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medasr import StageError
from medasr.architectures import RELEASED_LLM, RELEASED_PERCEPTION, TINY, TINY_LLM, random_llm_dir, tiny_perception
from medasr.log import get_logger
from medasr.params import LoraParams, ModelParams
from medasr.release import CONFIG, WEIGHTS, resolve

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


def load_salm(checkpoint: Path, llm_config_dir: Path, tokenizer_dir: Path, name: str) -> SALM:
    """A SALM from a folder holding config.json + model.safetensors, as NeMo's `from_pretrained` builds it (modules
    from the config, `pretrained_weights` off, then the file's weights), but with the LLM config and tokenizer read
    from the given folders and strict: NeMo's hub mixin drops missing and unexpected tensors without a word."""
    from nemo.collections.speechlm2.models import SALM
    from omegaconf import open_dict
    from safetensors.torch import load_model

    cfg = json.loads((checkpoint / CONFIG).read_text())
    named_llm = cfg["pretrained_llm"]
    cfg |= {"pretrained_weights": False, "pretrained_llm": str(llm_config_dir), "tokenizer_path": str(tokenizer_dir)}
    try:
        model = SALM(cfg)
    except (OSError, ValueError) as exc:
        raise StageError(f"could not build {name} from its config.json: {str(exc).splitlines()[0][:200]}") from None
    # The names before merge_released_lora: a checkpoint with its own LoRA is built with it (config's `lora`), so
    # its PEFT names (`base_layer`, `lora_A.default`) match. Tied tensors saved once count as present.
    missing, unexpected = load_model(model, checkpoint / WEIGHTS, strict=False)
    if missing or unexpected:
        fit = f"{_keys(missing, 'missing')}, {_keys(unexpected, 'unexpected')}"
        raise StageError(f"{name}: {WEIGHTS} does not fit the model its config.json builds: {fit}")
    with open_dict(model.cfg):  # the config names the LLM as released; the folders used are the caller's to record
        model.cfg.pretrained_llm = named_llm
        model.cfg.pop("tokenizer_path")
    return model


def _keys(names: Sequence[str], what: str) -> str:
    shown = ", ".join(sorted(names)[:3])
    return f"{len(names)} {what}" + (f" ({shown}{', ...' if len(names) > 3 else ''})" if names else "")


def load_released(
    pretrained: str, revision: str | None, lora: LoraParams, trainable: Sequence[str], llm_revision: str | None = None
) -> SALM:
    """The canary-qwen-2.5b preset: the released weights (hub id at `revision`, or a local dir) with its tokenizer
    and LLM config (`pretrained_llm` at `llm_revision`), its LoRA merged, ours installed."""
    release = resolve(pretrained, revision, llm_revision)
    where = f"{pretrained}@{release.revision}" if release.revision else pretrained
    model = load_salm(release.checkpoint, release.llm_config_dir, release.tokenizer_dir, where)
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
        model = build_random("tiny", lora, p.trainable, seed, work_dir / "tiny_llm")
    elif p.preset == "canary-qwen-2.5b":
        model = load_released(p.pretrained, p.revision, lora, p.trainable)
    else:
        assert p.pretrained_asr and p.pretrained_llm  # params validation guarantees both for compose
        model = build_composed(p.pretrained_asr, p.pretrained_llm, lora, p.trainable)
    if "llm" in p.trainable:
        unfreeze(model, "llm")
    return model


def unfreeze(model: SALM, part: str) -> None:
    """Make a part trainable. PEFT freezes every base weight of the LLM when it installs LoRA, and NeMo's
    freeze_and_subset never unfreezes (it skips frozen parameters), so leaving `llm` out of freeze_params alone
    trains nothing more."""
    patterns = [re.compile(pattern) for pattern in PARTS[part]]
    for name, param in model.named_parameters():
        if any(pattern.match(name) for pattern in patterns):
            param.requires_grad = True


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
    names, seen, state = trained_names(model), set(), {}
    for k, v in model.state_dict().items():
        # a tied tensor once (the LLM's lm_head is the embedding when it trains): safetensors refuses shared memory,
        # and loading the one name sets both
        if k in names and (memory := (v.data_ptr(), v.shape) if v.numel() else k) not in seen:
            seen.add(memory)
            state[k] = v.detach().cpu().contiguous()
    return state


def base_model(p: ModelParams, lora: LoraParams, seed: int, pins: dict[str, Any] | None = None) -> SALM:
    """The model before fine-tuning, for the base-vs-fine-tuned comparison: the same preset and seed, untrained,
    with our (zero-initialised, so inert) adapter installed. `pins`: the `base` block of the fine-tuned model's
    medasr.json, so the released checkpoint and tokenizer are those it was trained from, not whatever is newest."""
    if p.preset == "canary-qwen-2.5b" and pins:
        return load_released(pins["id"], pins["revision"], lora, p.trainable, pins.get("llm_revision")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        return build_model(p, lora, seed, Path(tmp)).eval()


def base_description(p: ModelParams) -> dict[str, Any]:
    """The base model as the exported card and medasr.json name it, pinned: for canary-qwen-2.5b the commits of
    the checkpoint and of its LLM's tokenizer/config, as the cache resolves them now (what `build_model` loaded),
    which `load_model` loads back."""
    if p.preset == "canary-qwen-2.5b":
        return resolve(p.pretrained, p.revision, local=True).pins()
    if p.preset == "compose":
        return {"id": f"{p.pretrained_asr} + {p.pretrained_llm}", "revision": None}
    return {"id": "tiny", "revision": None}
