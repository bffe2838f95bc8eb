"""Build, freeze, export and load the SALM (speech-augmented LM) that the train and eval stages share.

Three presets (`model.preset`), all the same NeMo class `nemo.collections.speechlm2.models.SALM`:
  - `canary-qwen-2.5b`: the released checkpoint (`model.pretrained` at `model.revision`) through
    `SALM.from_pretrained`. Its own LoRA (r=128) is merged into the LLM first, so fine-tuning starts from exactly
    the released weights and `lora.*` shapes only our new adapter.
  - `tiny`: a tiny SALM built offline and deterministically from `train.seed`: a byte-level BPE tokenizer trained on
    a corpus shipped in this package, a 2-layer Qwen3 config, and a 2-layer FastConformer. For tests and the demo.
  - `compose`: any NeMo ASR encoder (`model.pretrained_asr`) with any HF causal LM (`model.pretrained_llm`).
NeMo is imported lazily (10+ s): nothing here runs at CLI start-up.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stages import StageError
from stages.log import get_logger
from stages.params import LoraParams, ModelParams

if TYPE_CHECKING:
    from nemo.collections.speechlm2.models import SALM

log = get_logger(__name__)

AUDIO_TAG = "<|audioplaceholder|>"
PROMPT = f"Transcribe the following: {AUDIO_TAG}"  # canary-qwen's training prompt; identical in train and eval
MEDASR_META = "medasr.json"
TRAINED_WEIGHTS = "trained.safetensors"
LLM_BACKBONE_DIR = "llm_backbone"  # where NeMo's from_pretrained looks for the LLM config beside a checkpoint

# Parameter-name patterns of SALM's parts (names as in SALM.named_parameters(), matched with re.match).
PARTS = {
    "llm": [r"^llm\..+$", r"^embed_tokens\..+$"],
    "preprocessor": [r"^perception\.preprocessor\..+$"],
    "encoder": [r"^perception\.encoder\..+$"],
    "projection": [r"^perception\.(proj|modality_adapter)\..+$"],
}

TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "ffn": 128, "vocab": 512}

# canary-qwen-2.5b's architecture as released (HF config.json, see docs/model.md for sources): used to build the
# full-size model offline with random weights (tests at reduced depth, GPU benchmarks at full size).
RELEASED_LLM = {  # Qwen/Qwen3-1.7B
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
}
RELEASED_LORA = {
    "task_type": "CAUSAL_LM",
    "r": 128,
    "lora_alpha": 256,
    "lora_dropout": 0.01,
    "target_modules": ["q_proj", "v_proj"],
}
RELEASED_PERCEPTION: dict[str, Any] = {  # nvidia/canary-1b-flash's FastConformer + a 1024 -> 2048 projection
    "target": "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
    "output_dim": 2048,
    "modality_adapter": {
        "_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector",
        "d_model": 1024,
    },
    "preprocessor": {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "sample_rate": 16000,
        "normalize": "per_feature",
        "window_size": 0.025,
        "window_stride": 0.01,
        "window": "hann",
        "features": 128,
        "n_fft": 512,
        "log": True,
        "frame_splicing": 1,
        "dither": 1e-05,
        "pad_to": 0,
        "pad_value": 0.0,
    },
    "encoder": {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": 128,
        "feat_out": -1,
        "n_layers": 32,
        "d_model": 1024,
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": 256,
        "causal_downsampling": False,
        "ff_expansion_factor": 4,
        "self_attention_model": "rel_pos",
        "n_heads": 8,
        "att_context_size": [-1, -1],
        "xscaling": False,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
        "conv_kernel_size": 9,
        "conv_norm_type": "batch_norm",
        "dropout": 0.1,
        "dropout_pre_encoder": 0.1,
        "dropout_emb": 0.0,
        "dropout_att": 0.1,
    },
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


TINY_LLM = {
    "hidden_size": TINY["hidden"],
    "intermediate_size": TINY["ffn"],
    "num_hidden_layers": TINY["layers"],
    "num_attention_heads": TINY["heads"],
    "num_key_value_heads": TINY["kv_heads"],
    "head_dim": TINY["head_dim"],
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}


def random_llm_dir(out: Path, shape: dict[str, Any]) -> Path:
    """An HF folder NeMo can build a random-weight Qwen3 LLM from (`pretrained_weights: False` reads only the
    config): a byte-level BPE tokenizer with Qwen's chat special tokens, trained on a corpus shipped in this
    package, and a Qwen3Config of `shape` (TINY_LLM, or RELEASED_LLM for canary-qwen's full size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config

    corpus = resources.files("stages.resources").joinpath("tokenizer_corpus.txt").read_text(encoding="utf-8")
    lines = [line for line in corpus.splitlines() if line and not line.startswith("#")]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=TINY["vocab"],
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    config = Qwen3Config(
        # the released vocabulary size when given (embedding and LM-head cost); else room for the audio tag
        vocab_size=shape.get("vocab_size", len(fast) + 8),
        **{k: v for k, v in shape.items() if k != "vocab_size"},
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    config.save_pretrained(out)
    return out


def _tiny_perception(llm_hidden: int) -> dict[str, Any]:
    """The released perception (preprocessor, FastConformer, projection) shrunk: 2 layers, width 64, no dropout,
    no dither (tests compare tensors bit for bit)."""
    d = TINY["hidden"]
    perception: Any = copy.deepcopy(RELEASED_PERCEPTION)
    perception["output_dim"] = llm_hidden
    perception["modality_adapter"]["d_model"] = d
    perception["preprocessor"]["dither"] = 0.0
    perception["encoder"].update(
        n_layers=2,
        d_model=d,
        n_heads=4,
        subsampling_conv_channels=d,
        ff_expansion_factor=2,
        dropout=0.0,
        dropout_pre_encoder=0.0,
        dropout_emb=0.0,
        dropout_att=0.0,
    )
    return perception


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


def build_tiny(lora: LoraParams, trainable: Sequence[str], seed: int, llm_dir: Path) -> SALM:
    """The tiny preset. Deterministic for `seed`: the same call always gives bit-identical weights."""
    return build_random("tiny", lora, trainable, seed, llm_dir)


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
        perception = _tiny_perception(TINY["hidden"])
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
        return build_tiny(lora, p.trainable, seed, work_dir / "tiny_llm")
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


def trained_state(model: SALM) -> dict[str, Any]:
    """What training changes: trainable parameters plus all buffers (e.g. the encoder's batch-norm statistics)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in trainable | buffers}


def save_tokenizer_and_llm_config(model: SALM, out: Path) -> None:
    """Tokenizer files at the root and the LLM config under llm_backbone/: what NeMo needs to rebuild offline."""
    from peft import PeftModel

    model.tokenizer.tokenizer.save_pretrained(out)
    llm: Any = model.llm.get_base_model() if isinstance(model.llm, PeftModel) else model.llm
    llm.config.save_pretrained(out / LLM_BACKBONE_DIR)


def export(model: SALM, out: Path, meta: dict[str, Any], self_contained: bool) -> None:
    """Write a model folder `load_model` reads back in one call.

    Always: config.json, tokenizer, llm_backbone/config.json, trained.safetensors (our adapter + trained weights),
    medasr.json (how it was made). `self_contained` (tiny and compose presets) also writes the full
    model.safetensors; otherwise (canary-qwen-2.5b) the base weights come from the pinned base checkpoint named in
    medasr.json (the HF cache when offline).
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if self_contained:
        model.save_pretrained(out)
    else:
        cfg = json.loads(json.dumps(_plain(model.cfg)))
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_tokenizer_and_llm_config(model, out)
    save_file(trained_state(model), str(out / TRAINED_WEIGHTS))
    (out / MEDASR_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(model_card(meta))


def model_card(meta: dict[str, Any]) -> str:
    """A short card of how the model was made, from medasr.json."""
    base = meta.get("base", {})
    lines = [
        "# canary-qwen-medical-lora",
        "",
        "LoRA fine-tune of a NeMo SALM speech model for medical speech, made by the medasr pipeline.",
        "",
        f"- base: `{base.get('id')}` at revision `{base.get('revision')}` (preset `{meta.get('preset')}`)",
        f"- adapter: LoRA {json.dumps(meta.get('lora'))}; also trained: {', '.join(meta.get('trainable', [])) or '-'}",
        f"- exported step: {meta.get('step')}; merged: {meta.get('merged', False)}",
        f"- training data sha256: `{meta.get('data_sha256')}`; train fingerprint `{meta.get('fingerprint')}`",
        f"- git commit: `{meta.get('git_commit')}`",
        "",
        'Load: `from stages.model import load_model; model = load_model("<this folder>")`, or',
        "`medasr transcribe <this folder> audio.wav`. Prompt: `Transcribe the following: <|audioplaceholder|>`.",
        "",
        "Full params: see `medasr.json`.",
        "",
    ]
    return "\n".join(lines)


def export_merged(src: Path, out: Path) -> None:
    """A self-contained copy of an exported model with our LoRA merged into the LLM weights (plain SALM, no PEFT).
    Its logits match the unmerged model's to float precision."""
    model = load_model(src)
    merge_released_lora(model)  # the same merge, applied to our adapter
    meta = json.loads((src / MEDASR_META).read_text()) | {"merged": True}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer_and_llm_config(model, out)
    (out / MEDASR_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(model_card(meta))


def _plain(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def load_model(folder: str | Path) -> SALM:
    """Load an exported model folder for inference, in one call (eval mode, CPU; move it with `.to(device)`)."""
    from nemo.collections.speechlm2.models import SALM
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_file = folder / MEDASR_META
    if not meta_file.is_file():
        raise StageError(f"{folder} is not a medasr model folder (no {MEDASR_META})")
    meta = json.loads(meta_file.read_text())
    if (folder / "model.safetensors").is_file():
        model = SALM.from_pretrained(str(folder))
    else:
        from stages.params import LoraParams

        lora = LoraParams(**meta["lora"])
        model = load_released(meta["base"]["id"], meta["base"]["revision"], lora, meta["trainable"])
        missing = model.load_state_dict(load_file(str(folder / TRAINED_WEIGHTS)), strict=False)
        if missing.unexpected_keys:
            raise StageError(f"{folder}: weights do not fit the base model: {missing.unexpected_keys[:5]}")
    return model.eval()


def base_model(p: ModelParams, lora: LoraParams, seed: int) -> SALM:
    """The model before fine-tuning, for the base-vs-fine-tuned comparison: the same preset and seed, untrained,
    with our (zero-initialised, so inert) adapter installed."""
    with tempfile.TemporaryDirectory() as tmp:
        return build_model(p, lora, seed, Path(tmp)).eval()
