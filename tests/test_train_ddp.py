"""train under Lightning's DDP: 2 gloo ranks on the CPU, run the way it runs. `medasr train` is started as DVC
starts it (a process group of its own); Lightning's launcher starts rank 1 by re-running that command.

One uninterrupted 2-rank run goes side by side with one that is killed (whole group, SIGKILL), rerun, stopped
(SIGTERM to the group: both ranks must agree on the step to checkpoint at) and rerun again; once per module, the
tests read what they left. NCCL and several nodes are not covered (no GPUs here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from helpers import assert_same_training_state, run_env, tiny_params

from medasr.paths import CHECKPOINT_STATE

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="2 CPU ranks need 2 usable cores")

STEPS = 8
# LoRA dropout and shuffling on: a resume that restored one rank's RNG or data position wrongly would diverge.
# Validation (rank 0 only, the other rank at a barrier) at steps 4 and 8, decoding a few tokens of 2 clips.
PARAMS = {
    "train.devices": 2,
    "train.max_steps": STEPS,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 2,
    "train.val_every": 4,
    "train.val_max_utts": 2,
    "eval.max_new_tokens": 4,
    "lora.dropout": 0.1,
}


def _start(ws: Path, log: Path) -> subprocess.Popen:
    """`medasr train` in `ws`, in a new process group (as DVC runs a stage); every rank's output goes to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "stages.cli", "train"],
        cwd=ws,
        env=run_env() | {"WANDB_MODE": "disabled"},
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    return left


def _workspace(root: Path, manifests: Path) -> Path:
    root.mkdir()
    shutil.copytree(manifests, root / "data" / "manifests")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(**PARAMS).model_dump()))
    return root


def _steps(ws: Path) -> list[int]:
    return sorted(int(m.parent.name.split("-")[1]) for m in ws.glob("checkpoints/train/*/step-*/meta.json"))


def _signal_after_checkpoint(
    ws: Path, proc: subprocess.Popen, sig: int, newer_than: int = 0, group: bool = True
) -> tuple[int, list[psutil.Process]]:
    """Send `sig` to `proc`'s whole group (or to `proc` alone) once a checkpoint newer than step `newer_than` is
    complete; returns the newest complete checkpoint's step at that moment and the processes the run had then."""
    deadline = time.time() + 300
    while not (steps := [s for s in _steps(ws) if s > newer_than]):
        assert proc.poll() is None, (ws / "train.log").read_text()[-4000:]
        assert time.time() < deadline, "no new checkpoint within 300 s"
        time.sleep(0.02)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    # rank 1: started by rank 0 with LOCAL_RANK=1 (the others are data workers, forked without a new environment)
    assert [p for p in tree if p.parent().pid == proc.pid and p.environ().get("LOCAL_RANK") == "1"], tree
    assert {os.getpgid(p.pid) for p in tree} == {proc.pid}, "a rank or worker left the stage's process group"
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    return steps[-1], tree


