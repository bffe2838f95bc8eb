"""train: which checkpoint a run resumes, what is moved aside, and which old runs are pruned, on checkpoint folders
written by hand (fast: no torch, no model).

The same fallbacks on checkpoints written by real training runs are in test_train.py (e2e)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import tiny_params

from medasr import StageError
from medasr.ops.lease import PID_ENV
from medasr.ops.mirror import Mirror, fingerprint_of, stale_fingerprints
from medasr.params import ParamsError
from medasr.paths import CHECKPOINT_META, CHECKPOINT_STATE, LATEST, aside_name, step_dir_name
from stages.train import checkpoints
from stages.train.checkpoints import find_resumable, fingerprint, prune_fingerprints, resume_point

FP = "0123456789abcdef"
T1 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T2, T3 = T1 + timedelta(hours=1), T1 + timedelta(hours=2)


def checkpoint(run_dir: Path, step: int, fp: str = FP, *, sha256: str | None = None, meta: bool = True) -> Path:
    """A checkpoint folder as the training callback leaves it: the state file, then meta.json (written last)."""
    folder = run_dir / step_dir_name(step)
    folder.mkdir(parents=True)
    state = f"weights at step {step}".encode()
    (folder / CHECKPOINT_STATE).write_bytes(state)
    if meta:
        record = {
            "fingerprint": fp,
            "step": step,
            "sha256": sha256 or hashlib.sha256(state).hexdigest(),
            "epoch": step // 10,
            "epoch_batches": step % 10,
        }
        (folder / CHECKPOINT_META).write_text(json.dumps(record))
    return folder


def test_the_newest_valid_checkpoint_wins(tmp_path):
    run_dir = tmp_path / "run"
    for step in (4, 8, 12):
        checkpoint(run_dir, step)
    found = find_resumable(run_dir, FP)
    assert found is not None and (found.step, found.path.name) == (12, "step-00000012")
    assert found.meta["epoch"] == 1 and found.meta["epoch_batches"] == 2
    assert find_resumable(tmp_path / "missing", FP) is None


def test_the_latest_pointer_is_preferred_over_a_newer_folder(tmp_path):
    run_dir = tmp_path / "run"
    for step in (4, 8, 12):
        checkpoint(run_dir, step)
    (run_dir / LATEST).write_text("step-00000008\n")
    assert find_resumable(run_dir, FP).step == 8
    (run_dir / LATEST).write_text("step-00000099\n")  # names a folder that is gone: ignored, newest wins
    assert find_resumable(run_dir, FP).step == 12


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    run_dir = tmp_path / "run"
    checkpoint(run_dir, 4)
    checkpoint(run_dir, 8)
    newest = checkpoint(run_dir, 12)
    (run_dir / LATEST).write_text("step-00000012\n")

    state = newest / CHECKPOINT_STATE
    state.write_bytes(state.read_bytes()[:5])  # a write cut short: the sha256 no longer matches
    with caplog.at_level(logging.WARNING):
        found = find_resumable(run_dir, FP)
    assert found is not None and found.step == 8
    assert "ignoring checkpoint" in caplog.text and "sha256" in caplog.text and "step-00000012" in caplog.text


def test_a_checkpoint_of_another_fingerprint_or_without_meta_is_skipped(tmp_path, caplog):
    run_dir = tmp_path / "run"
    checkpoint(run_dir, 4)
    checkpoint(run_dir, 8, fp="another-fingerprint")
    checkpoint(run_dir, 12, meta=False)  # an upload or save that never finished
    checkpoint(run_dir, 16, sha256="0" * 64)
    with caplog.at_level(logging.WARNING):
        found = find_resumable(run_dir, FP)
    assert found is not None and found.step == 4
    assert "fingerprint another-fingerprint" in caplog.text
    for step in (8, 12, 16):
        assert f"ignoring checkpoint {run_dir / step_dir_name(step)}" in caplog.text

    (run_dir / step_dir_name(4) / CHECKPOINT_META).unlink()
    assert find_resumable(run_dir, FP) is None
    assert find_resumable(run_dir, "another-fingerprint").step == 8


def test_resume_point_without_a_mirror(tmp_path):
    run_dir = tmp_path / "run"
    assert resume_point(run_dir, FP, None) == (None, "none")

    checkpoint(run_dir, 4)
    checkpoint(run_dir, 8)
    found, source = resume_point(run_dir, FP, None)
    assert source == "local" and found.step == 8

    # nothing usable: the run folder is moved aside, never deleted (best/ and offline W&B runs live there), so the
    # fresh run does not mix with corrupt leftovers; the newest aside copy per fingerprint is kept
    root = tmp_path / "root"
    leftover = checkpoint(root / FP, 4, sha256="0" * 64).parent
    (leftover / "wandb" / "offline-run-1").mkdir(parents=True)
    (leftover / "wandb" / "offline-run-1" / "run-1.wandb").write_bytes(b"unsynced")
    before = files(leftover)
    assert resume_point(leftover, FP, None, now=T1) == (None, "none")
    assert not leftover.exists() and files(root / aside_name(FP, T1)) == before
    checkpoint(root / FP, 8, meta=False)  # the fresh run, killed before its first checkpoint was complete
    assert resume_point(leftover, FP, None, now=T2) == (None, "none")
    assert sorted(p.name for p in root.iterdir()) == [aside_name(FP, T2)]
    (root / FP / "empty").mkdir(parents=True)  # a folder without any file holds nothing to keep
    assert resume_point(leftover, FP, None, now=T3) == (None, "none")
    assert sorted(p.name for p in root.iterdir()) == [aside_name(FP, T2)]


def test_a_checkpoint_that_cannot_be_read_fails_the_stage_and_moves_nothing(tmp_path, monkeypatch):
    """A transient read error (EIO on a disk or network mount) is no corrupt checkpoint: never "nothing to resume",
    which would start over; the run folder stays as it is for the retry."""
    run_dir = tmp_path / FP
    checkpoint(run_dir, 4)
    checkpoint(run_dir, 8)
    before = files(run_dir)
    real = checkpoints.sha256_file

    def flaky(path: Path) -> str:
        if path.parent.name == step_dir_name(8):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(checkpoints, "sha256_file", flaky)
    with pytest.raises(StageError, match=r"could not read the checkpoints in .*Input/output error") as err:
        resume_point(run_dir, FP, None)
    assert "\n" not in str(err.value) and files(run_dir) == before and sorted(tmp_path.iterdir()) == [run_dir]
    monkeypatch.setattr(checkpoints, "sha256_file", real)
    assert resume_point(run_dir, FP, None)[0].step == 8


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def aged(folder: Path, when: float) -> Path:
    """Every file and folder under `folder` last modified at `when` (epoch s): a run last used then."""
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (when, when))
    return folder


def test_keep_fingerprints_prunes_the_runs_used_least_recently_here_and_on_the_mirror(tmp_path, monkeypatch, caplog):
    from dvc_objects.fs.local import LocalFileSystem

    a, b, c = "a" * 16, "b" * 16, "c" * 16
    root, remote = tmp_path / "checkpoints", tmp_path / "remote"
    for base in (root, remote):  # the same layout on both sides: runs, aside copies, other folders
        aged(checkpoint(base / FP, 4).parent, 1000)  # this run: kept whatever its age
        aged(checkpoint(base / a, 4, a).parent, 3000)  # used last of the others
        aged(checkpoint(base / aside_name(a, T1), 4, a).parent, 2000)
        aged(checkpoint(base / b, 4, b).parent, 2500)
        aged(checkpoint(base / aside_name(c, T1), 4, c).parent, 2600)  # an aside copy counts as use of its run
        aged(checkpoint(base / "not-a-run", 4).parent, 0)  # nothing pruning made: never touched
    mirror = Mirror(LocalFileSystem(), str(remote / FP), "local")

    monkeypatch.setenv(PID_ENV, str(os.getpid()))  # runpod.sh's loop, holding the lease: it prunes the remote too
    prune_fingerprints(root / FP, mirror, 2)
    kept = sorted([FP, a, aside_name(a, T1), "not-a-run"])
    assert sorted(p.name for p in root.iterdir()) == kept and sorted(p.name for p in remote.iterdir()) == kept

    # a failure is reported, not fatal (training goes on); the next start prunes what is left
    def refused(*args, **kwargs):
        raise PermissionError("AccessDenied")

    with monkeypatch.context() as m:
        m.setattr(mirror.fs, "rm", refused)
        with caplog.at_level(logging.WARNING):
            prune_fingerprints(root / FP, mirror, 1)
    assert "could not prune older runs' checkpoints on DVC remote 'local': PermissionError: AccessDenied" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == [FP, "not-a-run"]
    assert sorted(p.name for p in remote.iterdir()) == kept
    prune_fingerprints(root / FP, mirror, 1)
    assert sorted(p.name for p in remote.iterdir()) == [FP, "not-a-run"]
    assert find_resumable(root / FP, FP).step == 4 and mirror.complete_steps() == [step_dir_name(4)]


def test_stale_fingerprints_keeps_the_current_run_and_the_ones_used_last():
    last_use = {"cur": 1.0, "x": 5.0, "y": 4.0, "z": 3.0}
    assert stale_fingerprints(last_use, "cur", 1) == {"x", "y", "z"}
    assert stale_fingerprints(last_use, "cur", 2) == {"y", "z"}
    assert stale_fingerprints(last_use, "cur", 3) == {"z"}
    assert stale_fingerprints(last_use, "new", 2) == {"y", "z", "cur"}  # a run not in the list yet counts as one
    assert stale_fingerprints({}, "cur", 2) == set()
    assert [fingerprint_of(n) for n in (FP, aside_name(FP, T1), "latest", FP.upper(), FP + "0")] == [
        FP,
        FP,
        None,
        None,
        None,
    ]


def test_the_fingerprint_covers_what_decides_the_weights_only():
    def fp(world_size: int = 1, precision: str = "32", **overrides) -> str:
        p = tiny_params(**overrides)
        return fingerprint(p.model, p.lora, p.train, "data-sha", world_size=world_size, precision=precision)

    base = fp()
    assert len(base) == 16 and base == fp()
    # resuming with a longer run, other checkpoint spacing or validation settings continues the same run
    assert base == fp(**{"train.max_steps": 500, "train.checkpoint_every": 7, "train.val_every": 3})
    # the resolved world size and precision count, not how params spell them (devices null or 1, precision auto)
    assert base == fp(**{"train.devices": 1, "train.precision": "32"}) == fp(**{"train.precision": "auto"})
    assert fp(world_size=2) != base and fp(precision="bf16") != base
    # anything that changes the weights at a given step is a different run
    for changed in ({"lora.rank": 16}, {"train.lr": 1e-4}, {"train.seed": 7}, {"train.batch_size": 2}):
        assert fp(**changed) != base, changed
    p = tiny_params()
    assert fingerprint(p.model, p.lora, p.train, "other-data", world_size=1, precision="32") != base
    # how many old runs are kept is housekeeping, not the run: validated, not fingerprinted
    assert fp(**{"train.keep_fingerprints": 5}) == base and tiny_params().train.keep_fingerprints == 2
    with pytest.raises(ParamsError, match="keep_fingerprints"):
        tiny_params(**{"train.keep_fingerprints": 0})


def test_mirror_prune_keeps_the_newest_complete_checkpoints_and_drops_older_half_uploads(tmp_path):
    from dvc_objects.fs.local import LocalFileSystem

    remote = tmp_path / "remote" / FP
    for step in (4, 8, 12):
        checkpoint(remote, step)
    checkpoint(remote, 2, meta=False)  # an upload killed long ago: never complete, never resumed
    checkpoint(remote, 16, meta=False)  # the upload in progress
    mirror = Mirror(LocalFileSystem(), str(remote), "local")
    assert mirror.complete_steps() == [step_dir_name(12), step_dir_name(8), step_dir_name(4)]
    mirror.prune(2)
    assert sorted(p.name for p in remote.iterdir()) == [step_dir_name(s) for s in (8, 12, 16)]
    assert Mirror(LocalFileSystem(), str(tmp_path / "none"), "local").complete_steps() == []


def test_only_runpods_loop_prunes_the_remote_and_never_a_run_in_use(tmp_path, monkeypatch, caplog):
    """A pod trains `pod`; a laptop runs two smoke tests against the same remote: the pod's run, used less recently
    than the laptop's first, is not deleted (its pod, losing its disk, would start over from step 0)."""
    from dvc_objects.fs.local import LocalFileSystem

    pod, x1, x2 = "a" * 16, "b" * 16, "c" * 16
    root, remote = tmp_path / "laptop", tmp_path / "remote"
    for fp, age in ((pod, 300), (x1, 60), (x2, 0)):  # seconds since each run last mirrored a checkpoint
        aged(checkpoint(remote / fp, 4, fp).parent, time.time() - age)
    aged(checkpoint(root / x1, 4, x1).parent, time.time() - 60)
    checkpoint(root / x2, 4, x2)
    mirror = Mirror(LocalFileSystem(), str(remote / x2), "local")
    monkeypatch.delenv(PID_ENV, raising=False)

    with caplog.at_level(logging.INFO):
        prune_fingerprints(root / x2, mirror, 1)  # the laptop's `medasr train`, no lease: its own folders only
    assert sorted(p.name for p in root.iterdir()) == [x2]
    assert sorted(p.name for p in remote.iterdir()) == [pod, x1, x2] and "only runpod.sh's loop" in caplog.text

    monkeypatch.setenv(PID_ENV, str(os.getpid()))  # under the loop: runs used within the lease's TTL stay
    prune_fingerprints(root / x2, mirror, 1)
    assert sorted(p.name for p in remote.iterdir()) == [pod, x1, x2]
    aged(remote / pod, time.time() - 1000)  # a pod silent longer than the TTL (900 s) has lost the lease
    prune_fingerprints(root / x2, mirror, 1)
    assert sorted(p.name for p in remote.iterdir()) == [x1, x2]
    monkeypatch.setenv("MEDASR_LEASE_TTL_S", "30")
    prune_fingerprints(root / x2, mirror, 1)
    assert sorted(p.name for p in remote.iterdir()) == [x2]


