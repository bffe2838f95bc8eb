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
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medasr import StageError
from medasr.files import sha256_file, update_digest, write_text_atomic
from medasr.log import get_logger
from medasr.ops.lease import PID_ENV, TTL_S
from medasr.ops.mirror import fingerprint_of, stale_fingerprints
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
    "keep_fingerprints",
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


# What a checkpoint that is there but unusable raises when read: a missing file (a save or upload that never finished),
# a layout or content that is not ours. Any other OSError (EIO, a stale network mount) is a read that failed.
CORRUPT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, KeyError, TypeError)


def verified(folder: Path, fp: str) -> Checkpoint:
    """The checkpoint in `folder`, if its meta.json names this fingerprint and its state file matches its sha256;
    else one of CORRUPT is raised."""
    meta = json.loads((folder / CHECKPOINT_META).read_text())
    if meta["fingerprint"] != fp:
        raise ValueError(f"fingerprint {meta['fingerprint']} is not this run's {fp}")
    if sha256_file(folder / CHECKPOINT_STATE) != meta["sha256"]:
        raise ValueError("state file does not match its recorded sha256 (truncated or corrupt)")
    return Checkpoint(folder, int(meta["step"]), meta)


def find_resumable(run_dir: Path, fp: str) -> Checkpoint | None:
    """The newest valid checkpoint of this fingerprint: `latest` first, then older ones, skipping corrupt ones.
    A read that fails (not a missing file) raises StageError: "could not read" is never "nothing to resume"."""
    try:
        if not run_dir.is_dir():
            return None
        candidates = step_dirs(run_dir)[::-1]
        try:
            pointed = run_dir / (run_dir / LATEST).read_text().strip()
        except (FileNotFoundError, ValueError):  # no pointer, or a damaged one: the newest folder first
            pointed = None
        if pointed in candidates:
            candidates.remove(pointed)
            candidates.insert(0, pointed)
        for folder in candidates:
            try:
                return verified(folder, fp)
            except CORRUPT as exc:
                log.warning("ignoring checkpoint %s: %s", folder, exc)
        return None
    except OSError as exc:
        raise StageError(f"could not read the checkpoints in {run_dir}, so none was chosen: {one_line(exc)}") from None


