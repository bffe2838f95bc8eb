"""runpod.sh for real: the whole pipeline on CPU with the tiny preset against a real S3 server on 127.0.0.1, with the
server down when the loop starts and the pod stopped mid-training (SIGTERM to runpod.sh as PID 1, as RunPod stops
a container); and its preflight (`--check`) with wrong credentials. The loop's mechanics alone (backoff, signals,
watchdog, locks, lease) are in test_runpod.py, the heartbeat with the watcher in test_heartbeat_watch.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
from fake_runpod import FakeRunPod
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

from medasr.ops.runpod import PodSpec, RunPodAPI, create_payload

KEY = "rpa_check_test_key_0123456789"
SECRET = "planted-secret-0a1b2c3d"  # moto without auth accepts any key: plant one to prove it is never written


def demo_params() -> dict[str, object]:
    """`make demo`'s params overrides, read from the Makefile so the two never drift apart."""
    makefile = (REPO / "Makefile").read_text()
    block = makefile[makefile.index("DEMO_PARAMS :=") : makefile.index(".PHONY")]
    block = re.sub(r"\\\n\s*", " ", block)  # make joins a continued line with one space
    import yaml

    overrides = re.findall(r"-S (?:'([^']*)'|(\S+))", block)  # -S key=value or -S 'key=value with spaces'
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for pair in overrides for item in pair if item)}


# On top of the demo's params: a shorter run with no validation, decoding short hypotheses. The pipeline's shape is
# the demo's; only the CPU time this test does not look at is cut. No periodic checkpoint: the only one a stopped
# pod leaves is the one its stop signal makes.
POD_RUN = {"train.max_steps": 24, "train.checkpoint_every": 1000, "train.val_every": 0, "eval.max_new_tokens": 8}


def pod_checkout(dest: Path, **overrides: object) -> Path:
    """A clone as a pod would have it: the demo's params committed, and the test venv already installed (asserted,
    so runpod.sh's `make install` is a no-op and never re-points the shared editable install)."""
    repo = scratch_clone(dest)
    set_params(repo, **(demo_params() | overrides))
    git(repo, "commit", "-qam", "demo params")
    up_to_date = subprocess.run(["make", "-q", "install", f"VENV={VENV_BIN.parent}"], cwd=repo)
    assert up_to_date.returncode == 0, "the test venv's install stamp is older than the clone's requirements"
    return repo


