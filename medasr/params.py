"""Typed params: one validated block per stage, loaded from params.yaml.

Every block is checked before a stage touches anything. All problems in the file are reported together, each with
its key path (`subset.max_duration: ...`), so a user fixes them in one pass. `params.yaml` is the single source of
values; the models here only say what is allowed, so fields without a natural "unset" are required.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

# canary-qwen-2.5b was trained on clips up to 40 s; longer input degrades or is truncated.
MODEL_MAX_AUDIO_SECONDS = 40.0

NonEmptyStr = Annotated[str, Field(min_length=1)]


class ParamsError(ValueError):
    """params.yaml is unreadable or invalid; `problems` lists every issue found, one line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


class _Block(BaseModel):
    # strict: a quoted "10" is a typo, not an int; extra="forbid": a misspelt key must not be silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FetchParams(_Block):
    dataset: NonEmptyStr = Field(
        description="Hugging Face hub id, or a local path: parquet file/folder, audiofolder, NeMo manifest (.json), "
        "segment list folder (medical_<split>.info) or TextGrid folder"
    )
    revision: str | None = Field(None, description="hub only: commit sha to pin (ignored for local paths)")
    config: str | None = Field(None, description="hub only: dataset config name (ignored for local paths)")
    hub_download: Literal["datasets", "snapshot"] = Field(
        "datasets",
        description="hub only: 'datasets' = datasets.load_dataset; 'snapshot' = download the repo's files, unpack "
        "archives and read them as a local layout (segment list, TextGrids, audiofolder, ...)",
    )
    split: NonEmptyStr = Field(description="split to read; a local source with a single split uses that one")
    audio_column: NonEmptyStr
    text_column: NonEmptyStr
    id_column: str | None = Field(None, description="column holding a stable row id; else ids are content hashes")
    group_column: str | None = Field(None, description="speaker/recording column; a group never straddles splits")
    max_rows: int | None = Field(None, gt=0, description="read at most this many rows (hub sources are streamed)")


class SubsetParams(_Block):
    seed: int
    train_size: int = Field(ge=0, description="cap on train rows (the rows with the lowest hashes are kept)")
    val_size: int = Field(ge=0, description="cap on val rows; val_size/(train_size+val_size) is the val fraction")
    min_duration: float = Field(ge=0, description="seconds; shorter clips are dropped")
    max_duration: float = Field(gt=0, le=MODEL_MAX_AUDIO_SECONDS, description="seconds; longer clips are dropped")

    # Field validators (not a model validator) so these run even when another field is invalid: every problem
    # is reported in one pass. Each sees the fields declared before it.
    @field_validator("val_size")
    @classmethod
    def _something_kept(cls, val_size: int, info: ValidationInfo) -> int:
        if val_size == 0 and info.data.get("train_size") == 0:
            raise ValueError("train_size and val_size are both 0: nothing would be kept")
        return val_size

    @field_validator("max_duration")
    @classmethod
    def _min_below_max(cls, max_duration: float, info: ValidationInfo) -> float:
        min_duration = info.data.get("min_duration")
        if min_duration is not None and min_duration > max_duration:
            raise ValueError(f"min_duration ({min_duration}) is greater than max_duration ({max_duration})")
        return max_duration


class ManifestParams(_Block):
    text_normalization: Literal["unicode", "none"] = Field(
        description="training targets: 'unicode' = NFC + collapsed whitespace (casing and punctuation kept, as the "
        "model emits them); 'none' = verbatim"
    )
    annotation_tags: Literal["strip", "keep"] = Field(
        description="'strip': drop transcribers' markup (<INAUDIBLE>, [laughter]); <UNSURE>..</UNSURE> keeps its words"
    )
    all_caps: Literal["sentence_case", "keep"] = Field(
        description="'sentence_case': an all-caps transcript becomes sentence case, so the model keeps its casing"
    )


