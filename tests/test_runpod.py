"""runpod.sh's loop with a substitute pipeline (MEDASR_CHILD) and no install or preflight (MEDASR_TEST_SKIP_SETUP),
in a checkout whose DVC remote is a local folder: every per-attempt step (lease, sweep, disk, budget, progress,
heartbeat, stopping the pod) is the real `medasr loop` command. The stop-signal tests run it as on a pod, as PID 1 of
its own PID namespace (`unshare --fork --pid --mount-proc`): whatever it leaves behind dies when it exits."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from helpers import REPO, git, run_env, wait_for

# A stage as the loop sees one: it writes its pid to $MEDASR_STAGE_PIDFILE (as the medasr stage commands do), has a
# worker process of its own (a data worker: the stage stops it, nobody else may), and on SIGTERM takes `linger`
# seconds to stop (saving and mirroring its checkpoint) before it exits 1; a negative `linger` ignores SIGTERM.
STAGE = r"""
import os, signal, subprocess, sys, time
marks, role = sys.argv[1], sys.argv[2]

def mark(name):
    with open(os.path.join(marks, name), "a") as f:
        f.write(f"{time.time()}\n")

if role == "worker":
    parent = os.getppid()
    signal.signal(signal.SIGTERM, lambda *_: mark("worker-term"))
    while os.getppid() == parent:
        time.sleep(0.02)
    mark("worker-outlived-stage")
    sys.exit(0)
linger = float(sys.argv[3])
with open(os.environ["MEDASR_STAGE_PIDFILE"], "w") as f:
    f.write(f"{os.getpid()}\n")
worker = subprocess.Popen([sys.executable, __file__, marks, "worker"])
stop = []
signal.signal(signal.SIGTERM, signal.SIG_IGN if linger < 0 else lambda *_: stop.append(1))
mark("stage-ready")
while not stop:
    time.sleep(0.02)
