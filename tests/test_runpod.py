"""runpod.sh's loop, driven with a substitute child command (MEDASR_CHILD): backoff, giving up after fast failures,
signal forwarding to the child's whole process tree, the watchdog, and stale DVC lock clearing."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

from helpers import REPO, run_env


def runpod(tmp: Path, child: str, *args: str, **env: str) -> subprocess.Popen:
    """runpod.sh from a copy of the repo's script, in a folder that looks like a checkout (a .dvc dir)."""
    repo = tmp / "repo"
    (repo / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    (repo / "runpod.sh").write_text((REPO / "runpod.sh").read_text())
    settings = {
        "MEDASR_WORKDIR": str(tmp / "work"),
        "MEDASR_CHILD": child,
        "MEDASR_BACKOFF_BASE_S": "0",
        "MEDASR_BACKOFF_MAX_S": "0",
        "MEDASR_MAX_FAST_FAILURES": "3",
        **env,
    }
    return subprocess.Popen(
        ["bash", str(repo / "runpod.sh"), *args],
        cwd=repo,
        env=run_env() | settings,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    return proc.communicate(timeout=timeout)[0]


def test_success_exits_zero_with_once_and_leaves_a_heartbeat(tmp_path):
    proc = runpod(tmp_path, "echo pipeline ran", "--once")
    out = finish(proc)
    assert proc.returncode == 0, out
    assert "pipeline finished" in out
    beat = json.loads((tmp_path / "work" / "logs" / "heartbeat").read_text())
    assert beat["state"] == "done" and abs(beat["time"] - time.time()) < 60
    assert "pipeline ran" in (tmp_path / "work" / "logs" / "pipeline.log").read_text()


def test_failures_back_off_with_jitter_then_stop_after_n_fast_failures(tmp_path):
    proc = runpod(tmp_path, "echo boom; exit 3", "--once", MEDASR_BACKOFF_BASE_S="1", MEDASR_BACKOFF_MAX_S="3")
    out = finish(proc)
    assert proc.returncode == 1
    assert out.count("pipeline failed (exit 3) (attempt") == 3
    delays = [int(d) for d in re.findall(r"retrying in (\d+)s", out)]
    caps = [min(1 << k, 3) for k in (1, 2)]  # base * 2^failures, capped at MEDASR_BACKOFF_MAX_S
    assert len(delays) == 2 and all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert "giving up: 3 fast failures in a row" in out and "    boom" in out


def test_a_slow_failure_resets_the_fast_failure_count(tmp_path):
    marker = tmp_path / "count"
    # fails three times; the first failure is "slow" (FAST_FAILURE_S=0 makes every failure slow), so no give-up
    child = f"n=$(cat {marker} 2>/dev/null || echo 0); echo $((n+1)) > {marker}; [ $n -ge 3 ]"
    proc = runpod(tmp_path, child, "--once", MEDASR_FAST_FAILURE_S="0")
    out = finish(proc)
    assert proc.returncode == 0, out
    assert out.count("pipeline failed (exit 1) (attempt") == 3 and "giving up" not in out


def test_term_is_forwarded_to_the_childs_whole_process_tree(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    # the child starts a grandchild in another session (as dvc does with stage commands); both must get TERM
    grandchild = f"trap 'echo term > {marks}/grandchild; exit 0' TERM; sleep 300 & wait"
    child = (
        f"trap 'echo term > {marks}/child; exit 0' TERM; setsid bash -c \"{grandchild}\" & "
        f"echo started > {marks}/ready; sleep 300 & wait"
    )
    proc = runpod(tmp_path, child, "--once")
    deadline = time.time() + 30
    while not (marks / "ready").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 143, out
    assert (marks / "child").read_text().strip() == "term"
    assert (marks / "grandchild").read_text().strip() == "term"
    assert "forwarding SIGTERM" in out


def test_watchdog_kills_a_hung_child(tmp_path):
    proc = runpod(tmp_path, "echo started; sleep 300", "--once", MEDASR_HUNG_AFTER_S="2", MEDASR_MAX_FAST_FAILURES="1")
    started = time.time()
    out = finish(proc, timeout=60)
    assert proc.returncode == 1
    assert "watchdog: no output for 2s" in out and time.time() - started < 30


def test_a_stale_dvc_lock_is_cleared_when_no_dvc_process_is_alive(tmp_path):
    lock = tmp_path / "repo" / ".dvc" / "tmp" / "rwlock"
    lock.parent.mkdir(parents=True)
    lock.write_text('{"write": {"x": {"pid": 999999, "cmd": "dvc repro"}}}')
    proc = runpod(tmp_path, "test ! -e .dvc/tmp/rwlock", "--once")
    out = finish(proc)
    assert proc.returncode == 0, out
    assert "removing a stale DVC lock" in out and not lock.exists()


def test_a_lock_held_by_a_live_dvc_process_is_left_alone(tmp_path):
    lock = tmp_path / "repo" / ".dvc" / "tmp" / "rwlock"
    lock.parent.mkdir(parents=True)
    lock.write_text("{}")
    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text("#!/bin/sh\nsleep 60\n")
    fake_dvc.chmod(0o755)
    holder = subprocess.Popen([str(fake_dvc), "repro"])  # a live process whose command line is `dvc repro`
    try:
        proc = runpod(tmp_path, "test -e .dvc/tmp/rwlock", "--once")
        out = finish(proc)
        assert proc.returncode == 0, out
        assert lock.exists() and "removing a stale DVC lock" not in out
    finally:
        holder.kill()
        holder.wait()
