"""The canary-qwen-2.5b preset as a pod loads it: the release's layout in a Hugging Face cache, read offline through
huggingface_hub, strict about the checkpoint's tensors, pinned to commits; `model.trainable: [llm]`; the compose
preset. The release is a tiny SALM of the same class with the release's config fields and its own LoRA."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import committed_params_text, hf_cache_repo, tiny_params, train_in

# The adapter canary-qwen-2.5b ships inside its checkpoint (its config.json's `lora` block): the loader must merge it.
RELEASED_LORA = {
    "task_type": "CAUSAL_LM",
    "r": 128,
    "lora_alpha": 256,
    "lora_dropout": 0.01,
    "target_modules": ["q_proj", "v_proj"],
}
RELEASE, QWEN = "nvidia/canary-qwen-2.5b", "Qwen/Qwen3-1.7B"
RELEASE_COMMIT, QWEN_COMMIT = "b1469e1" + "0" * 33, "70d244c" + "1" * 33
# files of the real repos a download with medasr.release's patterns leaves out
RELEASE_SKIPPED = (".gitattributes", "README.md")
QWEN_SKIPPED = (".gitattributes", "README.md", "LICENSE", "model-00001-of-00002.safetensors")


@dataclass(frozen=True)
class Release:
    hf_home: Path
    model: Any  # the release-like SALM, its own LoRA unmerged, eval mode
    files: dict[str, bytes]  # the checkpoint repo's root: config.json + model.safetensors
    llm_files: dict[str, bytes]  # the LLM repo's tokenizer + config


def write_cache(hf_home: Path, files: dict[str, bytes], llm_files: dict[str, bytes] | None) -> Path:
    hf_cache_repo(hf_home / "hub", RELEASE, RELEASE_COMMIT, files, RELEASE_SKIPPED)
    if llm_files is not None:
        hf_cache_repo(hf_home / "hub", QWEN, QWEN_COMMIT, llm_files, QWEN_SKIPPED)
    return hf_home


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    """canary-qwen-2.5b's hub layout with a tiny model: a repo whose root holds only config.json (naming
    `pretrained_llm: Qwen/Qwen3-1.7B`, with the release's LoRA block) and model.safetensors, and Qwen's tokenizer +
    LLM config (the tiny ones) as Qwen/Qwen3-1.7B, both in one Hugging Face cache as a download leaves it."""
    from omegaconf import open_dict

    from medasr.model import build_random
    from medasr.params import LoraParams

    root = tmp_path_factory.mktemp("release")
    lora = LoraParams(rank=128, alpha=256, dropout=0.01, target_modules=["q_proj", "v_proj"])
    model = build_random("tiny", lora, ["encoder", "projection"], 0, root / "qwen")
    with torch.no_grad():  # a released adapter is trained, not zero: give lora_B weights so merging matters
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.02)
    with open_dict(model.cfg):
        model.cfg.pretrained_llm, model.cfg.pretrained_asr = QWEN, "nvidia/canary-1b-flash"
    assert dict(model.cfg.lora) == RELEASED_LORA
    model.save_pretrained(root / "saved")
    files = {name: (root / "saved" / name).read_bytes() for name in ("config.json", "model.safetensors")}
    assert json.loads(files["config.json"])["pretrained_llm"] == QWEN
    llm_files = {f.name: f.read_bytes() for f in (root / "qwen").iterdir()}
    return Release(write_cache(root / "hf", files, llm_files), model.eval(), files, llm_files)


def offline(monkeypatch, hf_home: Path) -> None:
    """This process as a pod's after its download: HF_HOME on the cache, HF_HUB_OFFLINE=1 (huggingface_hub reads
    both at import, so its constants are set too)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def canary_params(**overrides):
    return tiny_params(**{"model.preset": "canary-qwen-2.5b", "model.pretrained": RELEASE} | overrides)