@dataclass(frozen=True)
class Runs:
    straight: Path
    killed: Path
    killed_at: int  # the newest checkpoint's step when the group was killed
    killed_left: list[psutil.Process]  # processes of the killed group still alive after SIGKILL
    stopped_rc: int  # the rerun's exit status after SIGTERM to rank 0
    stopped_after: int  # the newest checkpoint's step when SIGTERM was sent
    stopped_steps: list[int]  # its checkpoints once it exited
    stopped_left: list[psutil.Process]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_manifests) -> Runs:
    root = tmp_path_factory.mktemp("ddp")
    straight, killed = _workspace(root / "straight", demo_manifests), _workspace(root / "killed", demo_manifests)
    procs = [_start(straight, straight / "train.log"), _start(killed, killed / "train.log")]
    try:
        # what a dying pod or `kill -9 -<pgid>` does: every rank (and data worker) at once
        killed_at, tree = _signal_after_checkpoint(killed, procs[1], signal.SIGKILL)
        procs[1].wait()
        time.sleep(0.5)
        killed_left = _alive(tree)
        procs[1] = _start(killed, killed / "train.log")
        # what runpod.sh does to stop a stage on a pod: SIGTERM to the stage process (rank 0) alone, which must stop
        # the other ranks (a signal to the whole group, as a terminal's Ctrl-C sends, reaches each rank itself)
        stopped_after, tree = _signal_after_checkpoint(
            killed, procs[1], signal.SIGTERM, newer_than=killed_at, group=False
        )
        stopped_rc = procs[1].wait(timeout=120)
        stopped_steps = _steps(killed)
        time.sleep(0.5)
        stopped_left = _alive(tree)
        procs[1] = _start(killed, killed / "train.log")
        for proc, ws in zip(procs, (straight, killed), strict=True):
            assert proc.wait(timeout=600) == 0, (ws / "train.log").read_text()[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return Runs(straight, killed, killed_at, killed_left, stopped_rc, stopped_after, stopped_steps, stopped_left)


def _run_dir(ws: Path) -> Path:
    # one fingerprint: the ranks agreed on one run (beside it only the files of the last validation)
    (run_dir,) = (d for d in (ws / "checkpoints" / "train").iterdir() if d.is_dir())
    return run_dir


@pytest.mark.e2e
def test_two_ranks_draw_their_own_batches_and_rank_0_alone_writes(runs):
    ws = runs.straight
    log = (ws / "train.log").read_text()
    flat = re.sub(r" *\n {11,}", " ", log)  # rich wraps a long record onto indented lines
    first = dict(re.findall(r"rank (\d) of 2: first training step .*?its batch: ([^\n]*)", flat))
    assert first.keys() == {"0", "1"}, log[-4000:]
    share = {rank: set(ids.split()) for rank, ids in first.items()}
    assert share["0"] and share["1"] and not share["0"] & share["1"], share

    metrics = json.loads((ws / "metrics" / "train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["precision"] == "32" and metrics["global_step"] == STEPS
    assert metrics["best_val_wer"] is not None  # rank 0 validated (the other rank waited at the barrier)
    meta = json.loads((ws / "models" / "canary-qwen-medical-lora" / "medasr.json").read_text())
    assert (meta["world_size"], meta["precision"]) == (2, "32")
    # one set of checkpoints, each complete, nothing half-written or from another rank beside them
    run_dir = _run_dir(ws)
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-00000006", "step-00000008"]
    for step in run_dir.glob("step-*"):
        assert (step / "meta.json").is_file() and (step / CHECKPOINT_STATE).is_file()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") or "rank" in p.name]
    assert "Traceback" not in log


def _final(ws: Path) -> dict:
    return torch.load(_run_dir(ws) / f"step-{STEPS:08d}" / CHECKPOINT_STATE, weights_only=False, map_location="cpu")


@pytest.mark.e2e
def test_group_sigkill_and_sigterm_to_rank_0_then_reruns_resume_and_match_the_uninterrupted_run(runs):
    assert not runs.killed_left, f"outlived SIGKILL of their group: {runs.killed_left}"
    # SIGTERM: every rank checkpointed at the one step they agreed on, then all exited 128 + SIGTERM
    assert runs.stopped_rc == 128 + signal.SIGTERM, (runs.killed / "train.log").read_text()[-4000:]
    assert not runs.stopped_left, f"outlived SIGTERM to rank 0: {runs.stopped_left}"
    assert runs.stopped_steps[-1] > runs.stopped_after > runs.killed_at > 0, runs
    metrics = json.loads((runs.killed / "metrics" / "train.json").read_text())
    assert metrics["resume_source"] == "local" and metrics["resumed_from_step"] == runs.stopped_steps[-1], metrics
    assert metrics["global_step"] == STEPS

    a, b = _final(runs.straight), _final(runs.killed)
    assert_same_training_state(a, b)
    # each rank's RNG state travels in the checkpoint, and both ranks ended in the same state as uninterrupted
    rng_a, rng_b = a["medasr"]["rng"], b["medasr"]["rng"]
    assert len(rng_a) == len(rng_b) == 2
    for ra, rb in zip(rng_a, rng_b, strict=True):
        assert torch.equal(ra["torch"], rb["torch"])


def test_a_device_count_this_machine_lacks_is_one_line_and_touches_nothing(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump(tiny_params(**{"train.devices": 4096}).model_dump()))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.cli", "train"], cwd=ws, env=run_env(), capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "train.devices=4096" in proc.stderr
    assert sorted(p.name for p in ws.iterdir()) == ["logs", "params.yaml"]  # the refusal is in its own log only


class _WorkerSignals:
    """A dataset whose items say how a worker treats SIGTERM: ignored, and whether it was blocked from its fork."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[int, bool, bool]:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return i, signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, signal.SIGTERM in mask


@pytest.mark.e2e
def test_data_workers_survive_a_stop_signal_sent_to_the_group_even_as_they_start():
    """A group SIGTERM reaches the data workers too: they ignore it, and one that arrives between a worker's fork
    and its own setup (torch's handler there dies of a SIGTERM not sent by its parent) stays blocked until ignored."""
    from torch.utils.data import DataLoader

    from stages.train.data import shielded

    loader = shielded(DataLoader(_WorkerSignals(), batch_size=None, num_workers=2))
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        batches = iter(loader)
        for worker in batches._workers:  # what a signal to the stage's process group does to each worker
            os.kill(worker.pid, signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # and to the training process, whose handler still gets it
        items = sorted((int(i), bool(ignored), bool(blocked)) for i, ignored, blocked in batches)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert items == [(i, True, True) for i in range(4)]
    assert received == [signal.SIGTERM]
