"""Where the canary-qwen-2.5b preset's files come from, resolved to commits: the released checkpoint and the
tokenizer + config of the LLM its config names.

The hub repo `nvidia/canary-qwen-2.5b` holds only `config.json` and `model.safetensors` at its root; its config's
`pretrained_llm` (`Qwen/Qwen3-1.7B`) supplies the tokenizer and the LLM's config (not its weights). Both repos are
resolved through huggingface_hub's cache (HF_HOME / HF_HUB_CACHE): online, a branch such as `main` resolves to the
newest commit and the files are downloaded; offline (HF_HUB_OFFLINE=1) the cache's refs/ and snapshots/ answer. The
resolved commits are what medasr.json records, so eval and `medasr transcribe` rebuild the same base.
No NeMo here: `medasr download-model` fills the cache without importing it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medasr import StageError
from medasr.log import get_logger

log = get_logger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CHECKPOINT_FILES = [CONFIG, WEIGHTS]
# What SALM reads from `pretrained_llm` when it builds from a config (`pretrained_weights: False`): the tokenizer
# (transformers' AutoTokenizer) and AutoConfig. Never the LLM's weights: the checkpoint holds them.
LLM_FILES = [CONFIG, "generation_config.json", "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json"]
LLM_REQUIRED = [CONFIG, "tokenizer_config.json"]
LLM_BACKBONE_DIR = "llm_backbone"  # NeMo's layout beside a local checkpoint: tokenizer at the root, LLM config here


@dataclass(frozen=True)
class Release:
    """A checkpoint folder (config.json + model.safetensors) and the folders its tokenizer and LLM config are read
    from, with the commits they were resolved to (None for a local folder)."""

    pretrained: str
    checkpoint: Path
    revision: str | None
    llm: str  # `pretrained_llm` as the checkpoint's config names it
    llm_config_dir: Path
    tokenizer_dir: Path
    llm_revision: str | None

    def pins(self) -> dict[str, Any]:
        """What medasr.json records as `base`, and what `resolve` takes back to rebuild the same model."""
        return {"id": self.pretrained, "revision": self.revision, "llm": self.llm, "llm_revision": self.llm_revision}


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _snapshot(
    repo: str, revision: str | None, patterns: list[str], required: list[str], what: str, local: bool
) -> Path:
    """The cache's snapshot folder of `repo` at `revision` (downloading what `patterns` match unless offline or
    `local`), checked to hold `required`. Any failure is one line naming the repo, revision and what is missing."""
    from huggingface_hub import constants, snapshot_download

    where = f"{what} {repo}@{revision or 'main'}"
    hint = "run `medasr download-model` with network access (HF_HOME on the volume)"
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=local))
    except (OSError, ValueError) as exc:  # huggingface_hub's errors: OSError (offline, not found), ValueError (bad id)
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0].split(". ")[0][:200]  # its first sentence
        state = "offline: " if offline() or local else ""
        cache = constants.HF_HUB_CACHE
        raise StageError(f"{where} is not in the Hugging Face cache {cache} ({state}{reason}): {hint}") from None
    if missing := [name for name in required if not (folder / name).is_file()]:
        raise StageError(f"{where}: {', '.join(missing)} missing from the Hugging Face cache ({folder}): {hint}")
    return folder


def resolve(pretrained: str, revision: str | None, llm_revision: str | None = None, local: bool = False) -> Release:
    """The checkpoint `pretrained` (hub id at `revision`, or a local folder) and its LLM's tokenizer + config
    (`pretrained_llm` from its config.json: a hub id at `llm_revision`, default main, or a local folder).
    `local`: the cache only, never the network (what is cached is what was loaded)."""
    if Path(pretrained).is_dir():
        checkpoint, revision = Path(pretrained), None
        if missing := [name for name in CHECKPOINT_FILES if not (checkpoint / name).is_file()]:
            raise StageError(f"model.pretrained={pretrained!r}: {', '.join(missing)} missing")
    elif pretrained.startswith((".", "/", "~")):
        raise StageError(f"model.pretrained={pretrained!r} is not a folder")
    else:
        checkpoint = _snapshot(pretrained, revision, CHECKPOINT_FILES, CHECKPOINT_FILES, "checkpoint", local)
        revision = checkpoint.name  # the snapshot folder is named by its commit
    llm = json.loads((checkpoint / CONFIG).read_text())["pretrained_llm"]
    if (checkpoint / LLM_BACKBONE_DIR / CONFIG).is_file() and (checkpoint / "tokenizer_config.json").is_file():
        # a local checkpoint saved with its tokenizer and LLM config (an exported medasr model): as NeMo reads it
        return Release(pretrained, checkpoint, revision, llm, checkpoint / LLM_BACKBONE_DIR, checkpoint, None)
    if Path(llm).is_dir():
        return Release(pretrained, checkpoint, revision, llm, Path(llm), Path(llm), None)
    llm_dir = _snapshot(llm, llm_revision, LLM_FILES, LLM_REQUIRED, "tokenizer and config of", local)
    return Release(pretrained, checkpoint, revision, llm, llm_dir, llm_dir, llm_dir.name)


def download(preset: str, pretrained: str, revision: str | None) -> Release | None:
    """Put the preset's checkpoint and LLM tokenizer/config in the Hugging Face cache before any stage needs them
    (offline: check they are there). Nothing for the presets built or fetched elsewhere."""
    if preset != "canary-qwen-2.5b":
        log.info("model.preset %s: nothing to download (tiny is built offline; compose is fetched by NeMo)", preset)
        return None
    if offline():
        log.info("HF_HUB_OFFLINE is set: checking the Hugging Face cache only")
    release = resolve(pretrained, revision)
    log.info(
        "cached %s@%s and the tokenizer/config of %s@%s",
        pretrained,
        release.revision,
        release.llm,
        release.llm_revision,
    )
    return release
