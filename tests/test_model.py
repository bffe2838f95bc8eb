"""Model presets beyond `tiny`: the released canary-qwen-2.5b architecture through the exact preset loader."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_params

# The adapter canary-qwen-2.5b ships inside its checkpoint (its config.json's `lora` block): the loader must merge it.
RELEASED_LORA = {
    "task_type": "CAUSAL_LM",
    "r": 128,
    "lora_alpha": 256,
    "lora_dropout": 0.01,
    "target_modules": ["q_proj", "v_proj"],
}


def released_like_checkpoint(out, llm_layers: int = 1, encoder_layers: int = 1):
    """canary-qwen-2.5b's released architecture (Qwen3-1.7B shapes + canary-1b-flash FastConformer + LoRA r=128),
    at reduced depth with random weights, saved the way the release is laid out. The vocabulary is the tiny
    preset's tokenizer: Qwen's tokenizer cannot be fetched offline, and the loader path does not depend on it."""
    from nemo.collections.speechlm2.models import SALM
    from transformers import Qwen3Config

    from medasr.architectures import RELEASED_LLM, RELEASED_PERCEPTION, random_llm_dir
    from medasr.export import save_tokenizer_and_llm_config

    shapes = {k: v for k, v in RELEASED_LLM.items() if k != "vocab_size"} | {"num_hidden_layers": llm_layers}
    llm_dir = random_llm_dir(out / "qwen3_src", shapes)
    assert Qwen3Config.from_pretrained(llm_dir).intermediate_size == RELEASED_LLM["intermediate_size"]
    perception = copy.deepcopy(RELEASED_PERCEPTION)
    perception["encoder"]["n_layers"] = encoder_layers
    cfg = {
        "pretrained_llm": str(llm_dir),
        "pretrained_asr": "nvidia/canary-1b-flash",
        "pretrained_weights": False,
        "prompt_format": "qwen",
        "audio_locator_tag": "<|audioplaceholder|>",
        "freeze_params": [r"^llm\..+$", r"^embed_tokens\..+$"],
        "prevent_freeze_params": [],
        "lora": dict(RELEASED_LORA),
        "perception": perception,
    }
    torch.manual_seed(0)
    model = SALM(cfg)
    with torch.no_grad():  # a released adapter is trained, not zero: give lora_B weights so merging matters
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.02)
    ckpt = out / "canary-like"
    model.save_pretrained(ckpt)
    save_tokenizer_and_llm_config(model, ckpt)
    return model.eval(), ckpt


@pytest.mark.e2e
def test_released_architecture_loads_through_the_preset_loader(tmp_path):
    from medasr.model import apply_freeze, load_released

    original, ckpt = released_like_checkpoint(tmp_path)
    p = tiny_params(**{"model.preset": "canary-qwen-2.5b", "model.pretrained": str(ckpt)})
    loaded = load_released(p.model.pretrained, None, p.lora, p.model.trainable).eval()

    # our adapter replaced the released one (rank 8 on the 2048-wide projections), and the released one was merged
    lora_a = [prm for name, prm in loaded.named_parameters() if ".lora_A." in name]
    assert lora_a and all(prm.shape == (p.lora.rank, 2048) for prm in lora_a)
    assert loaded.perception.encoder.d_model == 1024 and loaded.perception.proj.out_features == 2048
    # the same input gives the same logits: merged released LoRA + our zero-initialised adapter == the release
    embeds = torch.randn(1, 7, 2048)
    with torch.no_grad():
        expected = original(embeds)["logits"]
        got = loaded(embeds)["logits"]
    assert torch.allclose(expected, got, atol=1e-4), (expected - got).abs().max()
    # default freeze policy: encoder, projection and our LoRA train; the LLM does not
    trainable = apply_freeze(loaded)
    names = {n for n, prm in loaded.named_parameters() if prm.requires_grad}
    assert any(n.startswith("perception.encoder.") for n in names) and any(".lora_" in n for n in names)
    assert not any(n.startswith("llm.") and ".lora_" not in n for n in names)
    assert not any(n.startswith("embed_tokens") for n in names)
    assert trainable == sum(prm.numel() for n, prm in loaded.named_parameters() if n in names)


@pytest.mark.e2e  # imports NeMo and asks it to load a checkpoint
def test_unloadable_pretrained_is_a_clear_error(tmp_path):
    from medasr import StageError
    from medasr.model import load_released

    p = tiny_params()
    with pytest.raises(StageError, match=r"could not load model\.pretrained"):
        load_released(str(tmp_path / "missing"), None, p.lora, p.model.trainable)


def tiny_asr_nemo(path):
    """A tiny NeMo CTC ASR model saved as .nemo: the kind of encoder the compose preset takes."""
    from nemo.collections.asr.models import EncDecCTCModel
    from omegaconf import OmegaConf

    from medasr.architectures import tiny_perception

    perception = tiny_perception(64)
    labels = list("abcdefghijklmnopqrstuvwxyz' ")
    decoder = {
        "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
        "feat_in": 64,
        "num_classes": len(labels),
        "vocabulary": labels,
    }
    cfg = {
        "sample_rate": 16000,
        "labels": labels,
        "preprocessor": perception["preprocessor"],
        "encoder": perception["encoder"],
        "decoder": decoder,
    }
    torch.manual_seed(0)
    EncDecCTCModel(cfg=OmegaConf.create(cfg)).save_to(str(path))
    return path


def tiny_hf_llm(path, hidden: int = 96):
    """A tiny HF causal LM folder whose width differs from the encoder's, so the projection is a real Linear."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from medasr.architectures import TINY_LLM, random_llm_dir

    random_llm_dir(path, TINY_LLM)
    tiny = Qwen3Config.from_pretrained(path)
    config = Qwen3Config(
        vocab_size=tiny.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        tie_word_embeddings=True,
        eos_token_id=tiny.eos_token_id,
        pad_token_id=tiny.pad_token_id,
    )
    torch.manual_seed(3)
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.e2e
def test_compose_preset_trains_a_local_nemo_encoder_with_a_local_hf_llm(tmp_path, demo_manifests):
    from nemo.collections.asr.models import ASRModel
    from transformers import AutoModelForCausalLM

    from medasr.export import load_model
    from stages.train.run import run

    nemo = tiny_asr_nemo(tmp_path / "asr.nemo")
    llm_dir = tiny_hf_llm(tmp_path / "llm")
    p = tiny_params(
        **{
            "model.preset": "compose",
            "model.pretrained_asr": str(nemo),
            "model.pretrained_llm": str(llm_dir),
            "train.max_steps": 4,
        }
    )
    metrics = run(
        p.model,
        p.lora,
        p.train,
        manifest_dir=demo_manifests,
        ckpt_root=tmp_path / "ckpt",
        model_dir=tmp_path / "model",
        metrics_file=tmp_path / "train.json",
        curves_dir=tmp_path / "curves",
        mirror_checkpoints=False,  # never into whatever remote the developer's checkout has
    )
    model = load_model(tmp_path / "model")

    assert metrics["global_step"] == 4
    assert isinstance(model.perception.proj, torch.nn.Linear)
    assert (model.perception.proj.in_features, model.perception.proj.out_features) == (64, 96)
    # started from the pretrained parts: the frozen LLM still holds the folder's weights, the encoder has trained
    hf = AutoModelForCausalLM.from_pretrained(llm_dir).state_dict()
    base = model.llm.get_base_model().state_dict()
    assert all(torch.equal(hf[k], base[k]) for k in hf if k in base and "embed" not in k)
    asr = ASRModel.restore_from(str(nemo)).encoder.state_dict()
    trained = model.perception.encoder.state_dict()
    assert asr.keys() == trained.keys() and any(not torch.equal(asr[k], trained[k]) for k in asr)