def runpod(repo: Path, workdir: Path, s3: S3Server, *args: str, pid1: bool = False, **extra: str) -> subprocess.Popen:
    """runpod.sh with the pod's settings; with pid1, as PID 1 of a new PID namespace (the pod's start command ends in
    `exec bash runpod.sh`): whatever it leaves running when it exits is killed with it."""
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
        "MEDASR_LEASE_SETTLE_S": "2",  # over a local S3 server's read-to-write time; the default allows for retries
        **extra,
    }
    env.pop("WANDB_MODE")  # runpod.sh picks it (no key: offline)
    command = ["unshare", "--fork", "--pid", "--mount-proc"] if pid1 else []
    return subprocess.Popen(
        [*command, "bash", "runpod.sh", *args],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL runpod.sh and every process below it (a failed test's leftovers)."""
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


@pytest.mark.e2e
def test_runpod_sh_survives_a_remote_outage_and_the_stop_of_its_pod(tmp_path):
    s3 = S3Server(free_port())  # not started: the remote is down when the loop starts
    pod1 = pod_checkout(tmp_path / "pod1", **POD_RUN)
    log1 = tmp_path / "work1" / "logs" / "runpod.log"
    pipeline1 = tmp_path / "work1" / "logs" / "pipeline.log"
    proc = runpod(pod1, tmp_path / "work1", s3, "--once", pid1=True)
    try:
        wait_for(lambda: log1.is_file() and "retrying in" in log1.read_text(), proc, 120, "a retry")
        assert "problem: DVC remote 'medasr-s3' unreachable" in log1.read_text()
        s3.start()
        # fetch, subset and manifest finish and are pushed; training starts; then RunPod stops the pod: SIGTERM to
        # the container's PID 1, runpod.sh
        started = "first training step of this process"
        wait_for(lambda: pipeline1.is_file() and started in pipeline1.read_text(), proc, 600, "training")
        assert s3.complete_steps() == []  # no periodic checkpoint
        psutil.Process(proc.pid).children()[0].send_signal(signal.SIGTERM)
        first_out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 143, first_out[-4000:]
        steps = s3.complete_steps()
        assert len(steps) == 1 and 0 < steps[0] < POD_RUN["train.max_steps"], steps  # the stop's checkpoint
        # the signal went to the trainer itself (its pid from the stage pidfile), which stopped on its own terms
        # before runpod.sh, PID 1, exited: had it exited first, the kernel would have killed the trainer
        assert re.search(r"SIGTERM: SIGTERM to the stage process \(\d+\)", first_out), first_out[-4000:]
        assert f"stopped at step {steps[0]} on signal 15" in pipeline1.read_text()
        assert first_out.index("the pipeline exited (code") < first_out.index("stopped by SIGTERM")
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
            and train["resumed_from_step"] == steps[0]
            and train["global_step"] == POD_RUN["train.max_steps"]
        )
        assert "Running stage 'eval'" in pipeline and (pod2 / "metrics" / "eval.json").is_file()
        assert any((tmp_path / "work2" / "cache" / "dvc").rglob("*"))  # DVC's cache on the volume

        status = json.loads(
            s3.client().get_object(Bucket=BUCKET, Key="pipeline/medasr-status/default/status.json")["Body"].read()
        )
        assert status["state"] == "done" and status["run"] == "default"
        written = [p for w in ("work1", "work2") for p in (tmp_path / w / "logs").iterdir()]
        for text in [first_out, out, *(p.read_text(errors="replace") for p in written)]:
            assert SECRET not in text
        outputs = files_under(*(pod / d for pod in (pod1, pod2) for d in ("data", "metrics", "models")))
        assert any(p.suffix == ".parquet" for p in outputs) and any(p.suffix == ".safetensors" for p in outputs)
        for path in outputs:
            assert SECRET.encode() not in path.read_bytes(), path
        objects = s3.keys()
        assert any(k.endswith(".ckpt") for k in objects), objects
        for key in objects:
            assert SECRET.encode() not in s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read(), key
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        s3.stop()


@pytest.mark.e2e  # the preflight runs `medasr doctor`, which imports torch
def test_check_reports_each_problem_in_one_line(tmp_path):
    s3 = S3Server(free_port())
    good = s3.start(auth=True)
    fake = FakeRunPod(KEY)
    try:
        repo = pod_checkout(tmp_path / "pod")
        ok = runpod(repo, tmp_path / "work", s3, "--check", **good)
        out = ok.communicate(timeout=300)[0]
        assert ok.returncode == 0 and "preflight ok" in out, out[-3000:]

        # another live pod holds the remote's lease; this pod has been up an hour of a half-hour deadline; the disk
        # is below its floor
        other = run_env() | CREDENTIALS | good | {"RUNPOD_POD_ID": "other-pod", "MEDASR_LEASE_PID": str(os.getpid())}
        other["MEDASR_LEASE_SETTLE_S"] = "2"
        take = subprocess.run(["medasr", "loop", "lease", "take"], cwd=repo, env=other, capture_output=True, text=True)
        assert take.returncode == 0, take.stderr
        spec = PodSpec(name="medasr", repo_url="https://example.invalid/medasr.git", git_ref="abc", run_id="default")
        pod = RunPodAPI(KEY, base_url=fake.url).create(create_payload(spec, "NVIDIA H100 PCIe", {}))["id"]
        fake.pods[pod]["startedAt"] = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        pod_env = {"RUNPOD_POD_ID": pod, "RUNPOD_API_KEY": KEY, "MEDASR_RUNPOD_API_URL": fake.url}
        limits = {"MEDASR_DEADLINE_H": "0.5", "MEDASR_MIN_FREE_GB": "1000000"}
        stuck = runpod(repo, tmp_path / "work", s3, "--check", **good, **pod_env, **limits)
        out = stuck.communicate(timeout=300)[0]
        assert stuck.returncode == 1, out[-3000:]
        problems = [line.split("problem: ", 1)[1] for line in out.splitlines() if "problem:" in line]
        assert len(problems) == 3, out[-3000:]
        assert problems[0].startswith("disk low: ") and "need 1e+06" in problems[0]
        assert problems[1].startswith("lease held by pod other-pod (host ")
        assert problems[2].startswith("deadline reached: the pod has been up 1.0")
        assert "Traceback" not in out and KEY not in out

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
        fake.close()