def test_a_local_remote_folder_that_cannot_be_read_fails_the_read(tmp_path, monkeypatch):
    """A local-directory remote on a network volume: EIO on one folder is a failed read, never "nothing there"
    (dvc-objects' own walk skips it: a fresh start, or a download missing its files, taken for corrupt)."""
    from dvc_objects.fs.local import LocalFileSystem

    remote = tmp_path / "remote" / FP
    for step in (4, 8):
        checkpoint(remote, step)
    mirror = Mirror(LocalFileSystem(), str(remote), "local", read_attempts=2, first_delay_s=0)
    real = os.scandir

    def eio(path="."):
        if not isinstance(path, int) and Path(path).name == step_dir_name(8):  # rmtree lists by descriptor
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", eio)
    run_dir = tmp_path / "local" / FP
    with pytest.raises(StageError, match=r"could not be read \(listing .*Input/output error"):
        resume_point(run_dir, FP, mirror)
    with pytest.raises(OSError, match="Input/output error"):
        mirror.download(step_dir_name(8), tmp_path / "download")
    assert not run_dir.exists() and not (tmp_path / "download" / step_dir_name(8)).exists()
    monkeypatch.setattr(os, "scandir", real)
    assert resume_point(run_dir, FP, mirror)[0].step == 8


def test_a_corrupt_download_is_deleted_and_never_displaces_an_aside_copy(tmp_path, caplog):
    """A corrupt download is a copy of what the remote still holds: deleted, not moved aside, where it would replace
    the aside copy of a real run folder (unsynced offline W&B runs, best/)."""
    from dvc_objects.fs.local import LocalFileSystem

    remote = tmp_path / "remote" / FP
    for step in (4, 8):
        checkpoint(remote, step)
    checkpoint(remote, 12, sha256="0" * 64)  # damaged on the remote
    mirror = Mirror(LocalFileSystem(), str(remote), "local")
    root = tmp_path / "checkpoints"
    aside = root / aside_name(FP, T1)
    (aside / "wandb" / "offline-run-1").mkdir(parents=True)
    (aside / "wandb" / "offline-run-1" / "run-1.wandb").write_bytes(b"unsynced")
    before = files(aside)

    with caplog.at_level(logging.WARNING):
        found, source = resume_point(root / FP, FP, mirror, now=T2)
    assert (source, found.step) == ("remote", 8) and "step-00000012 arrived corrupt" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == [FP, aside.name] and files(aside) == before
    assert sorted(p.name for p in (root / FP).iterdir()) == [LATEST, step_dir_name(8)]

    shutil.rmtree(root / FP)  # every mirrored checkpoint corrupt: a fresh start, the aside copy kept all the same
    for step in (4, 8):
        (remote / step_dir_name(step) / CHECKPOINT_STATE).write_bytes(b"damaged")
    assert resume_point(root / FP, FP, mirror, now=T3) == (None, "none")
    assert sorted(p.name for p in root.iterdir()) == [aside.name] and files(aside) == before
