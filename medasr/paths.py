"""Every path and marker the pipeline reads or writes, defined once.

Relative paths are taken from the repository root, the working directory DVC runs stages in. dvc.yaml names the same
folders; the names of files inside a checkpoint and on the DVC remote are part of the resume interface (a running
experiment's mirrored checkpoints must stay resumable), so they change only with a migration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

# --- stage outputs (dvc.yaml's outs and metrics) ---------------------------------------------------------------------
SOURCES_DIR = Path("data/sources")  # local datasets: a DVC dependency of fetch and testsets
RAW_DIR = Path("data/raw")  # fetch: part-NNNNN.parquet + source.json
SUBSET_DIR = Path("data/subset")  # subset: <split>.jsonl + dropped.jsonl
MANIFEST_DIR = Path("data/manifests")  # manifest: <split>.json + audio/
TESTSETS_DIR = Path("data/testsets")  # testsets: <name>/manifest.json + audio/ + dropped.jsonl + source.json
MODEL_DIR = Path("models/canary-qwen-medical-lora")  # train: the exported model
CHECKPOINT_ROOT = Path("checkpoints/train")  # train: <fingerprint>/step-NNNNNNNN/ (git-ignored, not a DVC output)
# in CHECKPOINT_ROOT: the last validation of the training running here (step, WER, warning); the heartbeat reads it
VALIDATION_STATUS = "validation.json"

DATA_METRICS = Path("metrics/data.json")
TESTSETS_METRICS = Path("metrics/testsets.json")
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_CURVES_DIR = Path("metrics/train_curves")
EVAL_METRICS = Path("metrics/eval.json")
PREDICTIONS = Path("metrics/predictions.jsonl")
REPORT = Path("metrics/report.md")  # eval: what a person reads (medasr.report)
WER_PLOT = Path("metrics/wer_by_set.json")  # eval: rows {set, model, wer}, dvc.yaml's WER-per-set plot

# --- files inside those folders --------------------------------------------------------------------------------------
SPLITS = ("train", "val")
SOURCE_INFO = "source.json"  # provenance and counts of one fetched source
DROPPED = "dropped.jsonl"  # every row not kept, with its reason
AUDIO_SUBDIR = "audio"  # 16 kHz mono FLAC beside a manifest; manifests name it relative to their own folder
TESTSET_MANIFEST = "manifest.json"


def subset_split(split: str, subset_dir: Path = SUBSET_DIR) -> Path:
    """The rows subset selected for one split (where they live in data/raw, id, group, duration, text)."""
    return subset_dir / f"{split}.jsonl"


def split_manifest(split: str, manifest_dir: Path = MANIFEST_DIR) -> Path:
    """The NeMo manifest of one split. Named `.json`: NeMo's data layer reads `.jsonl` files as lhotse cut sets."""
    return manifest_dir / f"{split}.json"


def testset_manifest(name: str, testsets_dir: Path = TESTSETS_DIR) -> Path:
    return testsets_dir / name / TESTSET_MANIFEST


# --- an exported model folder ----------------------------------------------------------------------------------------
MEDASR_META = "medasr.json"  # how the model was made; `load_model` reads it first
TRAINED_WEIGHTS = "trained.safetensors"  # what training changed: adapter + trained weights + buffers

# --- a checkpoint folder (local and mirrored) ------------------------------------------------------------------------
CHECKPOINT_STATE = "state.ckpt"  # Lightning's checkpoint: weights, optimizer, schedule, our resume state
CHECKPOINT_META = "meta.json"  # written (and uploaded) last: a folder without it is incomplete
LATEST = "latest"  # names the newest local checkpoint folder
BEST_DIR = "best"  # the best-by-val-WER weights, beside the checkpoints and copied into each
WANDB_ID_FILE = "wandb_run_id"  # keeps one W&B run across resumes
DVCLIVE_DIR = "dvclive"
VAL_SAMPLES_FILE = "val_samples.tsv"  # in DVCLIVE_DIR: each validation's sample utterances


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# `medasr train --fresh` moves a run's checkpoint folder (local and mirrored) to a sibling named
# <fingerprint>.aside-<UTC time>: never a fingerprint, so no resume looks inside it. The newest per fingerprint is kept.
ASIDE_MARK = ".aside-"


def aside_name(fingerprint: str, when: datetime) -> str:
    return f"{fingerprint}{ASIDE_MARK}{when.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def aside_of(name: str) -> str | None:
    """The fingerprint whose checkpoints a folder named `name` holds moved aside, or None when it is no aside copy."""
    fingerprint, mark, _ = name.partition(ASIDE_MARK)
    return fingerprint if mark else None


# --- the DVC remote, beside DVC's own cache --------------------------------------------------------------------------
REMOTE_CHECKPOINTS = "medasr-checkpoints"  # <remote>/medasr-checkpoints/<fingerprint>/step-NNNNNNNN/
REMOTE_STATUS = "medasr-status"  # <remote>/medasr-status/<run id>/status.json
STATUS_FILE = "status.json"
# One lease per remote: the pod whose runpod.sh may run the pipeline against it (<remote>/medasr-status/lease.json).
LEASE_FILE = "lease.json"

# --- this machine ----------------------------------------------------------------------------------------------------
POD_STATE = Path(".medasr/pod.json")  # git-ignored: which pod this checkout launched, and what it has cost
LOGS_DIR = Path("logs")  # git-ignored: <command>.log, what each `medasr` command and its libraries logged


def command_log(command: str) -> Path:
    return LOGS_DIR / f"{command}.log"


# runpod.sh sets this variable to a file in its logs folder; a stage command writes its pid there while it runs, so
# a stop signal reaches the stage process itself (which stops its own workers and ranks), not everything below dvc.
STAGE_PIDFILE_ENV = "MEDASR_STAGE_PIDFILE"
# Under $MEDASR_WORKDIR (the pod's volume, so it outlives the container: a restart must not reset the pod's clock): the
# first start and last hourly cost the volume saw per pod id, what `medasr loop budget` uses when RunPod's API cannot
# be read, one <pod id>.json each.
POD_CLOCK_DIR = "medasr-pod-clock"