class ModelParams(_Block):
    preset: Literal["canary-qwen-2.5b", "tiny", "compose"] = Field(
        description="canary-qwen-2.5b: the released checkpoint; tiny: a tiny SALM built offline (tests, demo); "
        "compose: model.pretrained_asr encoder + model.pretrained_llm"
    )
    pretrained: NonEmptyStr = Field(description="canary-qwen-2.5b preset: hub id or local dir of the SALM checkpoint")
    revision: str | None = Field(None, description="hub commit of model.pretrained (pin it)")
    pretrained_asr: str | None = Field(None, description="compose preset: NeMo ASR model (.nemo path or name)")
    pretrained_llm: str | None = Field(None, description="compose preset: HF causal LM id or local dir")
    trainable: list[Literal["encoder", "projection", "preprocessor", "llm"]] = Field(
        description="parts trained besides LoRA; canary-qwen was trained with [encoder, projection] (LLM frozen)"
    )

    @field_validator("trainable")
    @classmethod
    def _compose_sources(cls, trainable: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("preset") == "compose":
            missing = [k for k in ("pretrained_asr", "pretrained_llm") if not info.data.get(k)]
            if missing:
                raise ValueError(f"preset compose needs {' and '.join(missing)}")
        return trainable


class LoraParams(_Block):
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[NonEmptyStr] = Field(min_length=1)


class TrainParams(_Block):
    max_steps: int = Field(gt=0, description="raising it continues a finished run, the LR schedule stretched")
    seed: int
    checkpoint_every: int = Field(gt=0, description="steps between resumable checkpoints")
    keep_checkpoints: int = Field(ge=1, description="resumable checkpoints kept (newest first)")
    keep_fingerprints: int = Field(
        2,
        ge=1,
        description="runs (fingerprints) whose checkpoints are kept, here and on the DVC remote: this one and the "
        "ones used last; older ones' folders and aside copies are deleted when training starts (on the remote only "
        "under runpod.sh's loop, and never a run used within the lease's TTL)",
    )
    batch_size: int = Field(gt=0, description="utterances per batch (with batch_tokens set: the most per batch)")
    batch_tokens: int | None = Field(
        None,
        gt=0,
        description="token budget per batch: audio frames (12.5 per second) + prompt and transcript tokens, so a "
        "batch of short clips holds more of them; null = always batch_size utterances (NeMo's example config)",
    )
    num_buckets: int = Field(
        ge=1, description="length buckets: a batch draws clips of similar length, so little of it is padding; 1 = off"
    )
    grad_checkpointing: bool = Field(
        description="recompute the LLM's activations in backward: less memory, more compute; pays when memory, "
        "not compute, limits the batch"
    )
    num_workers: int = Field(ge=0, description="dataloader worker processes decoding audio beside the GPU; 0 = inline")
    lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    grad_clip: float = Field(ge=0, description="gradient norm clip; 0 = off")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        description="adamw: torch's AdamW, fused kernel on GPU; adamw8bit: bitsandbytes' 8-bit states (GPU only)"
    )
    precision: Literal["auto", "32", "bf16"] = Field(
        description="auto: bf16 on GPU, fp32 on CPU; bf16 on CPU runs bf16-true there too (slow: it exists to test "
        "the dtype path a GPU run takes)"
    )
    devices: int | None = Field(
        None,
        gt=0,
        description="processes training together (Lightning DDP, one per device): null = every visible GPU, 1 on "
        "CPU; on CPU a larger value runs that many gloo ranks",
    )
    val_every: int = Field(ge=0, description="steps between validations (loss + greedy WER); 0 = never")
    val_max_utts: int = Field(gt=0, description="validation uses this fixed slice of the val split")
    early_stop_patience: int = Field(ge=0, description="stop after this many validations without gain; 0 = off")
    early_stop_delta: float = Field(ge=0, description="a WER drop smaller than this is not a gain")
    stop_grace_s: float = Field(
        ge=0, description="on SIGTERM/SIGINT: seconds allowed to finish mirroring the last checkpoint before exiting"
    )


