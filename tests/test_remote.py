"""Live checkpoint mirroring against a real S3-compatible server (moto in server mode on 127.0.0.1: the session's
shared one, each test in a bucket of its own, and a server of its own for the outage test): resume on a fresh
machine, an S3 outage mid-training, and SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CREDENTIALS, DEVELOPER_SETTINGS, S3Server, run_env, tiny_params, wait_for


def workspace(root: Path, manifests: Path, p, s3: S3Server | None) -> Path:
    """A minimal DVC repo holding the manifests and params, with the test server as its default remote."""
    root.mkdir(parents=True)
    shutil.copytree(manifests, root / "data" / "manifests")
    (root / "params.yaml").write_text(yaml.safe_dump(p.model_dump()))
    env = run_env() | CREDENTIALS
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)
    if s3 is not None:
        subprocess.run(["dvc", "remote", "add", "-d", "s3", f"s3://{s3.bucket}/store"], cwd=root, env=env, check=True)
        subprocess.run(["dvc", "remote", "modify", "s3", "endpointurl", s3.endpoint], cwd=root, env=env, check=True)
    for cmd in (
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "ws"],
    ):
        subprocess.run(cmd, cwd=root, env=env, check=True)  # a clone always has a commit (DVCLive needs one)
    return root


def train(ws: Path, log: Path | None = None, **popen) -> subprocess.Popen:
    """`medasr train` in `ws`; its output piped, or written to `log` (a run nobody reads until it ends)."""
    return subprocess.Popen(
        [sys.executable, "-m", "stages.cli", "train"],
        cwd=ws,
        env=run_env() | CREDENTIALS,
        stdout=subprocess.PIPE if log is None else log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def final_weights(ws: Path, step: int) -> dict:
    (run_dir,) = (d for d in (ws / "checkpoints" / "train").iterdir() if d.is_dir())  # beside validation.json
    return torch.load(run_dir / f"step-{step:08d}" / "state.ckpt", weights_only=False)["state_dict"]


@pytest.mark.e2e
def test_a_fresh_machine_resumes_from_the_mirrored_checkpoint(tmp_path, demo_manifests, s3):
    steps = 12  # four checkpoints (two kept), two validations: enough for a resume, pruning and a best adapter
    # That a resumed run equals an uninterrupted one is test_train.py's (SIGKILL then resume, bit-exact); here the
    # checkpoint crosses the remote, and the third machine's copy must be the second's, bit for bit.
    p = tiny_params(**{"train.max_steps": steps, "train.checkpoint_every": 3, "train.val_every": 6})
    first = workspace(tmp_path / "pod1", demo_manifests, p, s3)
    proc = train(first)
    wait_for(lambda: s3.complete_steps(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    mirrored = max(s3.complete_steps())
    shutil.rmtree(first)  # the pod and its disk are gone

    second = workspace(tmp_path / "pod2", demo_manifests, p, s3)
    out = train(second).communicate(timeout=600)[0]
    metrics = json.loads((second / "metrics" / "train.json").read_text())
    assert metrics["resume_source"] == "remote", out[-3000:]
    assert metrics["resumed_from_step"] >= mirrored > 0 and metrics["global_step"] == steps
    # old mirrored checkpoints are pruned to keep_checkpoints
    assert len(s3.complete_steps()) <= p.train.keep_checkpoints and max(s3.complete_steps()) == steps

    # a third machine after the run finished: it restores the final checkpoint (with its best-by-WER adapter) and
    # exports it without training further
    third = workspace(tmp_path / "pod3", demo_manifests, p, s3)
    out = train(third).communicate(timeout=600)[0]
    again = json.loads((third / "metrics" / "train.json").read_text())
    restored = (again["resume_source"], again["resumed_from_step"], again["global_step"])
    assert restored == ("remote", steps, steps), out[-3000:]
    assert again["exported_from"] == "best" and again["exported_step"] == metrics["exported_step"]
    a, b = final_weights(second, steps), final_weights(third, steps)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.e2e
def test_an_s3_outage_during_training_is_retried_and_never_fatal(tmp_path, demo_manifests, own_s3):
    s3 = own_s3  # stopped and restarted below: a server of its own
    p = tiny_params(**{"train.max_steps": 100, "train.checkpoint_every": 3})
    ws = workspace(tmp_path / "pod", demo_manifests, p, s3)
    proc = train(ws)
    wait_for(lambda: s3.complete_steps(), proc)
    s3.stop()
    time.sleep(15)  # longer than the S3 client's own ~10 s of connection retries, so uploads really fail
    s3.start()  # empty again: everything mirrored from now on is new
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "failed (attempt" in out  # the outage was seen and reported
    assert s3.complete_steps() and max(s3.complete_steps()) == 100  # a later checkpoint landed
    assert "testing" not in out.replace("medasr-testing", "")  # credentials never printed


def test_remote_setup_picks_s3_or_local_and_keeps_a_users_default(tmp_path):
    from helpers import run, scratch_clone

    repo = scratch_clone(tmp_path / "clone")
    secret = "planted-secret-for-config-check"
    base_env = {"AWS_SECRET_ACCESS_KEY": secret, "MEDASR_WORKDIR": str(tmp_path / "work")}

    def setup(**extra: str) -> subprocess.CompletedProcess[str]:
        env = run_env() | base_env | extra
        return subprocess.run(
            [sys.executable, "-m", "stages.cli", "remote", "setup"], cwd=repo, env=env, capture_output=True, text=True
        )

    local = setup()
    assert local.returncode == 0 and "medasr-local" in local.stdout
    assert run(repo, "dvc", "remote", "default").stdout.strip() == "medasr-local"
    assert (tmp_path / "work" / "dvc-remote").is_dir()

    s3 = setup(MEDASR_S3_URL="s3://bucket/medasr", MEDASR_S3_ENDPOINT_URL="http://127.0.0.1:9")
    assert s3.returncode == 0 and "medasr-s3" in s3.stdout
    assert run(repo, "dvc", "remote", "default").stdout.strip() == "medasr-s3"
    config_local = (repo / ".dvc" / "config.local").read_text()
    assert "endpointurl = http://127.0.0.1:9" in config_local
    for path in (repo / ".dvc").rglob("config*"):
        assert secret not in path.read_text()  # credentials stay in the environment
    assert "config.local" in run(repo, "git", "check-ignore", ".dvc/config.local").stdout

    bad = setup(MEDASR_S3_URL="bucket-without-scheme")
    assert bad.returncode == 1 and "s3://bucket/prefix" in bad.stderr

    run(repo, "dvc", "remote", "add", "-d", "mine", str(tmp_path / "mine"))  # the user's own, committed default
    kept = setup(MEDASR_S3_URL="s3://bucket/medasr")
    assert kept.returncode == 0 and "'mine'" in kept.stdout and "kept" in kept.stdout
    assert run(repo, "dvc", "remote", "default").stdout.strip() == "mine"


@pytest.mark.e2e
def test_a_fresh_clone_without_dvc_lock_restores_every_finished_stage_from_s3(tmp_path, demo_run):
    from helpers import run

    env = demo_run.env  # `remote setup` then `make demo`, with a bucket of the session's S3 server as the remote

    def sh(cwd: Path, *cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=cwd, env=run_env() | env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc.stdout + proc.stderr

    first = demo_run.clone  # the session's demo run: pushed from, never changed here
    sh(first, "dvc", "push", "--run-cache")

    # a clone with the demo's params committed, but not dvc.lock: a pod that never pushed git
    second = tmp_path / "second"
    run(tmp_path, "git", "clone", "-q", str(first), str(second))
    shutil.copy2(first / "params.yaml", second / "params.yaml")
    run(second, "git", "commit", "-qam", "demo params")
    assert not (second / "dvc.lock").exists()
    sh(second, sys.executable, "-m", "stages.cli", "remote", "setup")
    out = sh(second, "dvc", "repro", "--pull")
    assert "Running stage" not in out, out[-3000:]
    assert len(re.findall(r"Stage '\w+' is cached - skipping run, checking out outputs", out)) == 6, out[-3000:]
    for name in ("data.json", "testsets.json", "train.json", "eval.json"):
        assert (second / "metrics" / name).read_text() == (first / "metrics" / name).read_text()
    assert (second / "models" / "canary-qwen-medical-lora" / "medasr.json").is_file()


def nested_remote(root: Path, s3: S3Server, url: str, monkeypatch) -> Path:
    """A DVC repo (git too) whose default remote is `url` on the test server, opened in this process."""
    from dvc.repo import Repo

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    Repo.init(str(root)).close()
    (root / ".dvc" / "config").write_text(
        f"[core]\n    remote = s3\n    analytics = false\n"
        f"['remote \"s3\"']\n    url = {url}\n    endpointurl = {s3.endpoint}\n"
    )
    return root


def test_check_remote_accepts_a_new_prefix_in_a_bucket_and_refuses_a_missing_bucket(tmp_path, s3, monkeypatch):
    from medasr.ops.remote import REMOTE_OK, REMOTE_REJECTED, check_remote

    for name in DEVELOPER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    # a fresh bucket, nothing ever written under team/medasr: `dvc push` creates it, so the remote is reachable
    fresh = nested_remote(tmp_path / "fresh", s3, f"s3://{s3.bucket}/team/medasr", monkeypatch)
    assert check_remote(fresh) == (REMOTE_OK, "DVC remote 's3' reachable")
    s3.client().put_object(Bucket=s3.bucket, Key="team/medasr/files/md5/00/0", Body=b"x")
    assert check_remote(fresh)[0] == REMOTE_OK

    missing = nested_remote(tmp_path / "missing", s3, "s3://no-such-bucket/team/medasr", monkeypatch)
    code, line = check_remote(missing)
    assert code == REMOTE_REJECTED and line.startswith("DVC remote 's3' refused access") and "\n" not in line

    # outside any DVC repository: one line to print, no traceback
    code, line = check_remote(tmp_path)
    assert code == REMOTE_REJECTED and "not inside of a DVC repository" in line and "\n" not in line


@pytest.mark.e2e
def test_dvc_push_to_a_new_prefix_of_a_fresh_bucket(tmp_path, s3):
    """What runpod.sh runs on attempt 1 against a fresh bucket with a nested prefix: the check passes, and the
    push creates the prefix."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = run_env() | CREDENTIALS
    url = f"s3://{s3.bucket}/team/medasr"
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "remote", "add", "-d", "s3", url],
        ["dvc", "remote", "modify", "s3", "endpointurl", s3.endpoint],
    ):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    check = subprocess.run(
        [sys.executable, "-m", "stages.cli", "remote", "check"], cwd=repo, env=env, text=True, capture_output=True
    )
    assert check.returncode == 0 and "DVC remote 's3' reachable" in check.stdout, check.stderr
    (repo / "data.txt").write_text("pushed through a prefix nobody created\n")
    for cmd in (["dvc", "add", "-q", "data.txt"], ["dvc", "push", "-q"]):
        proc = subprocess.run(cmd, cwd=repo, env=env, text=True, capture_output=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(k.startswith("team/medasr/files/md5/") for k in s3.keys())  # noqa: SIM118 (a list)
