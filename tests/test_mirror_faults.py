"""The checkpoint mirror under S3 faults: the real S3 server (moto on 127.0.0.1) behind a proxy that answers 503 or
drops requests on purpose (helpers.FaultyProxy). A read that fails is retried, then fails the stage (the loop
around it retries); it never becomes "nothing to resume", which would start a long run over, and nothing local is
deleted on the way. A checkpoint that arrives corrupt is deleted (the remote keeps it) and the previous one used.
Pruning after an upload that succeeded is reported as what failed. Old runs are pruned on S3 by when they were last
used."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from helpers import CREDENTIALS, FaultyProxy, run_env, tiny_params, train_in
from test_train_checkpoints import checkpoint
from test_train_fresh import FP, OTHER, files, mirrored, run_with_checkpoints, s3_repo

from medasr import StageError
from medasr.ops.lease import PID_ENV
from medasr.ops.mirror import Mirror, Uploader, open_mirror
from medasr.paths import BEST_DIR, CHECKPOINT_STATE, LATEST, REMOTE_CHECKPOINTS, step_dir_name
from stages.train.checkpoints import find_resumable, prune_fingerprints, resume_point


@pytest.fixture
def proxy(s3):
    """The test's bucket, reached through a FaultyProxy that passes everything until told otherwise."""
    faulty = FaultyProxy(s3.endpoint)
    yield faulty
    faulty.stop()


def flip_a_byte(s3, key: str) -> None:
    """Damage an object on the server itself, as a bad disk or a broken upload would: one bit of its first byte."""
    client = s3.client()
    body = bytearray(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    body[0] ^= 1
    client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))


def state_key(fp: str, step: int) -> str:
    return f"store/{REMOTE_CHECKPOINTS}/{fp}/{step_dir_name(step)}/{CHECKPOINT_STATE}"


def test_restore_under_s3_faults_never_starts_fresh_and_deletes_nothing(tmp_path, s3, proxy, monkeypatch, caplog):
    ws = s3_repo(tmp_path / "ws", proxy.endpoint, s3.bucket, monkeypatch)
    # the S3 client's own retries (botocore: 5 attempts, ~8 s of backoff) cut to 2 to keep the test short; a fault
    # must outlast them to reach our code, as it must outlast the default ones on a pod
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    pod = run_with_checkpoints(tmp_path / "pod", [4, 8, 12])  # the run another machine mirrored, then lost
    mirror = open_mirror(FP, ws)  # the train stage's own: the repo's default remote, through the proxy
    for step in (4, 8, 12):
        mirror.upload(pod / step_dir_name(step))
    flip_a_byte(s3, state_key(FP, 12))
    # this machine's own run folder: its only checkpoint corrupt, beside the best weights and an unsynced W&B run
    run_dir = ws / "checkpoints" / "train" / FP
    checkpoint(run_dir, 4, sha256="0" * 64)
    (run_dir / BEST_DIR).mkdir()
    (run_dir / BEST_DIR / "trained.safetensors").write_bytes(b"best weights")
    (run_dir / "wandb" / "offline-run-1").mkdir(parents=True)
    (run_dir / "wandb" / "offline-run-1" / "run-1.wandb").write_bytes(b"unsynced history")
    before = files(run_dir)

    mirror.first_delay_s = 0.05
    proxy.failing = proxy.close = True  # every GET and HEAD (listings, downloads): the connection drops
    with pytest.raises(StageError, match=r"DVC remote 's3' could not be read \(listing") as err:
        resume_point(run_dir, FP, mirror)
    assert "\n" not in str(err.value) and "retry later" in str(err.value)
    assert files(run_dir) == before and sorted(p.name for p in run_dir.parent.iterdir()) == [FP]
    assert "(attempt 3/4)" in caplog.text and proxy.failed >= 4 * 2  # each of our 4 tries: the client's 2

    # as runpod.sh's loop retries the stage: the listing works now, the newest checkpoint's download gets 503s
    proxy.match, proxy.close = step_dir_name(12), False
    with pytest.raises(StageError, match=r"could not be read \(downloading step-00000012\)"):
        resume_point(run_dir, FP, mirror)  # no corrupt checkpoint: the older step 8 is no substitute for it
    assert files(run_dir) == before and sorted(p.name for p in run_dir.parent.iterdir()) == [FP]
    proxy.match = ""

    # the faults end, but one more outlasts the S3 client's own retries: ours retry it
    proxy.failing, proxy.fail_first, failed = False, proxy.seen + 3, proxy.failed
    with caplog.at_level(logging.INFO):
        found, source = resume_point(run_dir, FP, mirror)
    assert proxy.failed == failed + 3
    assert (source, found.step, found.path) == ("remote", 8, run_dir / step_dir_name(8))  # the newest intact one
    assert "mirrored checkpoint step-00000012 arrived corrupt" in caplog.text
    assert find_resumable(run_dir, FP).step == 8 and (run_dir / LATEST).read_text() == "step-00000008\n"
    assert files(run_dir / BEST_DIR) == files(pod / BEST_DIR)  # what travels with the restored checkpoint

    # nothing deleted: what the run folder held is in the aside copy; the corrupt download is gone (the remote has it)
    (aside,) = run_dir.parent.glob(f"{FP}.aside-*")
    assert files(aside) == before
    assert not list(run_dir.parent.glob(".*.tmp"))  # the staged downloads are gone


