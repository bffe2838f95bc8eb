"""`medasr loop ...`, the commands runpod.sh runs on the pod, driven as runpod.sh drives them (subprocesses, one
line and an exit code each) against a real S3 server (moto, a nested-prefix remote) and the fake RunPod API: the
lease (taken, renewed, refused, reclaimed, raced, unreadable), the heartbeat's step, stopping the pod when
runpodctl and the API fail, the pod's own deadline and budget, the progress token and the temp sweep."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fake_runpod import FakeRunPod
from helpers import CREDENTIALS, DEVELOPER_SETTINGS, VENV_BIN, free_port, run_env

from medasr import MedasrError
from medasr.files import sweep_temps
from medasr.ops.lease import Holder, LeaseHeld, lease_state, process_started, release_lease, take_lease
from medasr.ops.podside import check_budget, progress_token, stop_pod, validation_warning
from medasr.ops.runpod import DEFAULT_GPUS, PodSpec, RunPodAPI, create_payload

KEY = "rpa_loop_test_key_0123456789"
PREFIX = "team/medasr"  # a nested prefix, as a real bucket shared by projects has
# The lease's settle time in these tests: over what reading and writing the lease takes here (a taker slower than it
# claims nothing: ~0.4 s on the tests' S3 server, ~0.7 s with a new process's first call), far under the default 20 s
SETTLE = 2.0


def dvc_workspace(root: Path, url: str, endpoint: str) -> Path:
    """A folder whose default DVC remote is `url` (no git: runpod.sh's commands only read the remote's config)."""
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text(
        f"[core]\n    no_scm = true\n    remote = s3\n    analytics = false\n"
        f"['remote \"s3\"']\n    url = {url}\n    endpointurl = {endpoint}\n"
    )
    return root


@pytest.fixture
def ws(tmp_path, s3) -> Path:
    return dvc_workspace(tmp_path / "ws", f"s3://{s3.bucket}/{PREFIX}", s3.endpoint)


def loop(ws: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = run_env() | CREDENTIALS | {"MEDASR_LEASE_SETTLE_S": "3"} | env  # a new process's first S3 call: ~0.7 s
    return subprocess.run(
        [str(VENV_BIN / "medasr"), "loop", *args], cwd=ws, env=full, capture_output=True, text=True, timeout=120
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def loops():
    """Stand-ins for runpod.sh processes: each is a live pid a lease can name (MEDASR_LEASE_PID)."""
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        started.append(subprocess.Popen(["sleep", "300"]))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def as_loop(proc: subprocess.Popen, pod: str) -> dict[str, str]:
    return {"MEDASR_LEASE_PID": str(proc.pid), "RUNPOD_POD_ID": pod}


def lease_on(s3) -> dict | None:
    client = s3.client()
    try:
        return json.loads(client.get_object(Bucket=s3.bucket, Key=f"{PREFIX}/medasr-status/lease.json")["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


# --- the lease -----------------------------------------------------------------------------------------------------
def test_lease_state_rules():
    me = Holder(pod="p1", host="h1", pid=10, pid_started=100.0, run="r")
    other = {"pod": "p2", "host": "h2", "pid": 20, "pid_started": 200.0, "ttl_s": 60}
    assert lease_state(None, 0, 1000, me) == "free"
    assert lease_state(other, 1000, 1030, me) == "held"
    assert lease_state(other, 1000, 1061, me) == "reclaimable"  # modification time + its ttl_s, reader's clock
    mine = {"pod": "p1", "host": "h1", "pid": 10, "pid_started": 100.0, "ttl_s": 60}
    assert lease_state(mine, 1000, 1030, me) == "mine"
    gone, alive = (lambda *a: False), (lambda *a: True)
    assert lease_state(mine | {"pid_started": 50.0}, 1000, 1030, me, alive=gone) == "reclaimable"  # pid reused
    assert lease_state(other | {"pod": "p1"}, 1000, 1030, me) == "reclaimable"  # a former container of this pod
    assert lease_state(mine | {"pid": 11}, 1000, 1030, me, alive=gone) == "reclaimable"  # its process is gone
    assert lease_state(mine | {"pid": 11}, 1000, 1030, me, alive=alive) == "held"  # a second loop in this container
    assert lease_state(other | {"host": "h1"}, 1000, 1030, me, alive=gone) == "held"  # another pod's, a name clash
    assert lease_state({}, 1000, 1030, me) == "held"  # unreadable content: holds until its time runs out
    assert lease_state({}, 1000, 1000 + 901, me) == "reclaimable"


@pytest.fixture
def in_process(monkeypatch):
    """This process talks to the test's S3 server as the CLI would: its credentials, none of the developer's."""
    for name in DEVELOPER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def holder(proc: subprocess.Popen, pod: str) -> Holder:
    return Holder(pod=pod, host=socket.gethostname(), pid=proc.pid, pid_started=process_started(proc.pid), run="r")


def test_lease_taken_renewed_refused_and_released(ws, s3, loops, in_process):
    a, b = loops(), loops()
    took = loop(ws, "lease", "take", **as_loop(a, "podA"))
    assert took.returncode == 0 and "lease taken" in took.stdout, took.stderr
    held = lease_on(s3)
    assert held["pod"] == "podA" and held["pid"] == a.pid and held["ttl_s"] == 900 and held["pid_started"]
    assert set(held) == {"pod", "host", "pid", "pid_started", "run", "ttl_s", "taken"}
    assert take_lease(ws, holder(a, "podA")) == "lease renewed"
    assert lease_on(s3)["taken"] == held["taken"]

    refused = loop(ws, "lease", "take", **as_loop(b, "podB"))
    assert refused.returncode == 2
    said = re.fullmatch(rf"lease held by pod podA \(host \S+, pid {a.pid}\), expires in (\d+) s", one_line(refused))
    assert said and 800 < int(said.group(1)) <= 900, one_line(refused)
    assert not release_lease(ws, pod_id="podB") and lease_on(s3)["pod"] == "podA"  # another's is left alone
    before = lease_on(s3)
    checked = loop(ws, "lease", "check", **as_loop(b, "podB"))  # runpod.sh --check: read only
    assert checked.returncode == 2 and one_line(checked).startswith("lease held by pod podA (host "), checked.stderr
    assert lease_on(s3) == before  # nothing written
    mine = loop(ws, "lease", "check", **as_loop(a, "podA"))
    assert mine.returncode == 0 and mine.stdout.strip() == "lease mine: held by this loop", mine.stderr

    heartbeat = ws / "heartbeat"
    heartbeat.write_text(json.dumps({"time": 1, "state": "running", "detail": "", "pod": "podB", "run": "rb"}))
    lost = loop(ws, "beat", "--heartbeat", str(heartbeat), "--lease", MEDASR_RUN_ID="rb", **as_loop(b, "podB"))
    assert lost.returncode == 2 and one_line(lost).startswith("lease lost: held by pod podA (host ")
    published = s3.keys()
    assert not [k for k in published if "/rb/" in k]  # the other pod owns the status: nothing published

    released = loop(ws, "lease", "release", **as_loop(a, "podA"))
    assert released.stdout.strip() == "lease released" and lease_on(s3) is None


def test_lease_reclaimed_when_its_holder_is_gone_restarted_or_expired(ws, s3, loops, in_process):
    a, b, c = loops(), loops(), loops()
    take_lease(ws, holder(a, ""), settle_s=SETTLE)  # a loop off RunPod (no pod id) on this machine
    a.kill()
    a.wait()
    gone = take_lease(ws, holder(b, ""), settle_s=SETTLE)  # its process gone: reclaimed at once
    assert "its process on this machine is gone" in gone

    assert release_lease(ws, pod_id="")  # as `pod watch` releases a pod's lease by its id
    old_container = holder(b, "podB")
    take_lease(ws, Holder(**vars(old_container) | {"host": "old-container"}), settle_s=SETTLE)
    restarted = take_lease(ws, holder(c, "podB"), settle_s=SETTLE)  # the pod's new container, on a new host name
    assert "a former container of this pod" in restarted and lease_on(s3)["pid"] == c.pid
    with pytest.raises(LeaseHeld):
        take_lease(ws, holder(b, "podB"), settle_s=SETTLE)  # a second loop in that container: c is alive

    with pytest.raises(LeaseHeld):
        take_lease(ws, holder(b, "podC"), settle_s=SETTLE)  # another pod: c's lease is fresh
    take_lease(ws, holder(c, "podB"), ttl_s=1, settle_s=SETTLE)
    time.sleep(2.5)
    assert "expired" in take_lease(ws, holder(b, "podC"), settle_s=SETTLE)
    assert lease_on(s3)["pod"] == "podC"


def test_an_unreadable_lease_is_exit_1_never_free(tmp_path, loops):
    dead = dvc_workspace(tmp_path / "ws", "s3://nowhere/medasr", f"http://127.0.0.1:{free_port()}")
    a = loops()
    for args in (["lease", "take"], ["lease", "check"], ["beat", "--heartbeat", str(tmp_path / "hb"), "--lease"]):
        (tmp_path / "hb").write_text(json.dumps({"time": 1, "state": "running", "detail": "", "pod": "", "run": "r"}))
        failed = loop(dead, *args, AWS_MAX_ATTEMPTS="1", **as_loop(a, "podA"))
        assert failed.returncode == 1, (args, failed.stdout, failed.stderr)
        assert "lease" in one_line(failed) or "publish" in one_line(failed)
        assert "testing" not in failed.stderr  # the AWS secret's value


def test_a_lease_read_that_fails_is_never_taken_for_a_free_lease(ws, s3, in_process, monkeypatch, loops):
    """Reads fail (a throttled or flaky store) while writes would succeed: nothing is written over the holder's."""
    from medasr.ops import lease as leases

    take_lease(ws, holder(loops(), "podA"), settle_s=SETTLE)
    real = leases._lease_file

    def flaky(repo_root):
        fs, target = real(repo_root)
        monkeypatch.setattr(fs, "cat_file", lambda path: (_ for _ in ()).throw(OSError("503 Slow Down")))
        return fs, target

    monkeypatch.setattr(leases, "_lease_file", flaky)
    with pytest.raises(OSError, match="Slow Down"):
        take_lease(ws, holder(loops(), "podB"), settle_s=SETTLE)
    with pytest.raises(OSError):
        leases.read_lease(ws)
    assert lease_on(s3)["pod"] == "podA"