mark("stage-term")
time.sleep(linger)
mark("stage-exit")
sys.exit(1)
"""


def checkout(tmp: Path) -> Path:
    """A git checkout with runpod.sh, a params.yaml naming train.stop_grace_s, and a local-folder DVC remote."""
    repo = tmp / "repo"
    (repo / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        (repo / ".dvc" / "config").write_text(
            f"[core]\n    remote = local\n['remote \"local\"']\n    url = {tmp / 'remote'}\n"
        )
        (repo / "params.yaml").write_text("train:\n  stop_grace_s: 1\n")
        (repo / "runpod.sh").write_text((REPO / "runpod.sh").read_text())
        git(repo, "init", "-q", "-b", "main")
        git(repo, "add", "-A")
        git(repo, "-c", "user.name=t", "-c", "user.email=t@medasr.invalid", "commit", "-qm", "checkout")
    return repo


def runpod(tmp: Path, child: str, *args: str, pid1: bool = False, before: str = "", **env: str) -> subprocess.Popen:
    """runpod.sh in `checkout(tmp)`; with pid1, as PID 1 of a new PID namespace, as the pod's start command runs it
    (`exec bash runpod.sh`, after the shell command `before`)."""
    repo = checkout(tmp)
    settings = {
        "MEDASR_WORKDIR": str(tmp / "work"),
        "MEDASR_CHILD": child,
        "MEDASR_TEST_SKIP_SETUP": "1",
        "MEDASR_BACKOFF_BASE_S": "0",
        "MEDASR_BACKOFF_MAX_S": "0",
        "MEDASR_MAX_FAST_FAILURES": "3",
        "MEDASR_LEASE_SETTLE_S": "1",
        **env,
    }
    command = ["bash", "runpod.sh", *args]
    if pid1:
        command = [
            "unshare",
            "--fork",
            "--pid",
            "--mount-proc",
            "bash",
            "-c",
            f"{before}\nexec bash runpod.sh {' '.join(args)}",
        ]
    return subprocess.Popen(
        command,
        cwd=repo,
        env=run_env() | settings,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    return proc.communicate(timeout=timeout)[0]


def pid1(proc: subprocess.Popen) -> psutil.Process:
    """runpod.sh as PID 1: the process unshare forked, as the host (docker, RunPod) sees it."""
    deadline = time.time() + 30
    while not (children := psutil.Process(proc.pid).children()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    return children[0]


def remote_status(tmp: Path, run: str = "default") -> dict:
    return json.loads((tmp / "remote" / "medasr-status" / run / "status.json").read_text())


def stage_child(marks: Path, linger: float) -> str:
    """The stage under a parent standing where dvc does (it must not get the signal, and sees the stage's exit)."""
    script = marks.parent / "stage.py"
    script.write_text(STAGE)
    return (
        f"trap 'echo term >> {marks}/middle-term' TERM; {sys.executable} {script} {marks} stage {linger}; "
        f"echo $? > {marks}/middle-rc"
    )


def mark_time(marks: Path, name: str) -> float:
    return float((marks / name).read_text().split()[0])


def test_success_with_a_dotenv_taken_literally_publishes_done_releases_the_lease_and_pushes_dvc_lock(tmp_path):
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", str(origin))
    repo = checkout(tmp_path)
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "checkout", "-q", "--detach")  # as the pod's start script leaves it
    (repo / ".env").write_text(
        "MEDASR_GIT_PUSH=1\n"
        "MEDASR_GIT_TOKEN=tok-0123\n"
        "DOTENV_DOLLAR=pa$$w0rd$(touch pwned)${HOME}`touch pwned2`\n"
        "DOTENV_QUOTED='single $HOME # no comment'\n"
        'export DOTENV_DOUBLE="double $HOME"\n'
        "DOTENV_COMMENTED=value # a comment\n"
        "DOTENV_ENV_WINS=from-dotenv\n"
    )
    names = ("DOTENV_DOLLAR", "DOTENV_QUOTED", "DOTENV_DOUBLE", "DOTENV_COMMENTED", "DOTENV_ENV_WINS")
    quoted = " ".join('"$' + n + '"' for n in names)
    child = f"printf '%s\\n' {quoted} > dotenv.out; echo 'schema: 2.0' > dvc.lock"
    proc = runpod(tmp_path, child, "--once", DOTENV_ENV_WINS="from-env")
    out = finish(proc)
    assert proc.returncode == 0, out
    assert "pipeline finished" in out and "lease taken by" in out
    assert (repo / "dotenv.out").read_text().splitlines() == [
        "pa$$w0rd$(touch pwned)${HOME}`touch pwned2`",
        "single $HOME # no comment",
        "double $HOME",
        "value",
        "from-env",
    ]
    assert not (repo / "pwned").exists() and not (repo / "pwned2").exists()
    beat = json.loads((tmp_path / "work" / "logs" / "heartbeat").read_text())
    assert beat["state"] == "done" and abs(beat["time"] - time.time()) < 60
    assert remote_status(tmp_path)["state"] == "done"
    assert not (tmp_path / "remote" / "medasr-status" / "lease.json").exists()  # released
    # dvc.lock committed on the detached HEAD and pushed to the run's branch; the token never in git's config
    assert "pushed dvc.lock to branch medasr-runs/default" in out
    assert git(origin, "show", "medasr-runs/default:dvc.lock") == "schema: 2.0\n"
    assert git(repo, "rev-parse", "HEAD") == git(origin, "rev-parse", "medasr-runs/default")
    assert "tok-0123" not in (repo / ".git" / "config").read_text()
    assert "tok-0123" not in out and "tok-0123" not in (tmp_path / "work" / "logs" / "runpod.log").read_text()