class TestSetParams(FetchParams):
    """A held-out test set: read like `fetch.*`, prepared whole (no split, no cap beyond max_rows). Unlike the fetch
    block, the keys besides name and dataset default to the usual values, so a list entry can stay one line."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9_-]*$", description="key in metrics/eval.json and folder under data/testsets/"
    )
    split: NonEmptyStr = "test"
    audio_column: NonEmptyStr = "audio"
    text_column: NonEmptyStr = "text"
    long_form: bool = Field(
        False,
        description="score whole recordings (TextGrid layout: one per recording and channel, its intervals' text in "
        "time order; segment lists: one per recording), decoded in windows of eval.chunk_s; the clip-length "
        "filters do not apply",
    )
    kind: Literal["medical", "general"] = Field(
        "medical",
        description="medical: pooled into summary.medical (the gain); general: everyday speech, pooled into "
        "summary.general (the forgetting check)",
    )


class EvalParams(_Block):
    batch_size: int = Field(gt=0, description="utterances decoded together")
    max_new_tokens: int = Field(
        gt=0, description="cap on generated tokens per utterance (greedy decoding); validation during training too"
    )
    train_sample: int = Field(
        50,
        ge=0,
        description="training clips also scored (metrics/eval.json train_sample): the train-vs-val gap shows "
        "over-fitting, and that targets, prompt and decoding agree; 0 = off",
    )
    test_sets: list[TestSetParams] = Field(
        description="held-out sets scored for both models besides val (the headline numbers); [] = val only"
    )
    chunk_s: float = Field(
        35.0,
        gt=0,
        le=MODEL_MAX_AUDIO_SECONDS,
        description="audio longer than this is decoded in windows of at most this many seconds, cut at silences "
        "where a voice-activity detector finds them, and the window transcripts merged",
    )
    chunk_overlap_s: float = Field(
        10.0, ge=0, description="seconds shared by neighbouring windows (the merge aligns the words there)"
    )
    bootstrap_resamples: int = Field(
        1000, ge=1000, description="paired bootstrap resamples behind every wer_ci and wer_reduction_ci"
    )
    bootstrap_seed: int = Field(0, description="seed of the bootstrap: the same predictions give the same intervals")

    @field_validator("test_sets")
    @classmethod
    def _unique_names(cls, test_sets: list[TestSetParams]) -> list[TestSetParams]:
        names = [t.name for t in test_sets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"test set names must be unique; repeated: {', '.join(repeated)}")
        reserved = sorted(set(names) & {"val", "train_sample"})  # eval's own sets, beside them in every output
        if reserved:
            raise ValueError(f"test set names {', '.join(reserved)} are taken by eval's own sets: rename them")
        return test_sets

    @field_validator("chunk_overlap_s")
    @classmethod
    def _overlap_below_chunk(cls, overlap: float, info: ValidationInfo) -> float:
        chunk = info.data.get("chunk_s")
        if chunk is not None and overlap >= chunk:
            raise ValueError(f"chunk_overlap_s ({overlap}) must be below chunk_s ({chunk}): windows would not advance")
        return overlap


class Params(_Block):
    fetch: FetchParams
    subset: SubsetParams
    manifest: ManifestParams
    model: ModelParams
    lora: LoraParams
    train: TrainParams
    eval: EvalParams


def _describe(error: Any) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "<top level>"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"].startswith("value_error"):  # cross-field checks already name their values
        return f"{path}: {message}"
    return f"{path}: {message} (got {error['input']!r})"


def parse_params(data: Any, source: str = "params") -> Params:
    """Validate an already-parsed params mapping; raise ParamsError listing every problem."""
    if not isinstance(data, dict):
        raise ParamsError(source, [f"expected a mapping of blocks, got {type(data).__name__}"])
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(source, [_describe(e) for e in exc.errors()]) from None


def with_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a params mapping with `block.key` overrides applied, as `dvc exp run -S block.key=value` does."""
    out = {block: dict(values) if isinstance(values, dict) else values for block, values in data.items()}
    for key, value in overrides.items():
        block, field = key.split(".", 1)
        out.setdefault(block, {})[field] = value
    return out


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file (relative paths are taken from the working directory, as DVC runs stages)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(str(path), ["file not found"]) from None
    except yaml.YAMLError as exc:
        raise ParamsError(str(path), [f"not valid YAML: {exc}"]) from None
    return parse_params(data, str(path))
