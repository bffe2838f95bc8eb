"""Model presets beyond `tiny`: the released canary-qwen-2.5b architecture through the exact preset loader."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_params

pytestmark = pytest.mark.e2e


def released_like_checkpoint(out, llm_layers: int = 1, encoder_layers: int = 1):
    """canary-qwen-2.5b's released architecture (Qwen3-1.7B shapes + canary-1b-flash FastConformer + LoRA r=128),
    at reduced depth with random weights, saved the way the release is laid out. The vocabulary is the tiny
    preset's tokenizer: Qwen's tokenizer cannot be fetched offline, and the loader path does not depend on it."""
    from nemo.collections.speechlm2.models import SALM
    from transformers import Qwen3Config

    from stages.model import (
        RELEASED_LLM,
        RELEASED_LORA,
        RELEASED_PERCEPTION,
        _tiny_llm_dir,
        save_tokenizer_and_llm_config,
    )

    llm_dir = _tiny_llm_dir(out / "qwen3_src", seed=0)
    tiny = Qwen3Config.from_pretrained(llm_dir)
    shapes = RELEASED_LLM | {"num_hidden_layers": llm_layers, "vocab_size": tiny.vocab_size}
    Qwen3Config(**shapes, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id).save_pretrained(llm_dir)
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


def test_released_architecture_loads_through_the_preset_loader(tmp_path):
    from stages.model import apply_freeze, load_released

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


def test_unloadable_pretrained_is_a_clear_error(tmp_path):
    from stages import StageError
    from stages.model import load_released

    p = tiny_params()
    with pytest.raises(StageError, match=r"could not load model\.pretrained"):
        load_released(str(tmp_path / "missing"), None, p.lora, p.model.trainable)