def fetch_from_mirror(mirror: Mirror, into: Path, fp: str) -> Checkpoint | None:
    """Download the newest complete mirrored checkpoint that arrives intact into `into`; None when none does. One
    that arrives corrupt is deleted: a copy of bytes the remote still holds. A listing or download that fails is
    retried, then raises StageError: the loop around the stage retries later, where starting fresh could throw away
    a long run."""

    def read(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return mirror.read(what, fn)
        except Exception as exc:
            raise StageError(
                f"DVC remote {mirror.remote!r} could not be read ({what}), so no checkpoint was chosen and nothing was "
                f"changed; retry later: {one_line(exc)}"
            ) from None

    for name in read("listing the mirrored checkpoints", mirror.complete_steps):
        folder = read(f"downloading {name}", partial(mirror.download, name, into))
        try:
            return verified(folder, fp)
        except CORRUPT as exc:
            log.warning("mirrored checkpoint %s arrived corrupt (%s): deleted, trying the one before", name, exc)
            shutil.rmtree(folder)  # now, not with the staging folder: each may be gigabytes
    return None


def move_aside(run_dir: Path, now: datetime) -> Path | None:
    """Move the run folder, if it holds any file, to the aside copy `<fingerprint>.aside-<now>` beside it, the
    retention rule of `medasr train --fresh`: never a fingerprint, so nothing resumes from it, and only the newest
    aside copy per fingerprint is kept. Returns the aside copy, or None when there was nothing to move (and the
    older aside copy stays)."""
    aside = run_dir.with_name(aside_name(run_dir.name, now))
    if run_dir.is_dir() and not any(p.is_file() for p in run_dir.rglob("*")):
        shutil.rmtree(run_dir)  # empty folders only: nothing is lost
    if not run_dir.exists():
        return None
    run_dir.rename(aside)
    log.info("moved %s aside to %s", run_dir, aside.name)
    for older in sorted(d for d in run_dir.parent.glob(f"{run_dir.name}.*") if aside_of(d.name) == run_dir.name):
        if older.name < aside.name:  # names sort by time: the newest stays
            shutil.rmtree(older)
    return aside


def resume_point(
    run_dir: Path, fp: str, mirror: Mirror | None, now: datetime | None = None
) -> tuple[Checkpoint | None, str]:
    """Where this run starts: the newest valid local checkpoint, else the newest intact mirrored one, else fresh.
    Returns it with its source: "local", "remote" or "none". Whatever the run folder held is moved aside (never
    deleted) before a remote checkpoint or a fresh start takes its place, and only once every read succeeded."""
    found = find_resumable(run_dir, fp)
    if found is not None:
        return found, "local"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # downloads land beside the run folder first, so a failed read leaves the run folder as it was (a killed one
    # leaves a temp folder that `medasr loop sweep` removes)
    staging = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.", suffix=".tmp"))
    try:
        found = fetch_from_mirror(mirror, staging, fp) if mirror else None
        move_aside(run_dir, now or datetime.now(UTC))
        if found is None:
            return None, "none"
        run_dir.mkdir()
        found.path.rename(run_dir / found.path.name)
        restored = Checkpoint(run_dir / found.path.name, found.step, found.meta)
        copy_extras(restored.path, run_dir)
        write_text_atomic(run_dir / LATEST, restored.path.name + "\n")
        log.info("restored %s from DVC remote %r", restored.path.name, mirror.remote if mirror else None)
        return restored, "remote"
    except OSError as exc:  # this disk (full, failing): a retry may get further; nothing was deleted
        raise StageError(f"could not set up {run_dir} to resume: {one_line(exc)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # our own downloads: the remote keeps every checkpoint


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
    asked to start over, it is deleted rather than replace the aside copy."""
    now = now or datetime.now(UTC)
    name = aside_name(run_dir.name, now)
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
    move_aside(run_dir, now)


def prune_fingerprints(run_dir: Path, mirror: Mirror | None, keep: int) -> None:
    """`train.keep_fingerprints`: besides this run's, the checkpoints of the `keep` - 1 fingerprints used last are
    kept, here and on the mirror; other fingerprints' run folders and aside copies are deleted. Local last use: the
    newest file in their folders. On the mirror, which every machine of the project shares, only under runpod.sh's
    loop (it holds the lease), and never a run used within the lease's TTL: a laptop's run must not delete what a
    live pod trains. A failure is reported and training goes on; the next start tries again."""
    root = run_dir.parent
    try:
        folders = [d for d in root.iterdir() if d.is_dir() and fingerprint_of(d.name)] if root.is_dir() else []
        last_use: dict[str, float] = {}
        for folder in folders:
            owner = fingerprint_of(folder.name) or ""
            when = max((p.lstat().st_mtime for p in folder.rglob("*")), default=folder.lstat().st_mtime)
            last_use[owner] = max(last_use.get(owner, when), when)
        stale = stale_fingerprints(last_use, run_dir.name, keep)
        for folder in sorted(d for d in folders if fingerprint_of(d.name) in stale):
            shutil.rmtree(folder)
            log.info("deleted %s, a run older than the last %d (train.keep_fingerprints)", folder, keep)
    except OSError as exc:
        log.warning("could not prune the checkpoints of older runs in %s: %s", root, one_line(exc))
    if mirror is None:
        return
    if not os.environ.get(PID_ENV):
        log.info(
            "older runs on DVC remote %r are left: only runpod.sh's loop, holding the lease, prunes them", mirror.remote
        )
        return
    try:
        for name in mirror.prune_fingerprints(keep, float(os.environ.get("MEDASR_LEASE_TTL_S") or TTL_S)):
            log.info("deleted %s on DVC remote %r, a run older than the last %d", name, mirror.remote, keep)
    except Exception as exc:
        log.warning("could not prune older runs' checkpoints on DVC remote %r: %s", mirror.remote, one_line(exc))