def test_failures_back_off_with_jitter_then_stop_after_n_fast_failures(tmp_path):
    proc = runpod(
        tmp_path,
        "echo boom; exit 3",
        "--once",
        MEDASR_BACKOFF_BASE_S="1",
        MEDASR_BACKOFF_MAX_S="3",
        MEDASR_MAX_FAST_FAILURES="2",
        MEDASR_MAX_STALLED_ATTEMPTS="10",
    )
    out = finish(proc)
    assert proc.returncode == 1
    assert out.count("pipeline failed (exit 3) (attempt") == 2
    delays = [int(d) for d in re.findall(r"retrying in (\d+)s", out)]
    assert len(delays) == 1 and 0 <= delays[0] <= 2  # base * 2^failures, capped at MEDASR_BACKOFF_MAX_S
    assert "giving up: 2 fast failures in a row" in out and "    boom" in out
    assert remote_status(tmp_path)["state"] == "gave up"


def test_a_run_that_fails_at_the_same_step_gives_up_after_k_attempts_and_stops_its_pod(tmp_path):
    """Slow failures too (MEDASR_FAST_FAILURE_S=0): only progress resets the count. The stop is retried (a fake
    runpodctl on PATH fails once), and the loop then waits, as PID 1, for the stop to end it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "runpodctl-calls"
    (bin_dir / "runpodctl").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$(wc -l < {calls})" -gt 1 ]\n')
    (bin_dir / "runpodctl").chmod(0o755)
    step = "checkpoints/train/fp/step-00000004"
    # attempt 1 checkpoints step 4 (progress), then fails; every later attempt resumes from it and fails again
    child = (
        f"[ -e {step}/meta.json ] || {{ mkdir -p {step}; echo '{{}}' > {step}/meta.json; }}; echo 'fails at 6'; exit 1"
    )
    proc = runpod(
        tmp_path,
        child,
        pid1=True,
        PATH=f"{bin_dir}{os.pathsep}{run_env()['PATH']}",
        RUNPOD_POD_ID="pod-under-test",
        MEDASR_FAST_FAILURE_S="0",
        MEDASR_MAX_FAST_FAILURES="99",
        MEDASR_MAX_STALLED_ATTEMPTS="2",
        MEDASR_STOP_BACKOFF_S="0",
    )
    log = tmp_path / "work" / "logs" / "runpod.log"
    wait_for(lambda: log.is_file() and "sleeping until the pod is stopped" in log.read_text(), proc, 120, "the stop")
    pid1(proc).send_signal(signal.SIGTERM)  # what RunPod does to the container once the pod stops
    out = finish(proc)
    assert proc.returncode == 143, out
    assert out.count("pipeline failed (exit 1) (attempt") == 3
    assert "progress since the last attempt: step=4" in out
    assert "giving up: 2 attempts in a row made no progress" in out
    assert calls.read_text().splitlines() == ["stop pod pod-under-test"] * 2  # failed once, retried
    assert "stopped pod pod-under-test (runpodctl)" in out
    assert remote_status(tmp_path)["state"] == "gave up" and remote_status(tmp_path)["step"] == 4


def test_sigterm_to_pid_1_reaches_the_stage_process_only_and_the_loop_waits_for_it(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = runpod(tmp_path, stage_child(marks, linger=3), "--once", pid1=True, MEDASR_STOP_MARGIN_S="30")
    wait_for(lambda: (marks / "stage-ready").exists(), proc, 120, "the stage")
    time.sleep(0.5)
    sent = time.time()
    pid1(proc).send_signal(signal.SIGTERM)
    out = finish(proc)
    exited = time.time()
    assert proc.returncode == 143, out
    assert "SIGTERM to the stage process" in out and "SIGKILL" not in out
    assert mark_time(marks, "stage-exit") - sent >= 3  # it took its time, and the loop waited for it
    assert exited > mark_time(marks, "stage-exit")
    assert not (marks / "worker-term").exists() and not (marks / "middle-term").exists()
    assert mark_time(marks, "worker-outlived-stage") >= mark_time(marks, "stage-exit")
    assert (marks / "middle-rc").read_text().strip() == "1"  # dvc's stand-in saw its stage fail, and went on
    assert out.index("the pipeline exited (code") < out.index("stopped by SIGTERM")
    assert remote_status(tmp_path)["state"] == "stopped"


def test_a_stage_that_ignores_sigterm_is_killed_at_the_bound(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    # the bound: train.stop_grace_s (1 s in this checkout's params.yaml) + MEDASR_STOP_MARGIN_S
    proc = runpod(tmp_path, stage_child(marks, linger=-1), "--once", pid1=True, MEDASR_STOP_MARGIN_S="2")
    wait_for(lambda: (marks / "stage-ready").exists(), proc, 120, "the stage")
    sent = time.time()
    pid1(proc).send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 143, out
    assert 3 <= time.time() - sent < 30
    assert "waiting up to 3s" in out and "did not exit within 3s: SIGKILL" in out
    assert not (marks / "stage-exit").exists()  # killed: the stage process, and the rest of the tree with it
    assert not (marks / "middle-rc").exists() or (marks / "middle-rc").read_text().strip() == "137"
    assert remote_status(tmp_path)["state"] == "stopped"


def test_the_watchdog_stops_a_hung_pipeline(tmp_path):
    proc = runpod(tmp_path, "echo started; sleep 300", "--once", MEDASR_HUNG_AFTER_S="2", MEDASR_MAX_FAST_FAILURES="1")
    started = time.time()
    out = finish(proc, timeout=60)
    assert proc.returncode == 1
    assert "watchdog: no output for 2s: SIGTERM to the pipeline's process tree" in out and time.time() - started < 30


def test_a_lease_another_live_pod_holds_keeps_this_one_off(tmp_path):
    repo = checkout(tmp_path)
    other = {"RUNPOD_POD_ID": "other-pod", "MEDASR_LEASE_PID": str(os.getpid()), "MEDASR_LEASE_SETTLE_S": "1"}
    taken = subprocess.run(
        ["medasr", "loop", "lease", "take"], cwd=repo, env=run_env() | other, capture_output=True, text=True
    )
    assert taken.returncode == 0, taken.stderr
    proc = runpod(tmp_path, "touch ran", "--once")
    out = finish(proc)
    assert proc.returncode == 1, out
    assert "lease held by pod other-pod" in out and "this pod stops" in out
    assert not (repo / "ran").exists()
    assert not (tmp_path / "remote" / "medasr-status" / "default").exists()  # nothing published over the other's


def test_a_lease_lost_while_running_stops_the_stage_and_publishes_nothing_more(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = runpod(tmp_path, stage_child(marks, linger=0), "--once", MEDASR_STATUS_EVERY_S="1")
    wait_for(lambda: (marks / "stage-ready").exists(), proc, 120, "the stage")
    status = tmp_path / "remote" / "medasr-status" / "default" / "status.json"
    wait_for(status.exists, proc, 60, "a published heartbeat")
    # another pod takes the lease (as after this one's expired): the object holds its name now
    lease = tmp_path / "remote" / "medasr-status" / "lease.json"
    (tmp_path / "other.json").write_text(json.dumps(json.loads(lease.read_text()) | {"pod": "other-pod", "host": "h2"}))
    os.replace(tmp_path / "other.json", lease)
    out = finish(proc)
    assert proc.returncode == 1, out
    assert "lease lost: held by pod other-pod" in out and (marks / "stage-term").exists()
    assert remote_status(tmp_path)["state"] == "running"  # the other pod's to publish from now on
    assert json.loads(lease.read_text())["pod"] == "other-pod"


def test_a_stale_dvc_lock_is_cleared_only_when_no_dvc_process_is_alive(tmp_path):
    """As PID 1: only the container's own processes count (pgrep sees nothing outside the namespace)."""
    lock = checkout(tmp_path) / ".dvc" / "tmp" / "rwlock"
    lock.write_text('{"write": {"x": {"pid": 999999, "cmd": "dvc repro"}}}')
    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text("#!/bin/sh\nsleep 60\n")
    fake_dvc.chmod(0o755)
    # attempt 1 finds the lock while a process whose command line is `dvc repro` lives, then that process ends;
    # attempt 2 must find the lock gone
    child = "if [ ! -e attempt-1 ]; then touch attempt-1; test -e .dvc/tmp/rwlock && kill $(cat holder); exit 1; fi"
    child += "; test ! -e .dvc/tmp/rwlock"
    proc = runpod(tmp_path, child, "--once", pid1=True, before=f"{fake_dvc} repro & echo $! > holder")
    out = finish(proc)
    assert proc.returncode == 0, out
    assert out.count("removing a stale DVC lock") == 1 and out.index("attempt 2") < out.index("removing a stale")
    assert not lock.exists()