@pytest.mark.e2e
def test_the_release_loads_offline_from_the_hub_cache_merged_and_pinned(release, monkeypatch):
    from medasr.model import apply_freeze, base_description, load_released

    offline(monkeypatch, release.hf_home)
    p = canary_params()  # model.revision: null, as committed: `main` in the cache
    loaded = load_released(p.model.pretrained, p.model.revision, p.lora, p.model.trainable).eval()

    # our adapter replaced the released one (merged): rank lora.rank, not 128
    lora_a = [prm for name, prm in loaded.named_parameters() if ".lora_A." in name]
    assert lora_a and all(prm.shape == (p.lora.rank, 64) for prm in lora_a)
    # the same input gives the same logits: merged released LoRA + our zero-initialised adapter == the release
    embeds = torch.randn(1, 7, 64)
    with torch.no_grad():
        expected, got = release.model(embeds)["logits"], loaded(embeds)["logits"]
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()
    # the tokenizer is Qwen's (the LLM repo's snapshot), and the config still names the LLM as released
    assert loaded.tokenizer.text_to_ids("chest pain") == release.model.tokenizer.text_to_ids("chest pain")
    assert loaded.cfg.pretrained_llm == QWEN and "tokenizer_path" not in loaded.cfg
    # `main` resolved to commits: what medasr.json records and load_model loads back
    pins = {"id": RELEASE, "revision": RELEASE_COMMIT, "llm": QWEN, "llm_revision": QWEN_COMMIT}
    assert base_description(p.model) == pins
    # default freeze policy: encoder, projection and our LoRA train; the LLM does not
    trainable = apply_freeze(loaded)
    names = {n for n, prm in loaded.named_parameters() if prm.requires_grad}
    assert any(n.startswith("perception.encoder.") for n in names) and any(".lora_" in n for n in names)
    assert not any(n.startswith(("llm.", "embed_tokens")) and ".lora_" not in n for n in names)
    assert trainable == sum(prm.numel() for n, prm in loaded.named_parameters() if n in names)


@pytest.mark.e2e
def test_a_checkpoint_that_does_not_fit_or_a_missing_tokenizer_is_one_clear_error(release, tmp_path, monkeypatch):
    from safetensors.torch import load, save

    from medasr import StageError
    from medasr.model import load_released

    tensors = load(release.files["model.safetensors"])
    dropped = "perception.encoder.layers.0.conv.depthwise_conv.weight"
    tensors.pop(dropped)
    tensors["llm.extra.weight"] = torch.zeros(2)
    files = release.files | {"model.safetensors": save(tensors)}
    offline(monkeypatch, write_cache(tmp_path / "hf", files, release.llm_files))
    p = canary_params()
    with pytest.raises(StageError) as error:
        load_released(RELEASE, None, p.lora, p.model.trainable)
    message = str(error.value)
    assert f"{RELEASE}@{RELEASE_COMMIT}: model.safetensors does not fit" in message and "\n" not in message
    assert f"1 missing ({dropped}), 1 unexpected (llm.extra.weight)" in message

    # offline without the LLM's tokenizer in the cache: one line naming it, before any model is built
    offline(monkeypatch, write_cache(tmp_path / "no-qwen", release.files, None))
    with pytest.raises(
        StageError, match=r"^tokenizer and config of Qwen/Qwen3-1\.7B@main is not in the Hugging Face cache"
    ) as error:
        load_released(RELEASE, None, p.lora, p.model.trainable)
    assert "\n" not in str(error.value) and "medasr download-model" in str(error.value)