def test_a_failed_prune_after_an_upload_is_reported_as_a_failed_prune(tmp_path, s3, monkeypatch, caplog):
    ws = s3_repo(tmp_path / "ws", s3.endpoint, s3.bucket, monkeypatch)
    pod = run_with_checkpoints(tmp_path / "pod", [4, 8])
    mirror = open_mirror(FP, ws)

    def refused(*args, **kwargs):
        raise PermissionError("AccessDenied: s3:DeleteObject")

    monkeypatch.setattr(mirror.fs, "rm", refused)
    uploader = Uploader(mirror, keep=1, first_delay_s=0.01)
    with caplog.at_level(logging.INFO):
        for step in (4, 8):
            uploader.submit(pod / step_dir_name(step))
        assert uploader.drain(60)
    assert mirror.complete_steps() == [step_dir_name(8), step_dir_name(4)]  # both uploaded, the old one not pruned
    assert "mirrored step-00000008 to DVC remote 's3'" in caplog.text
    assert "mirrored step-00000008, but pruning older checkpoints on 's3' failed" in caplog.text
    assert "AccessDenied" in caplog.text and "failed (attempt" not in caplog.text and "gave up" not in caplog.text


def test_keep_fingerprints_on_s3_prunes_by_last_use(tmp_path, s3, monkeypatch):
    ws = s3_repo(tmp_path / "ws", s3.endpoint, s3.bucket, monkeypatch)
    # runpod.sh's loop, holding the lease; no TTL, so runs used seconds ago may go (test_train_checkpoints: the TTL)
    monkeypatch.setenv(PID_ENV, str(os.getpid()))
    monkeypatch.setenv("MEDASR_LEASE_TTL_S", "0")
    third, first = "f" * 16, open_mirror(FP, ws)
    base = first.fs.parent(first.root)
    for fp in (OTHER, third, FP):  # used in this order, a second apart (S3 times have whole seconds)
        time.sleep(1.1 if fp != OTHER else 0)
        mirror = Mirror(first.fs, first.fs.join(base, fp), "s3")
        mirror.upload(run_with_checkpoints(tmp_path / "pods" / fp, [4], fp) / step_dir_name(4))
    mirror = Mirror(first.fs, first.fs.join(base, OTHER), "s3")  # the oldest run is trained again: it is kept
    prune_fingerprints(tmp_path / "local" / OTHER, mirror, 2)
    assert mirrored(s3, third) == {} and mirrored(s3, OTHER) and mirrored(s3, FP)
    prune_fingerprints(tmp_path / "local" / OTHER, mirror, 1)
    assert mirrored(s3, FP) == {} and mirror.complete_steps() == [step_dir_name(4)]


@pytest.mark.e2e
def test_medasr_train_resumes_the_newest_intact_mirrored_step_through_s3_faults(
    tmp_path, demo_manifests, s3, proxy, monkeypatch
):
    """`medasr train` as DVC runs it, on a new machine, through a fault longer than the S3 client's retries, with
    the newest of three mirrored checkpoints (real ones, of a tiny run) damaged on the server."""
    from test_remote import workspace

    p = tiny_params(**{"train.max_steps": 3, "train.checkpoint_every": 1, "train.keep_checkpoints": 3})
    train_in(tmp_path / "lost", demo_manifests, p)  # the lost machine's run, in this process: one NeMo start less
    (run_dir,) = (tmp_path / "lost" / "ckpt").iterdir()
    fp = run_dir.name
    # the new machine, asked for no more than step 2 (the restored step is exported without training); its default
    # DVC remote is the bucket, reached through the proxy only
    proxied = SimpleNamespace(bucket=s3.bucket, endpoint=proxy.endpoint)
    ws = workspace(tmp_path / "ws", demo_manifests, tiny_params(**{"train.max_steps": 2}), proxied)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    mirror = open_mirror(fp, ws)
    for step in (1, 2, 3):
        mirror.upload(run_dir / step_dir_name(step))
    flip_a_byte(s3, state_key(fp, 3))

    proxy.fail_first = proxy.seen + 6  # outlasts botocore's 5 attempts once: the mirror's own retry takes over
    out = subprocess.run(
        [sys.executable, "-m", "stages.cli", "train"],
        cwd=ws,
        env=run_env() | CREDENTIALS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((ws / "metrics" / "train.json").read_text())
    assert (metrics["resume_source"], metrics["resumed_from_step"]) == ("remote", 2), out.stderr[-3000:]
    assert proxy.failed == 6 and "(attempt 1/4)" in out.stderr and "arrived corrupt" in out.stderr
    # the corrupt download deleted, not moved aside (there was no run folder here to move)
    assert sorted(p.name for p in (ws / "checkpoints" / "train").iterdir()) == [fp]