def test_stage_commands_hold_the_stage_pidfile_and_ranks_above_0_leave_it_alone(tmp_path):
    pidfile = tmp_path / "stage.pid"
    env = run_env() | {"MEDASR_STAGE_PIDFILE": str(pidfile)}
    show = "import os; from stages.cli import _hold_stage_pidfile as h; h(); "
    show += "print(os.getpid(), open(os.environ['MEDASR_STAGE_PIDFILE']).read())"
    held = subprocess.run([sys.executable, "-c", show], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    pid, written = held.stdout.split()
    assert written == pid and not pidfile.exists()  # written while it ran, removed at its exit
    cases = [(["subset", "-p", "missing.yaml"], {}, False), (["doctor", "--disk", "."], {}, True)]
    cases += [(["subset", "-p", "missing.yaml"], {"LOCAL_RANK": "1"}, True)]
    cases += [(["train", "-p", "missing.yaml"], {"MEDASR_TRAIN_RANK0": "{}"}, True)]
    for args, rank, left_alone in cases:
        pidfile.write_text("999999\n")  # another process's: a stage replaces it, anything else leaves it
        subprocess.run(["medasr", *args], cwd=tmp_path, env=env | rank, capture_output=True)
        assert pidfile.exists() == left_alone and (not left_alone or pidfile.read_text() == "999999\n"), (args, rank)


def test_a_setting_that_is_no_whole_number_gives_up_in_one_line_instead_of_crashing_pid_1(tmp_path):
    # bash arithmetic on "0.5" would end the script: as PID 1, into RunPod's container-restart loop
    proc = runpod(tmp_path, "echo never", "--once", MEDASR_BACKOFF_BASE_S="0.5")
    out = finish(proc)
    assert proc.returncode == 1, out
    assert "giving up: MEDASR_BACKOFF_BASE_S must be a whole number, got '0.5'" in out
    assert not (tmp_path / "work" / "logs" / "pipeline.log").exists()  # checked before any attempt


def test_sigterm_during_a_long_backoff_stops_at_once(tmp_path):
    proc = runpod(
        tmp_path,
        "exit 3",
        pid1=True,
        MEDASR_BACKOFF_BASE_S="300",
        MEDASR_BACKOFF_MAX_S="300",
        MEDASR_MAX_FAST_FAILURES="5",
        MEDASR_MAX_STALLED_ATTEMPTS="5",
    )
    log = tmp_path / "work" / "logs" / "runpod.log"
    deadline = time.time() + 60
    while not (log.is_file() and "retrying in" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, log.read_text() if log.is_file() else ""
        time.sleep(0.1)
    pid1(proc).send_signal(signal.SIGTERM)
    started = time.time()
    out = finish(proc, timeout=60)
    assert proc.returncode == 143, out
    assert time.time() - started < 20, out  # not the backoff's up to 300 s
    assert remote_status(tmp_path)["state"] == "stopped"
