"""Which checkpoint a training run may resume: the fingerprint, the local checkpoint folders and their integrity,
and restoring the newest intact one from the DVC remote's mirror.

A checkpoint lives in `checkpoints/train/<fingerprint>/step-NNNNNNNN/`: Lightning's state file, what travels with
it (EXTRAS) and `meta.json`, written last, with the state file's sha256. No torch here: discovery is plain file
work, so its tests run in the fast half.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medasr import StageError
from medasr.files import sha256_file, update_digest, write_text_atomic
from medasr.log import get_logger
from medasr.params import LoraParams, ModelParams, TrainParams
from medasr.paths import (
    BEST_DIR,
    CHECKPOINT_META,
    CHECKPOINT_STATE,
    DVCLIVE_DIR,
    LATEST,
    MANIFEST_DIR,
    WANDB_ID_FILE,
    aside_name,
    aside_of,
)
from medasr.secrets import one_line

if TYPE_CHECKING:
    from medasr.ops.mirror import Mirror

log = get_logger(__name__)

# Bumped whenever what a checkpoint holds changes: a checkpoint from another format is never resumed.
CHECKPOINT_FORMAT = 4  # 4: one RNG state per rank

# train.* keys that do not change the weights at a given step, so they stay out of the fingerprint.
NOT_FINGERPRINTED = {
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "val_every",
    "val_max_utts",
    "early_stop_patience",
    "early_stop_delta",
    "stop_grace_s",
    "num_workers",  # decoding in workers or inline yields the same batches
    "devices",  # the resolved world size is fingerprinted instead
    "precision",  # likewise the resolved precision (auto is bf16 on a GPU, 32 on the CPU)
}
# Files beside the checkpoints that travel with each one (to the remote and back): the W&B run id, the DVCLive
# history and the best-by-WER weights.
EXTRAS = (WANDB_ID_FILE, DVCLIVE_DIR, BEST_DIR)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]


def data_hash(manifest_dir: Path = MANIFEST_DIR) -> str:
    """sha256 over every file under the manifest folder (manifests and audio), in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in manifest_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(manifest_dir)).encode() + b"\0")
        update_digest(digest, path)
    return digest.hexdigest()


