"""An exported model folder: what `export` writes, what `load_model` reads back in one call, and the merged copy
`medasr export` writes. The folder holds config.json, the tokenizer, llm_backbone/config.json, trained.safetensors
(our adapter + trained weights) and medasr.json (how it was made), plus the full weights when self-contained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medasr import StageError
from medasr.device import Precision, resolve_precision
from medasr.log import get_logger
from medasr.model import PROMPT, load_released, load_salm, merge_released_lora, trained_state
from medasr.params import LoraParams
from medasr.paths import EVAL_METRICS, MEDASR_META, TRAINED_WEIGHTS
from medasr.release import LLM_BACKBONE_DIR, WEIGHTS
from medasr.secrets import REDACTED, one_line

log = get_logger(__name__)

if TYPE_CHECKING:
    from nemo.collections.speechlm2.models import SALM


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


CARD_NAME = "canary-qwen-medical-lora"
LICENSE = "cc-by-4.0"  # nvidia/canary-qwen-2.5b's licence, which a fine-tune of it keeps
RELEASED_BASE = "canary-qwen-2.5b"  # the one preset whose base is a hub model a card can name


def model_card(meta: dict[str, Any], results: dict[str, Any] | None = None) -> str:
    """A short card of how the model was made, from medasr.json, under Hugging Face's YAML front matter; with
    `results` (metrics/eval.json) also each test set's WER, in the front matter's `model-index` and as a table."""
    base = meta.get("base", {})
    pins = f"`{base.get('id')}` at revision `{base.get('revision')}`"
    if "llm" in base:  # the release's tokenizer and LLM config come from another repo, pinned as well
        pins += f", tokenizer and LLM config `{base['llm']}` at revision `{base.get('llm_revision')}`"
    lines = [
        card_metadata(meta, results),
        f"# {CARD_NAME}",
        "",
        "LoRA fine-tune of a NeMo SALM speech model for medical speech, made by the medasr pipeline.",
        "",
        f"- base: {pins} (preset `{meta.get('preset')}`)",
        f"- adapter: LoRA {json.dumps(meta.get('lora'))}; also trained: {', '.join(meta.get('trainable', [])) or '-'}",
        f"- exported step: {meta.get('step')}; merged: {meta.get('merged', False)}",
        f"- training data sha256: `{meta.get('data_sha256')}`; train fingerprint `{meta.get('fingerprint')}`",
        f"- git commit: `{meta.get('git_commit')}`",
        "",
        *results_table(results),
        'Load: `from medasr.export import load_model; model = load_model("<this folder>")`, or',
        f"`medasr transcribe <this folder> audio.wav`. Prompt: `{PROMPT}`.",
        "",
        "Full params: see `medasr.json`.",
        "",
    ]
    return "\n".join(lines)


def scored_sets(results: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """The scored test sets of eval.json (val and the training sample are no evidence of generalisation)."""
    sets = (results or {}).get("test", {})
    return [(name, block) for name, block in sorted(sets.items()) if block["finetuned"].get("wer") is not None]


def card_metadata(meta: dict[str, Any], results: dict[str, Any] | None) -> str:
    """The card's YAML front matter, written by huggingface_hub itself so the hub parses it back: licence,
    language, base model (the released one only: tiny and composed bases are no hub model), and a `model-index`
    entry per test set with the fine-tuned model's WER in %."""
    from huggingface_hub import EvalResult, ModelCardData

    evals = [
        EvalResult(
            task_type="automatic-speech-recognition",
            task_name="Automatic Speech Recognition",
            dataset_type=block["dataset"] if block.get("hub") else name,  # the hub's id; a local path means nothing
            dataset_name=name,
            dataset_config=block.get("config"),
            dataset_split=block.get("split"),
            dataset_revision=block.get("revision") if block.get("hub") else None,
            metric_type="wer",
            metric_name="WER (%)",
            metric_value=round(100 * block["finetuned"]["wer"], 2),
        )
        for name, block in scored_sets(results)
    ]
    data = ModelCardData(
        language="en",
        license=LICENSE,
        base_model=meta.get("base", {}).get("id") if meta.get("preset") == RELEASED_BASE else None,
        library_name="nemo",
        pipeline_tag="automatic-speech-recognition",
        tags=["medical", "speech-recognition", "lora", "nemo", "medasr"],
        metrics=["wer"],
        model_name=CARD_NAME,
        eval_results=evals or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def results_table(results: dict[str, Any] | None) -> list[str]:
    """WER per test set, base vs fine-tuned, with the 95 % intervals eval computed, as Markdown lines."""
    rows = scored_sets(results)
    if not rows:
        return []

    def pct(value: float | None, ci: list[float] | None = None) -> str:
        text = "-" if value is None else f"{100 * value:.2f}"
        return f"{text} [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci and value is not None else text

    lines = [
        "## Results",
        "",
        "WER (%) per held-out test set, greedy decoding, with 95 % paired-bootstrap intervals; a reduction whose",
        "interval excludes zero is unlikely to be sampling noise. All figures: the pipeline's `metrics/eval.json`.",
        "",
        "| test set | kind | utterances | base WER | fine-tuned WER | reduction |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, block in rows:
        base, tuned = block["base"], block["finetuned"]
        lines.append(
            f"| {name} | {block.get('kind', 'medical')} | {tuned.get('utterances')} "
            f"| {pct(base.get('wer'), base.get('wer_ci'))} | {pct(tuned['wer'], tuned.get('wer_ci'))} "
            f"| {pct(block.get('wer_reduction'), block.get('wer_reduction_ci'))} |"
        )
    return [*lines, ""]


def model_identity(folder: Path) -> dict[str, Any]:
    """Which trained model a folder holds (medasr.json's train fingerprint and exported step): eval records it in
    eval.json's `runtime.model`, and export puts eval's results on a card only when they match."""
    meta = read_meta(folder)
    return {"fingerprint": meta.get("fingerprint"), "step": meta.get("step")}


def eval_results(model_dir: Path, metrics: Path = EVAL_METRICS) -> dict[str, Any] | None:
    """metrics/eval.json when it scored the model in `model_dir`; otherwise (another model, or an eval.json from
    before eval recorded which model it scored) None, with a warning: the card carries no results rather than
    another model's."""
    if not metrics.is_file():
        return None
    results = json.loads(metrics.read_text())
    scored, exported = results.get("runtime", {}).get("model"), model_identity(model_dir)
    if scored != exported:
        log.warning("%s scored model %s, not %s's %s: the card has no results", metrics, scored, model_dir, exported)
        return None
    return results


def export_merged(src: Path, out: Path, results: dict[str, Any] | None = None) -> None:
    """A self-contained copy of an exported model with our LoRA merged into the LLM weights (plain SALM, no PEFT).
    Its logits match the unmerged model's to float precision. `results`: eval.json's, for the card."""
    from medasr.device import place

    untrained_adapter(src)
    # on the accelerator, in the training precision: the merged weights are saved in the dtype training used
    model = place(load_model(src), model_precision(src))
    merge_released_lora(model)  # the same merge, applied to our adapter
    meta = read_meta(src) | {"merged": True}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer_and_llm_config(model, out)
    (out / MEDASR_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(model_card(meta, results))


def untrained_adapter(folder: Path) -> None:
    """Refuse a model folder whose LoRA never trained: PEFT initialises every lora_B to zero, so an all-zero B means
    merging changes nothing (an export of a run that did not train, or of the base itself)."""
    from safetensors import safe_open

    weights = folder / TRAINED_WEIGHTS
    if not weights.is_file():
        raise StageError(f"{folder} is not a medasr model folder (no {TRAINED_WEIGHTS})")
    with safe_open(str(weights), "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        lora_b = [name for name in names if ".lora_B." in name]
        if lora_b and not any(f.get_tensor(name).any() for name in lora_b):
            raise StageError(f"{folder}: the LoRA adapter is untrained (all {len(lora_b)} lora_B weights are zero)")


def model_precision(folder: Path) -> Precision:
    """The precision an exported model runs in: the one it was trained in (medasr.json `precision`), or this
    machine's default for folders exported before that was recorded. A bf16 model on a CPU where torch has no bf16
    runs in fp32 (upcasting loses nothing), with a warning. One line, before any model is loaded, when `folder` is
    not a model folder."""
    trained = read_meta(folder).get("precision", "auto")
    try:
        return resolve_precision(trained)
    except StageError as exc:
        log.warning("%s was trained in %s: %s; running it in fp32", folder, trained, exc)
        return "32"


def read_meta(folder: str | Path) -> dict[str, Any]:
    """An exported folder's medasr.json (how the model was made); one line when `folder` is not a model folder."""
    meta_file = Path(folder) / MEDASR_META
    if not meta_file.is_file():
        raise StageError(f"{folder} is not a medasr model folder (no {MEDASR_META})")
    return json.loads(meta_file.read_text())


def _plain(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def load_model(folder: str | Path) -> SALM:
    """Load an exported model folder for inference, in one call (eval mode, CPU; move it with `.to(device)`)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_meta(folder)
    if (folder / WEIGHTS).is_file():
        model = load_salm(folder, folder / LLM_BACKBONE_DIR, folder, str(folder))
    else:  # the base at the commits recorded at training (medasr/release.py), never whatever is newest now
        base, lora = meta["base"], LoraParams(**meta["lora"])
        model = load_released(base["id"], base["revision"], lora, meta["trainable"], base.get("llm_revision"))
        missing = model.load_state_dict(load_file(str(folder / TRAINED_WEIGHTS)), strict=False)
        if missing.unexpected_keys:
            raise StageError(f"{folder}: weights do not fit the base model: {missing.unexpected_keys[:5]}")
    return model.eval()


# --- the Hugging Face Hub --------------------------------------------------------------------------------------------
HF_TOKEN_ENV = "HF_TOKEN"  # the token is read from the environment only: never an argument, never logged


def hub_token(repo_id: str) -> str:
    """The token for an upload to `repo_id`; one line, before any work, when it is absent or the id is malformed."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise StageError(f"--push-to-hub {repo_id!r} is not a Hugging Face repo id: {one_line(exc)}") from None
    if not (token := os.environ.get(HF_TOKEN_ENV, "")):
        raise StageError(f"--push-to-hub needs {HF_TOKEN_ENV} (a token with write access) in the environment or .env")
    return token


def push_to_hub(folder: Path, repo_id: str, token: str) -> str:
    """Upload an exported folder to the Hugging Face model repo `repo_id` in one commit, creating the repo private
    when it is missing (publishing a model trained on clinical speech is a person's decision); its commit URL. A
    hub that refuses or cannot be reached is one line, and the folder stays as written."""
    from httpx2 import HTTPError
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    log.info("uploading %s to the Hugging Face Hub: %s", folder, repo_id)
    try:
        repo = api.create_repo(repo_id, private=True, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=f"medasr export {folder}")
    except (HTTPError, OSError, ValueError) as exc:  # HTTP status, network, and card metadata the hub rejects
        reason = one_line(exc).replace(token, REDACTED)
        raise StageError(f"upload to the Hugging Face Hub ({repo_id}) failed, {folder} kept: {reason}") from None
    return commit.commit_url
