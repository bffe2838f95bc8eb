"""`medasr train --fresh`: a run's checkpoints are moved aside, here and on the DVC remote (a real S3 server: moto on
127.0.0.1), never deleted; nothing resumes from an aside copy; only the newest aside copy per fingerprint is kept;
doctor names them with their size; a remote that cannot be reached stops it before anything moved.

Checkpoint folders are written by hand (fast); the last test runs `medasr train` itself (e2e)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from helpers import CREDENTIALS, DEVELOPER_SETTINGS, free_port, run_env, tiny_params
from test_train_checkpoints import checkpoint

from medasr import StageError
from medasr.ops import doctor
from medasr.ops.mirror import Mirror, open_mirror, remote_asides
from medasr.paths import BEST_DIR, CHECKPOINT_META, LATEST, REMOTE_CHECKPOINTS, aside_name, step_dir_name
from stages.train.checkpoints import copy_extras, find_resumable, resume_point, set_aside

FP, OTHER = "0123456789abcdef", "fedcba9876543210"
T1 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T2, T3, T4 = (T1 + timedelta(hours=h) for h in (1, 2, 3))


def run_with_checkpoints(root: Path, steps: list[int], fp: str = FP) -> Path:
    """A run folder as training leaves it: checkpoints, the `latest` pointer and the best weights beside them."""
    run_dir = root / fp
    for step in steps:
        checkpoint(run_dir, step, fp)
    (run_dir / BEST_DIR).mkdir()
    (run_dir / BEST_DIR / CHECKPOINT_META).write_text(json.dumps({"step": steps[0]}))
    for step in steps:
        copy_extras(run_dir, run_dir / step_dir_name(step))  # as the callback does: best/meta.json is no marker
    (run_dir / LATEST).write_text(step_dir_name(steps[-1]) + "\n")
    return run_dir


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fresh_moves_local_checkpoints_aside_and_keeps_the_newest_aside_copy(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints" / "train"
    run_dir = run_with_checkpoints(root, [4, 8])
    before = files(run_dir)
    set_aside(run_with_checkpoints(root, [4], OTHER), None, now=T1)  # another run's: no retention of this one's
    set_aside(run_dir, None, now=T1)

    first = root / aside_name(FP, T1)
    assert first.name == "0123456789abcdef.aside-20260102T030405Z"
    assert not run_dir.exists() and files(first) == before  # moved whole, nothing lost
    assert resume_point(run_dir, FP, None) == (None, "none")  # a fresh start: the aside copy is never looked at

    run_with_checkpoints(root, [4])  # the fresh run's first checkpoint, then --fresh again
    set_aside(run_dir, None, now=T2)
    assert sorted(p.name for p in root.iterdir()) == [aside_name(FP, T2), aside_name(OTHER, T1)]
    assert find_resumable(root / aside_name(FP, T2), FP).step == 4

    checkpoint(run_dir, 4, meta=False)  # --fresh again, on a run stopped before its first checkpoint was complete:
    set_aside(run_dir, None, now=T3)  # nothing resumable to keep, so it is cleared and the complete aside copy stays
    assert not run_dir.exists()
    assert sorted(p.name for p in root.iterdir()) == [aside_name(FP, T2), aside_name(OTHER, T1)]

    # doctor (and `doctor --disk`, runpod.sh's preflight line) names each aside copy with its size
    monkeypatch.chdir(tmp_path)
    sizes = doctor.local_asides()
    assert sizes == {
        f"checkpoints/train/{aside_name(FP, T2)}": sum(map(len, files(root / aside_name(FP, T2)).values())),
        f"checkpoints/train/{aside_name(OTHER, T1)}": sum(map(len, files(root / aside_name(OTHER, T1)).values())),
    }
    line = doctor.disk(tmp_path).value
    assert f"checkpoints/train/{aside_name(FP, T2)} (" in line and " B)" in line and "\n" not in line


def s3_repo(root: Path, endpoint: str, bucket: str, monkeypatch) -> Path:
    """A DVC repo whose default remote is `s3://<bucket>/store` at `endpoint`, opened in this process."""
    from dvc.repo import Repo

    for name in DEVELOPER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    Repo.init(str(root)).close()
    (root / ".dvc" / "config").write_text(
        f"[core]\n    remote = s3\n['remote \"s3\"']\n    url = s3://{bucket}/store\n    endpointurl = {endpoint}\n"
    )
    return root


def mirrored(s3, name: str) -> dict[str, bytes]:
    """The objects under <remote>/medasr-checkpoints/<name>/, by their path below it."""
    prefix = f"store/{REMOTE_CHECKPOINTS}/{name}/"
    client, keys = s3.client(), s3.keys()
    return {
        k[len(prefix) :]: client.get_object(Bucket=s3.bucket, Key=k)["Body"].read()
        for k in keys
        if k.startswith(prefix)
    }


def test_fresh_moves_the_mirrored_checkpoints_aside_on_s3_and_survives_an_interrupted_move(tmp_path, s3, monkeypatch):
    ws = s3_repo(tmp_path, s3.endpoint, s3.bucket, monkeypatch)
    run_dir = run_with_checkpoints(ws / "ckpt", [4, 8])
    mirror = open_mirror(FP, ws)
    for step in (4, 8):
        mirror.upload(run_dir / step_dir_name(step))
    uploaded = mirrored(s3, FP)
    assert (
        f"{step_dir_name(8)}/{CHECKPOINT_META}" in uploaded and f"{step_dir_name(8)}/{BEST_DIR}/meta.json" in uploaded
    )

    # interrupted while copying: the run is as it was, on the remote and here
    copy, rm = mirror.fs.copy, mirror.fs.rm

    def copy_then_fail(src, dst):
        if src.endswith(CHECKPOINT_META):
            raise ConnectionError("connection reset by peer\nafter 5 retries")
        copy(src, dst)

    with monkeypatch.context() as m:
        m.setattr(mirror.fs, "copy", copy_then_fail)
        with pytest.raises(StageError, match=r"DVC remote 's3'.*connection reset by peer") as err:
            set_aside(run_dir, mirror, now=T1)
    assert "\n" not in str(err.value)
    assert run_dir.is_dir() and mirrored(s3, FP) == uploaded
    assert mirror.complete_steps() == ["step-00000008", "step-00000004"]

    # interrupted after the copy: the markers went first, so nothing left in the run is resumable
    def rm_markers_only(path, recursive=False):
        if recursive:
            raise ConnectionError("connection reset")
        rm(path)

    with monkeypatch.context() as m:
        m.setattr(mirror.fs, "rm", rm_markers_only)
        with pytest.raises(StageError):
            set_aside(run_dir, mirror, now=T2)
    assert mirror.complete_steps() == [] and mirrored(s3, aside_name(FP, T2)) == uploaded and run_dir.is_dir()

    # the retry clears what is left, which resumes nothing and would otherwise replace the complete aside copy; the
    # older, half-made copy of the first try goes
    set_aside(run_dir, mirror, now=T3)
    assert mirrored(s3, FP) == {} and mirrored(s3, aside_name(FP, T1)) == {}
    assert mirrored(s3, aside_name(FP, T2)) == uploaded
    assert sorted(p.name for p in (ws / "ckpt").iterdir()) == [aside_name(FP, T3)]  # here, it moved only now
    # a fresh run (any pod) resumes nothing: not the moved-aside copy on the remote either
    assert resume_point(run_dir, FP, open_mirror(FP, ws)) == (None, "none")
    aside = Mirror(mirror.fs, mirror.fs.join(mirror.fs.parent(mirror.root), aside_name(FP, T2)), "s3")
    assert find_resumable(aside.download(step_dir_name(8), tmp_path / "check").parent, FP).step == 8

    # --fresh again after the fresh run mirrored a checkpoint: only the newest aside copy is kept, on both sides
    fresh_run = run_with_checkpoints(ws / "ckpt", [4])
    mirror.upload(fresh_run / step_dir_name(4))
    fresh_uploaded = mirrored(s3, FP)
    set_aside(run_dir, mirror, now=T4)
    assert mirrored(s3, FP) == mirrored(s3, aside_name(FP, T2)) == {}
    assert mirrored(s3, aside_name(FP, T4)) == fresh_uploaded
    assert sorted(p.name for p in (ws / "ckpt").iterdir()) == [aside_name(FP, T4)]
    size = sum(map(len, fresh_uploaded.values()))
    assert size > 0 and remote_asides(ws) == ("s3", {aside_name(FP, T4): size})
    monkeypatch.chdir(ws)
    row = doctor._remote_asides()
    assert row.name == "aside checkpoints (s3)" and aside_name(FP, T4) in row.value and row.status == "ok"


def test_fresh_with_an_unreachable_remote_moves_nothing(tmp_path, monkeypatch):
    ws = s3_repo(tmp_path, f"http://127.0.0.1:{free_port()}", "medasr-test", monkeypatch)  # nothing listens there
    run_dir = run_with_checkpoints(ws / "ckpt", [4])
    before = files(run_dir)
    with pytest.raises(StageError, match="could not move the checkpoints on DVC remote 's3' aside") as err:
        set_aside(run_dir, open_mirror(FP, ws), now=T1)
    assert "\n" not in str(err.value)
    assert files(run_dir) == before and sorted(p.name for p in (ws / "ckpt").iterdir()) == [FP]


@pytest.mark.e2e
def test_medasr_train_fresh_starts_over_and_keeps_the_run_aside(tmp_path, demo_manifests, s3, monkeypatch):
    """`MEDASR_TRAIN_FRESH=1 medasr train`, as `dvc repro` runs it, where the run has a checkpoint here and a newer
    one on the remote: placeholders no training can load, so resuming either would fail the run."""
    from medasr.device import resolve_devices, resolve_precision
    from stages.train.checkpoints import data_hash, fingerprint

    p = tiny_params(**{"train.max_steps": 4})
    ws = tmp_path / "ws"
    shutil.copytree(demo_manifests, ws / "data" / "manifests")
    (ws / "params.yaml").write_text(yaml.safe_dump(p.model_dump()))
    s3_repo(ws, s3.endpoint, s3.bucket, monkeypatch)  # DVCLive needs a git commit: the repo gets one below
    env = run_env() | CREDENTIALS
    for cmd in (
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "ws"],
    ):
        subprocess.run(cmd, cwd=ws, env=env, check=True)
    fp = fingerprint(
        p.model,
        p.lora,
        p.train,
        data_hash(ws / "data" / "manifests"),
        world_size=resolve_devices(p.train.devices),  # as the run resolves them on this machine
        precision=resolve_precision(p.train.precision),
    )
    local = files(run_with_checkpoints(ws / "checkpoints" / "train", [4], fp))
    pod = run_with_checkpoints(tmp_path / "pod", [4, 8], fp)
    for step in (4, 8):
        open_mirror(fp, ws).upload(pod / step_dir_name(step))
    remote = mirrored(s3, fp)

    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "train"],
        cwd=ws,
        env=env | {"MEDASR_TRAIN_FRESH": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((ws / "metrics" / "train.json").read_text())
    assert (metrics["resume_source"], metrics["resumed_from_step"], metrics["global_step"]) == ("none", 0, 4)
    (aside,) = (ws / "checkpoints" / "train").glob(f"{fp}.aside-*")
    assert files(aside) == local and mirrored(s3, aside.name) == remote  # both kept whole, under one name
    # the fresh run's own checkpoint, here and mirrored, where the old run's were
    assert find_resumable(ws / "checkpoints" / "train" / fp, fp).step == 4
    assert f"{step_dir_name(4)}/{CHECKPOINT_META}" in mirrored(s3, fp)
    assert mirrored(s3, fp)[f"{step_dir_name(4)}/{CHECKPOINT_META}"] != remote[f"{step_dir_name(4)}/{CHECKPOINT_META}"]