def fingerprint(
    model: ModelParams, lora: LoraParams, train: TrainParams, data: str, *, world_size: int, precision: str
) -> str:
    """What a checkpoint must match to be resumed: model, LoRA, optimisation params, seed, data, and the resolved
    world size (each rank draws its own share of the batches) and precision."""
    relevant = {
        "model": model.model_dump(),
        "lora": lora.model_dump(),
        "train": train.model_dump(exclude=NOT_FINGERPRINTED),
        "data": data,
        "world_size": world_size,
        "precision": precision,
        "checkpoint_format": CHECKPOINT_FORMAT,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def copy_extras(src: Path, dst: Path) -> None:
    """Copy the files that travel with a checkpoint (EXTRAS) from `src` to `dst`, replacing what is there."""
    for extra in EXTRAS:
        if (src / extra).is_dir():
            shutil.rmtree(dst / extra, ignore_errors=True)
            shutil.copytree(src / extra, dst / extra)
        elif (src / extra).is_file():
            shutil.copy2(src / extra, dst / extra)


def step_dirs(run_dir: Path) -> list[Path]:
    """The checkpoint folders of a run, oldest first (their names sort by step)."""
    return sorted(d for d in run_dir.glob("step-*") if d.is_dir())


def find_resumable(run_dir: Path, fp: str) -> Checkpoint | None:
    """The newest valid checkpoint of this fingerprint: `latest` first, then older ones, skipping corrupt ones."""
    if not run_dir.is_dir():
        return None
    candidates = step_dirs(run_dir)[::-1]
    latest = run_dir / LATEST
    if latest.is_file() and (pointed := run_dir / latest.read_text().strip()) in candidates:
        candidates.remove(pointed)
        candidates.insert(0, pointed)
    for folder in candidates:
        try:
            meta = json.loads((folder / CHECKPOINT_META).read_text())
            if meta["fingerprint"] != fp:
                raise ValueError(f"fingerprint {meta['fingerprint']} is not this run's {fp}")
            if sha256_file(folder / CHECKPOINT_STATE) != meta["sha256"]:
                raise ValueError("state file does not match its recorded sha256 (truncated or corrupt)")
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring checkpoint %s: %s", folder, exc)
            continue
        return Checkpoint(folder, int(meta["step"]), meta)
    return None


def restore_from_mirror(mirror: Mirror, run_dir: Path, fp: str) -> Checkpoint | None:
    """The newest complete, intact mirrored checkpoint, downloaded into `run_dir` with what travels with it."""
    try:
        names = mirror.complete_steps()
    except Exception as exc:  # the loop around us retries; starting fresh here could throw away a long run
        raise StageError(f"DVC remote {mirror.remote!r} unreachable while looking for a checkpoint: {exc}") from None
    for name in names:
        try:
            folder = mirror.download(name, run_dir)
        except Exception as exc:
            log.warning("could not download mirrored checkpoint %s: %s", name, exc)
            continue
        copy_extras(folder, run_dir)
        write_text_atomic(run_dir / LATEST, name + "\n")
        found = find_resumable(run_dir, fp)
        if found is not None and found.path.name == name:
            log.info("restored %s from DVC remote %r", name, mirror.remote)
            return found
        shutil.rmtree(folder, ignore_errors=True)
    return None


def resume_point(run_dir: Path, fp: str, mirror: Mirror | None) -> tuple[Checkpoint | None, str]:
    """Where this run starts: the newest valid local checkpoint, else the newest intact mirrored one, else fresh.
    Returns it with its source: "local", "remote" or "none"."""
    found = find_resumable(run_dir, fp)
    if found is not None:
        return found, "local"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # nothing usable in it (all corrupt or incomplete)
    found = restore_from_mirror(mirror, run_dir, fp) if mirror else None
    return found, "remote" if found else "none"


# Lightning's launcher starts ranks > 0 by re-running the command with rank 0's environment: rank 0 leaves what it
# chose here, so they neither repeat its destructive setup nor hash the data again.
RANK0_ENV = "MEDASR_TRAIN_RANK0"


def hand_over(data_sha256: str, resume: Checkpoint | None) -> None:
    """Rank 0, before the Trainer starts the other ranks: its data hash and the checkpoint it resumes."""
    os.environ[RANK0_ENV] = json.dumps({"data_sha256": data_sha256, "resume": str(resume.path) if resume else None})


def handed_over() -> dict[str, Any] | None:
    """What rank 0 handed over (None when this rank was not started by rank 0's launcher, e.g. by torchrun)."""
    text = os.environ.get(RANK0_ENV)
    return json.loads(text) if text else None


def rank_zero_checkpoint(run_dir: Path, fp: str, handed: dict[str, Any] | None) -> Checkpoint | None:
    """The checkpoint a rank > 0 resumes: the one rank 0 chose, else (started by another launcher) the newest
    valid local one, found without deleting or downloading anything. The Trainer checks that all ranks agree."""
    if handed is None:
        return find_resumable(run_dir, fp)
    if handed["resume"] is None:
        return None
    folder = Path(handed["resume"])
    meta = json.loads((folder / CHECKPOINT_META).read_text())
    if meta["fingerprint"] != fp:
        raise StageError(f"rank 0 resumes {folder}, of fingerprint {meta['fingerprint']}, not this rank's {fp}")
    return Checkpoint(folder, int(meta["step"]), meta)


def set_aside(run_dir: Path, mirror: Mirror | None, now: datetime | None = None) -> None:
    """`medasr train --fresh`: move this fingerprint's checkpoints aside (never deleted), on the DVC remote first and
    then here, so a remote that cannot be reached stops the run before anything local moved (a half-fresh state
    would have the next pod resume what this machine set aside). Each side keeps its newest aside copy per
    fingerprint only. A run folder without a complete checkpoint (stopped before its first) holds nothing to resume:
    it is deleted, as `resume_point` would, rather than replace the aside copy."""
    name = aside_name(run_dir.name, now or datetime.now(UTC))
    if mirror is not None:
        try:
            moved = mirror.set_aside(name)
        except Exception as exc:
            raise StageError(
                f"--fresh: could not move the checkpoints on DVC remote {mirror.remote!r} aside, so nothing here moved "
                f"either: {one_line(exc)}"
            ) from None
        if moved:
            log.info("moved the mirrored checkpoints of %s aside to %s on %r", run_dir.name, name, mirror.remote)
    if run_dir.is_dir() and not any((d / CHECKPOINT_META).is_file() for d in step_dirs(run_dir)):
        shutil.rmtree(run_dir)
    if run_dir.is_dir():
        run_dir.rename(run_dir.with_name(name))
        log.info("moved %s aside to %s", run_dir, name)
    for older in sorted(d for d in run_dir.parent.glob(f"{run_dir.name}.*") if aside_of(d.name) == run_dir.name)[:-1]:
        shutil.rmtree(older)  # names sort by time: the newest stays
