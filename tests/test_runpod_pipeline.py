"""runpod.sh for real: the whole pipeline on CPU with the tiny preset against a real S3 server on 127.0.0.1, with the
server down when the loop starts and the machine lost mid-training; and its preflight (`--check`) with wrong
credentials. The loop's mechanics alone (backoff, signals, watchdog, locks) are in test_runpod.py."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from helpers import (
    BUCKET,
    CREDENTIALS,
    REPO,
    VENV_BIN,
    S3Server,
    free_port,
    git,
    run_env,
    scratch_clone,
    set_params,
    wait_for,
)

SECRET = "planted-secret-0a1b2c3d"  # moto without auth accepts any key: plant one to prove it is never written


def demo_params() -> dict[str, object]:
    """`make demo`'s params overrides, read from the Makefile so the two never drift apart."""
    makefile = (REPO / "Makefile").read_text()
    block = makefile[makefile.index("DEMO_PARAMS :=") : makefile.index(".PHONY")]
    import yaml

    overrides = re.findall(r"-S (?:'([^']*)'|(\S+))", block)  # -S key=value or -S 'key=value with spaces'
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for pair in overrides for item in pair if item)}


# On top of the demo's params: a shorter run with no validation, decoding short hypotheses. The pipeline's shape is
# the demo's; only the CPU time this test does not look at is cut.
POD_RUN = {"train.max_steps": 24, "train.checkpoint_every": 4, "train.val_every": 0, "eval.max_new_tokens": 8}


def pod_checkout(dest: Path, **overrides: object) -> Path:
    """A clone as a pod would have it: the demo's params committed, and the test venv already installed (asserted,
    so runpod.sh's `make install` is a no-op and never re-points the shared editable install)."""
    repo = scratch_clone(dest)
    set_params(repo, **(demo_params() | overrides))
    git(repo, "commit", "-qam", "demo params")
    up_to_date = subprocess.run(["make", "-q", "install", f"VENV={VENV_BIN.parent}"], cwd=repo)
    assert up_to_date.returncode == 0, "the test venv's install stamp is older than the clone's requirements"
    return repo


def runpod(repo: Path, workdir: Path, s3: S3Server, *args: str, **extra: str) -> subprocess.Popen:
    env = run_env() | CREDENTIALS | {"AWS_SECRET_ACCESS_KEY": SECRET}
    env |= {
        "MEDASR_WORKDIR": str(workdir),
        "MEDASR_VENV": str(VENV_BIN.parent),
        "MEDASR_ALLOW_CPU": "1",
        "MEDASR_MIN_FREE_GB": "1",
        "MEDASR_S3_URL": f"s3://{BUCKET}/pipeline",
        "MEDASR_S3_ENDPOINT_URL": s3.endpoint,
        "MEDASR_BACKOFF_BASE_S": "1",
        "MEDASR_BACKOFF_MAX_S": "3",
        "MEDASR_STATUS_EVERY_S": "2",
        **extra,
    }
    env.pop("WANDB_MODE")  # runpod.sh picks it (no key: offline)
    return subprocess.Popen(
        ["bash", "runpod.sh", *args], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL runpod.sh and every process below it: the pod is gone, nothing gets to clean up."""
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.e2e
def test_runpod_sh_survives_a_remote_outage_and_the_loss_of_its_pod(tmp_path):
    s3 = S3Server(free_port())  # not started: the remote is down when the loop starts
    pod1 = pod_checkout(tmp_path / "pod1", **POD_RUN)
    log1 = tmp_path / "work1" / "logs" / "runpod.log"
    proc = runpod(pod1, tmp_path / "work1", s3, "--once")
    try:
        wait_for(lambda: log1.is_file() and "retrying in" in log1.read_text(), proc, 120, "a retry")
        assert "problem: DVC remote 'medasr-s3' unreachable" in log1.read_text()
        s3.start()
        # fetch, subset and manifest finish and are pushed; training mirrors a checkpoint; then the pod dies
        wait_for(lambda: s3.complete_steps(), proc, 600, "a mirrored checkpoint")
        kill_tree(proc)
        first_out = proc.stdout.read()
        assert "pipeline finished" not in first_out

        pod2 = pod_checkout(tmp_path / "pod2", **POD_RUN)
        proc = runpod(pod2, tmp_path / "work2", s3, "--once")  # a new pod: new disk, new work dir, same remote
        out = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, out[-4000:]
        pipeline = (tmp_path / "work2" / "logs" / "pipeline.log").read_text()
        for stage in ("fetch", "subset", "manifest"):
            assert f"Stage '{stage}' is cached - skipping run" in pipeline, pipeline[-4000:]
            assert f"Running stage '{stage}'" not in pipeline
        train = json.loads((pod2 / "metrics" / "train.json").read_text())
        assert (
            train["resume_source"] == "remote"
            and train["resumed_from_step"] > 0
            and train["global_step"] == POD_RUN["train.max_steps"]
        )
        assert "Running stage 'eval'" in pipeline and (pod2 / "metrics" / "eval.json").is_file()

        status = json.loads(
            s3.client().get_object(Bucket=BUCKET, Key="pipeline/medasr-status/default/status.json")["Body"].read()
        )
        assert status["state"] == "done" and status["run"] == "default"
        written = [p for w in ("work1", "work2") for p in (tmp_path / w / "logs").iterdir()]
        for text in [first_out, out, *(p.read_text(errors="replace") for p in written)]:
            assert SECRET not in text
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        s3.stop()


@pytest.mark.e2e  # the preflight runs `medasr doctor`, which imports torch
def test_check_reports_wrong_credentials_and_a_bad_wandb_key_in_one_line_each(tmp_path):
    s3 = S3Server(free_port())
    good = s3.start(auth=True)
    try:
        repo = pod_checkout(tmp_path / "pod")
        ok = runpod(repo, tmp_path / "work", s3, "--check", **good)
        out = ok.communicate(timeout=300)[0]
        assert ok.returncode == 0 and "preflight ok" in out, out[-3000:]

        wandb_key = "f" * 40
        bad = runpod(
            repo,
            tmp_path / "work",
            s3,
            "--check",
            AWS_ACCESS_KEY_ID=good["AWS_ACCESS_KEY_ID"],
            WANDB_API_KEY=wandb_key,
            WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens: the key cannot be verified
        )
        out = bad.communicate(timeout=300)[0]
        assert bad.returncode == 1, out[-3000:]
        problems = [line for line in out.splitlines() if "problem:" in line]
        assert len(problems) == 2, out[-3000:]
        assert any("DVC remote 'medasr-s3' refused access" in p and "PermissionError" in p for p in problems)
        assert any("W&B rejected or could not check WANDB_API_KEY" in p for p in problems)
        assert "Traceback" not in out
        logs = [p.read_text() for p in (tmp_path / "work" / "logs").iterdir()]
        for text in [out, *logs]:
            assert SECRET not in text and wandb_key not in text and good["AWS_SECRET_ACCESS_KEY"] not in text

        # the loop itself gives up at once on refused credentials (retrying cannot fix them)
        loop = runpod(repo, tmp_path / "work", s3, "--once")
        out = loop.communicate(timeout=300)[0]
        assert loop.returncode == 1 and "giving up: the DVC remote refused access" in out, out[-3000:]
        assert "attempt 2" not in out
    finally:
        s3.stop()