def test_two_takers_racing_leave_exactly_one_holder(ws, s3, loops):
    a, b = loops(), loops()
    env = run_env() | CREDENTIALS | {"MEDASR_LEASE_SETTLE_S": "4"}  # two new processes' first S3 calls at once
    racers = {
        proc.pid: subprocess.Popen(
            [str(VENV_BIN / "medasr"), "loop", "lease", "take"],
            cwd=ws,
            env=env | as_loop(proc, f"pod{proc.pid}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for proc in (a, b)
    }
    codes = {pid: racer.wait(timeout=60) for pid, racer in racers.items()}
    assert sorted(codes.values()) == [0, 2], {pid: r.stderr.read() for pid, r in racers.items()}
    (winner,) = [pid for pid, code in codes.items() if code == 0]
    assert lease_on(s3)["pid"] == winner


def test_a_taker_whose_write_lands_after_a_rival_settled_claims_nothing(tmp_path, loops, monkeypatch):
    """The two-holder race: B reads the lease free, but its PUT is slow (botocore retrying it); meanwhile A reads,
    writes, settles and claims it; then B's PUT lands over A's and B, settling, would find its own. B's read-to-written
    time was over the settle time: it claims nothing (exit 1, try again) and removes its write, and A's next renewal
    finds no lease and takes it back."""
    from medasr.ops import lease as leases

    ws = tmp_path / "ws"
    (ws / ".dvc").mkdir(parents=True)
    (ws / ".dvc" / "config").write_text(
        f"[core]\n    no_scm = true\n    remote = r\n['remote \"r\"']\n    url = {tmp_path}/r\n"
    )
    a, b = holder(loops(), "podA"), holder(loops(), "podB")
    b_writing, a_claimed = threading.Event(), threading.Event()
    real_write = leases._write

    def slow_for_b(fs, target, lease):
        if lease["pod"] == "podB":
            b_writing.set()
            assert a_claimed.wait(30)
        real_write(fs, target, lease)

    monkeypatch.setattr(leases, "_write", slow_for_b)
    said: dict[str, object] = {}

    def take(me: Holder) -> None:
        try:
            said[me.pod] = take_lease(ws, me, settle_s=0.5)
        except Exception as exc:
            said[me.pod] = exc

    rival = threading.Thread(target=take, args=(b,))
    rival.start()
    assert b_writing.wait(30)  # B has read the lease (free) and its PUT is on its way
    take(a)
    a_claimed.set()
    rival.join(30)

    assert str(said["podA"]).startswith("lease taken by pod podA"), said
    assert isinstance(said["podB"], MedasrError) and not isinstance(said["podB"], LeaseHeld), said
    assert re.fullmatch(
        r"lease not claimed: reading and writing it took [\d.]+ s, not under "
        r"MEDASR_LEASE_SETTLE_S=0.5 s",
        str(said["podB"]),
    ), said
    assert leases.read_lease(ws) is None  # B's write is gone: it never looks like B's on a retry
    assert take_lease(ws, a, settle_s=0.5).startswith("lease taken by pod podA")  # A's next heartbeat
    assert leases.read_lease(ws)[0]["pod"] == "podA"


# --- the heartbeat -------------------------------------------------------------------------------------------------
def complete_checkpoint(ws: Path, fingerprint: str, step: int, complete: bool = True) -> None:
    folder = ws / "checkpoints" / "train" / fingerprint / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "state.ckpt").write_bytes(b"x")
    if complete:
        (folder / "meta.json").write_text(json.dumps({"step": step}))


def test_the_heartbeat_warning_is_the_last_validations_own(tmp_path):
    assert validation_warning(tmp_path) is None  # no validation yet
    (tmp_path / "validation.json").write_text(json.dumps({"step": 8, "wer": 0.2, "warning": None}))
    assert validation_warning(tmp_path) is None  # the last one was fine
    (tmp_path / "validation.json").write_text("[1, 2]")
    assert validation_warning(tmp_path) is None  # not ours: no warning, no crash of the publisher
    (tmp_path / "validation.json").write_text(json.dumps({"step": 9, "wer": 0.9, "warning": "step 9: worse"}))
    assert validation_warning(tmp_path) == "step 9: worse"


def test_beat_publishes_the_heartbeat_with_the_last_complete_step_and_renews_the_lease(ws, s3, loops):
    a = loops()
    complete_checkpoint(ws, "fp1", 40)
    complete_checkpoint(ws, "fp1", 80, complete=False)  # still being written
    warning = "step 40: val WER 0.4000 is markedly worse than the best so far, 0.2000"  # as the train stage writes it
    (ws / "checkpoints" / "train" / "validation.json").write_text(
        json.dumps({"step": 40, "wer": 0.4, "warning": warning})
    )
    heartbeat = ws / "hb.json"
    beat = {"time": 1, "state": "running", "detail": "attempt 1", "pod": "podA", "run": "r1"}
    heartbeat.write_text(json.dumps(beat))
    done = loop(ws, "beat", "--heartbeat", str(heartbeat), "--lease", MEDASR_RUN_ID="r1", **as_loop(a, "podA"))
    assert done.returncode == 0, done.stderr
    key = f"{PREFIX}/medasr-status/r1/status.json"
    published = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    assert published == beat | {"step": 40, "warning": warning}  # runpod.sh's keys as they were, two added
    assert json.loads(heartbeat.read_text()) == beat  # runpod.sh's own file is not rewritten
    assert lease_on(s3)["pod"] == "podA"


def test_beat_every_beats_from_one_process_until_sigterm_or_a_rival_takes_the_lease(ws, s3, loops):
    """runpod.sh's publisher: one `beat --every` process, the remote opened once. Several distinct statuses in a few
    seconds; SIGTERM lets the beat in flight land, exits 0, and nothing lands after; a rival's lease: exit 2 at the
    next beat, one line."""
    a = loops()
    heartbeat, key, period = ws / "hb.json", f"{PREFIX}/medasr-status/r1/status.json", 0.5
    assert loop(ws, "lease", "take", **as_loop(a, "podA")).returncode == 0  # as runpod.sh does before each attempt
    env = run_env() | CREDENTIALS | as_loop(a, "podA") | {"MEDASR_RUN_ID": "r1"}

    def status() -> tuple[dict, object] | None:
        try:
            got = s3.client().get_object(Bucket=s3.bucket, Key=key)
        except Exception:
            return None
        return json.loads(got["Body"].read()), got["LastModified"]

    def beats(seconds: float, proc: subprocess.Popen | None = None) -> list[int]:
        """Rewrite the heartbeat (as runpod.sh does each second, faster) for `seconds` or until `proc` exits; the
        distinct times published meanwhile."""
        seen: list[int] = []
        until = time.monotonic() + seconds
        while time.monotonic() < until and (proc is None or proc.poll() is None):
            heartbeat.write_text(json.dumps({"time": time.time_ns(), "state": "running", "pod": "podA", "run": "r1"}))
            if (got := status()) is not None and got[0]["time"] not in seen:
                seen.append(got[0]["time"])
            time.sleep(0.05)
        return seen

    def start() -> subprocess.Popen:
        heartbeat.write_text(json.dumps({"time": 0, "state": "running", "pod": "podA", "run": "r1"}))
        args = ["loop", "beat", "--heartbeat", str(heartbeat), "--lease", "--every", str(period)]
        proc = subprocess.Popen([str(VENV_BIN / "medasr"), *args], cwd=ws, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while ((got := status()) is None or got[0]["time"] != 0) and proc.poll() is None:  # its start: ~2 s
            assert time.monotonic() < deadline, "no first beat"
            time.sleep(0.1)
        return proc

    beater = start()
    seen = beats(4.0, beater)
    assert beater.poll() is None and len(seen) >= 4, (seen, beater.poll())  # ~8 at 0.5 s, each a beat of this one
    beater.send_signal(signal.SIGTERM)
    began = time.monotonic()
    assert beater.wait(timeout=30) == 0 and beater.stderr.read() == ""
    stopped_in = time.monotonic() - began
    last = status()
    assert beats(3 * period) == [last[0]["time"]] and status() == last  # no beat landed after it returned
    assert stopped_in < 2 * period + 2, stopped_in

    beater = start()
    beats(1.0, beater)
    assert beater.poll() is None
    # another pod took the lease (ours had expired); it writes it again meanwhile, as its own renewals do: a beat in
    # flight (read before, written after) may land over the first write
    rival = json.dumps(lease_on(s3) | {"pod": "podB", "host": "other-host"})
    taken = time.monotonic()
    while beater.poll() is None and time.monotonic() < taken + 30:
        s3.client().put_object(Bucket=s3.bucket, Key=f"{PREFIX}/medasr-status/lease.json", Body=rival)
        time.sleep(0.2)
    assert beater.wait(timeout=1) == 2
    assert time.monotonic() - taken < period + 2.2  # at the next beat (one period, its S3 requests, a loaded machine)
    said = beater.stderr.read()
    assert said.splitlines()[-1] == "lease lost: held by pod podB (host other-host)", said
    assert lease_on(s3)["pod"] == "podB"


# --- stopping the pod ----------------------------------------------------------------------------------------------
@pytest.fixture
def api():
    server = FakeRunPod(KEY)
    yield server
    server.close()


def new_pod(api: FakeRunPod) -> str:
    spec = PodSpec(name="medasr", repo_url="https://example.invalid/medasr.git", git_ref="main", run_id="r")
    return RunPodAPI(KEY, base_url=api.url).create(create_payload(spec, DEFAULT_GPUS[0], {}))["id"]


def fake_runpodctl(bin_dir: Path, fail_times: int) -> Path:
    """A runpodctl that fails its first `fail_times` calls (printing the API key, as a careless tool might)."""
    bin_dir.mkdir()
    calls = bin_dir / "calls"
    (bin_dir / "runpodctl").write_text(
        f'#!/bin/bash\necho "$*" >> {calls}\n'
        f'if (( $(wc -l < {calls}) <= {fail_times} )); then echo "Error: key $RUNPOD_API_KEY refused" >&2; exit 1; fi\n'
    )
    (bin_dir / "runpodctl").chmod(0o755)
    return calls


def stop_env(api: FakeRunPod, pod: str, bin_dir: Path) -> dict[str, str]:
    path = f"{bin_dir}{os.pathsep}{run_env()['PATH']}"
    return {"RUNPOD_POD_ID": pod, "RUNPOD_API_KEY": KEY, "MEDASR_RUNPOD_API_URL": api.url, "PATH": path} | {
        "MEDASR_STOP_RETRIES": "4",
        "MEDASR_STOP_BACKOFF_S": "0",
    }


def test_stop_pod_retries_runpodctl_then_falls_back_to_the_api(tmp_path, api):
    pod = new_pod(api)
    calls = fake_runpodctl(tmp_path / "flaky", fail_times=2)
    stopped = loop(tmp_path, "stop-pod", **stop_env(api, pod, tmp_path / "flaky"))
    assert stopped.returncode == 0 and "runpodctl" in stopped.stdout, stopped.stderr
    assert calls.read_text().splitlines() == [f"stop pod {pod}"] * 3 and not api.bodies("POST", r".*/action")

    calls = fake_runpodctl(tmp_path / "broken", fail_times=99)
    api.fail("POST", rf"/v2/pods/{pod}/action", 2, action="stop")  # then the API answers 502 twice
    stopped = loop(tmp_path, "stop-pod", **stop_env(api, pod, tmp_path / "broken"))
    assert stopped.returncode == 0, stopped.stderr
    assert len(calls.read_text().splitlines()) == 4 and len(api.bodies("POST", rf"/v2/pods/{pod}/action")) == 3
    assert api.pods[pod]["status"] == "EXITED" and "RunPod's API" in stopped.stdout
    assert KEY not in stopped.stdout + stopped.stderr

    api.set_status(pod, "RUNNING")
    api.fail("POST", rf"/v2/pods/{pod}/action", 99, action="stop")
    failed = loop(tmp_path, "stop-pod", **stop_env(api, pod, tmp_path / "broken"))
    assert failed.returncode == 1 and api.pods[pod]["status"] == "RUNNING"
    assert "502" in one_line(failed) and KEY not in failed.stdout + failed.stderr

    assert stop_pod({}) == (True, "not on a RunPod pod (RUNPOD_POD_ID unset): nothing to stop")


# --- the pod's own deadline and budget -----------------------------------------------------------------------------
def test_budget_and_deadline_from_the_pods_start(tmp_path, api):
    pod = new_pod(api)
    api.pods[pod]["startedAt"] = datetime.fromtimestamp(time.time() - 3 * 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    api.pods[pod]["cost"] = 2.0
    env = {"RUNPOD_POD_ID": pod, "RUNPOD_API_KEY": KEY, "MEDASR_RUNPOD_API_URL": api.url}
    env["MEDASR_WORKDIR"] = str(tmp_path / "volume")

    late = loop(tmp_path, "budget", MEDASR_DEADLINE_H="2", **env)
    assert late.returncode == 2 and one_line(late).startswith("deadline reached: the pod has been up 3.0")
    code, line = check_budget(env | {"MEDASR_MAX_USD": "5"})  # 3 h at $2/h
    assert code == 2 and line.startswith("budget reached: ~$6.0")
    assert check_budget(env | {"MEDASR_DEADLINE_H": "10", "MEDASR_MAX_USD": "100"})[0] == 0

    # RunPod's API gone, and the pod restarted: the first start this volume saw and the last cost still count
    env["MEDASR_RUNPOD_API_URL"] = f"http://127.0.0.1:{free_port()}"
    assert check_budget(env | {"MEDASR_MAX_USD": "5"})[0] == 2

    off = loop(tmp_path, "budget", MEDASR_DEADLINE_H="0.001")  # no RUNPOD_POD_ID: not on a pod
    assert off.returncode == 0 and not off.stdout + off.stderr
    code, line = check_budget(env | {"RUNPOD_POD_ID": "other", "MEDASR_MAX_USD": "5"})
    assert code == 0 and "RunPod API not read" in line  # nothing known: warned, not stopped
    with pytest.raises(ValueError, match="MEDASR_DEADLINE_H"):
        check_budget(env | {"MEDASR_DEADLINE_H": "ten"})


# --- progress and sweep ----------------------------------------------------------------------------------------------
def test_progress_token_changes_on_a_new_checkpoint_or_a_finished_stage(tmp_path):
    def token() -> str:
        return progress_token(tmp_path / "checkpoints" / "train", tmp_path / "dvc.lock")

    assert token() == "step=none lock=none"
    complete_checkpoint(tmp_path, "fp1", 120)
    first = token()
    assert first.startswith("step=120 ")
    complete_checkpoint(tmp_path, "fp1", 160, complete=False)  # a failed attempt's half-written checkpoint
    complete_checkpoint(tmp_path, "fp0.aside-20260101T000000Z", 900)  # set aside by --fresh: not this run's
    assert token() == first
    (tmp_path / "dvc.lock").write_text("stages: {}\n")
    assert token() != first and token().startswith("step=120 lock=")
    by_cli = loop(tmp_path, "progress")
    assert by_cli.returncode == 0 and by_cli.stdout == token() + "\n"


def test_sweep_removes_only_what_killed_atomic_writes_left(tmp_path):
    # kill real atomic writes mid-way, as a SIGKILL on the pod would
    killer = (
        "import os, signal, sys\nfrom medasr.files import atomic_dir, write_text_atomic\n"
        "if sys.argv[1] == 'dir':\n    with atomic_dir('data/manifests') as tmp:\n"
        "        (tmp / 'audio.flac').write_bytes(b'a' * 5000)\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "import medasr.files as f\nf.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "write_text_atomic('metrics/eval.json', 'x' * 3000)\n"
    )
    for kind in ("dir", "file"):
        proc = subprocess.run([sys.executable, "-c", killer, kind], cwd=tmp_path, env=run_env())
        assert proc.returncode == -signal.SIGKILL
    keep = [
        "data/sources/clip.wav",
        "data/.manifests.old/x",
        "models/.notes.tmp",
        "models/m.abcdefgh.tmp",
        "metrics/.eval.json.abcdefgh.tmpx",
        "checkpoints/train/fp/step-00000004/state.ckpt.3f2a9c0d1e2b4a5c6d7e8f.tmp",  # DVC's names, not ours
        "elsewhere/.eval.json.abcdefgh.tmp",
    ]
    for name in keep:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("keep")
    outside = tmp_path / "elsewhere"
    (tmp_path / "models" / ".linked.abcdefgh.tmp").symlink_to(outside)
    temps = [p for p in tmp_path.rglob(".*.tmp") if re.search(r"\.\w{8}\.tmp$", p.name)]
    assert len(temps) == 4, temps  # the two killed writes, the symlink, and the one outside the swept folders

    running = subprocess.Popen(["sleep", "300"])
    try:
        pidfile = tmp_path / "stage.pid"
        pidfile.write_text(f"{running.pid}\n")
        busy = loop(tmp_path, "sweep", MEDASR_STAGE_PIDFILE=str(pidfile))
        assert busy.returncode == 1 and one_line(busy) == f"not sweeping: a stage runs (pid {running.pid})"
    finally:
        running.kill()
        running.wait()
    swept = loop(tmp_path, "sweep", MEDASR_STAGE_PIDFILE=str(pidfile))
    assert swept.returncode == 0 and swept.stdout.startswith("swept 3 temp entries"), swept.stdout + swept.stderr
    assert all((tmp_path / name).read_text() == "keep" for name in keep)
    assert outside.is_dir() and not (tmp_path / "models" / ".linked.abcdefgh.tmp").is_symlink()
    assert not list((tmp_path / "data").glob(".manifests.*.tmp")) and not list((tmp_path / "metrics").glob("*.tmp"))
    assert sweep_temps([tmp_path / "data", tmp_path / "metrics"]) == (0, 0)


def test_an_unreadable_lock_or_a_sweep_that_cannot_finish_is_one_line_exit_1(tmp_path, monkeypatch):
    (tmp_path / "dvc.lock").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO), even for root
    unreadable = loop(tmp_path, "progress")
    assert unreadable.returncode == 1 and not unreadable.stdout, unreadable
    assert one_line(unreadable) == "progress unknown: OSError: [Errno 5] Input/output error"

    import shutil

    from typer.testing import CliRunner

    import medasr.files as files
    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    temp = Path("data/.manifests.abcdefgh.tmp")  # as the sweep names it: from the checkout
    real_size = files._size

    def vanishing(path: Path) -> int:  # another process removes it between the listing and its size
        shutil.rmtree(path)
        return real_size(path)

    def refused(path, *args, **kwargs):  # what EACCES on a file inside looks like (root passes permission bits)
        raise PermissionError(13, "Permission denied", str(path / "audio.flac"))

    for fault, line in (
        ((files, "_size", vanishing), f"FileNotFoundError: [Errno 2] No such file or directory: '{temp}'"),
        ((files.shutil, "rmtree", refused), f"PermissionError: [Errno 13] Permission denied: '{temp}/audio.flac'"),
    ):
        temp.mkdir(parents=True, exist_ok=True)
        (temp / "audio.flac").write_bytes(b"a" * 100)
        with monkeypatch.context() as patch:
            patch.setattr(*fault)
            swept = CliRunner().invoke(app, ["loop", "sweep"])
        assert swept.exit_code == 1 and not swept.stdout, (swept.output, swept.exception)
        assert swept.stderr.splitlines() == [f"sweep stopped: {line}"]


def test_loop_commands_never_import_torch(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stages.cli", "loop", "progress"],
        cwd=tmp_path,
        env=run_env() | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("step=")
    heavy = re.findall(r"\|\s+(torch|nemo|lightning|datasets)$", proc.stderr, re.MULTILINE)
    assert not heavy and "stages.train" not in proc.stderr