def download_model(cwd: Path, hf_home: Path, preset: str = "canary-qwen-2.5b") -> subprocess.CompletedProcess[str]:
    params = yaml.safe_load(committed_params_text())
    params["model"] |= {"preset": preset, "pretrained": RELEASE, "revision": None}
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    cmd = [sys.executable, "-m", "stages.cli", "download-model"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.e2e  # the release fixture builds a model
def test_download_model_offline_checks_the_cache_in_one_line(release, tmp_path):
    ok = download_model(tmp_path, release.hf_home)
    assert ok.returncode == 0, ok.stderr
    assert f"cached {RELEASE}@{RELEASE_COMMIT} and the tokenizer/config of {QWEN}@{QWEN_COMMIT}" in ok.stderr

    hf_home = tmp_path / "hf"
    shutil.copytree(release.hf_home, hf_home, symlinks=True)
    shutil.rmtree(hf_home / "hub" / f"models--{QWEN.replace('/', '--')}")
    missing = download_model(tmp_path, hf_home)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"tokenizer and config of {QWEN}@main is not in the Hugging Face cache" in errors[0]

    tiny = download_model(tmp_path, hf_home, preset="tiny")
    assert tiny.returncode == 0 and "model.preset tiny: nothing to download" in tiny.stderr


@pytest.mark.e2e
def test_trainable_llm_trains_its_base_weights_and_the_export_is_pinned(release, tmp_path, monkeypatch, demo_manifests):
    """The canary preset trained from the cache as on a pod, with `model.trainable` including the LLM: its base
    weights learn, the export records the pins and reloads at them; `medasr export` merges it but refuses an
    untrained adapter."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from medasr.export import export, load_model
    from medasr.model import apply_freeze, base_model, build_model
    from stages.cli import app

    offline(monkeypatch, release.hf_home)
    p = canary_params(**{"model.trainable": ["encoder", "projection", "llm"], "train.max_steps": 3})
    default = canary_params()
    metrics = train_in(tmp_path, demo_manifests, p)
    base = base_model(default.model, default.lora, default.train.seed)
    llm_base = {
        n: prm for n, prm in base.named_parameters() if n.startswith(("llm.", "embed_tokens")) and ".lora_" not in n
    }
    assert metrics["trainable_params"] == apply_freeze(build_model(default.model, default.lora, 0, tmp_path)) + sum(
        prm.numel() for prm in llm_base.values()
    )
    trained = load_file(str(tmp_path / "model" / "trained.safetensors"))
    up = "llm.base_model.model.model.layers.0.mlp.up_proj.weight"
    assert set(llm_base) <= set(trained) | {"llm.base_model.model.lm_head.weight"}  # tied to embed_tokens, saved once
    assert not torch.equal(trained[up], llm_base[up])  # the LLM's base weights learned

    meta = json.loads((tmp_path / "model" / "medasr.json").read_text())
    pins = {"id": RELEASE, "revision": RELEASE_COMMIT, "llm": QWEN, "llm_revision": QWEN_COMMIT}
    assert meta["base"] == pins
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"`{RELEASE}` at revision `{RELEASE_COMMIT}`" in card and f"`{QWEN}` at revision `{QWEN_COMMIT}`" in card
    # `main` moves on in the cache (a newer release was downloaded): the export still loads its recorded commits
    hub = release.hf_home / "hub"
    for repo in (RELEASE, QWEN):
        (hub / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("f" * 40)
    try:
        loaded = load_model(tmp_path / "model")
    finally:
        for repo, commit in ((RELEASE, RELEASE_COMMIT), (QWEN, QWEN_COMMIT)):
            (hub / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(commit)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())

    merged = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    embeds = torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(embeds)["logits"], load_model(tmp_path / "merged")(embeds)["logits"], atol=1e-5)

    export(base, tmp_path / "untrained", meta, self_contained=False)  # our adapter as installed: lora_B all zero
    refused = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "untrained"), "--out", str(tmp_path / "x")])
    assert refused.exit_code == 1 and not (tmp_path / "x").exists()
    assert "the LoRA adapter is untrained (all 4 lora_B weights are zero)" in refused.output


def test_unloadable_pretrained_is_a_clear_error(tmp_path):
    from medasr import StageError
    from medasr.model import load_released

    p = tiny_params()
    with pytest.raises(StageError, match=r"model\.pretrained='.*missing' is not a folder"):
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
    metrics = train_in(tmp_path, demo_manifests, p)
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
