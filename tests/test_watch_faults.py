"""The controller under partial failures (issue 14): RunPod's API answering 502, `pod up` run twice, a heartbeat that
cannot be read, a pod whose clock is wrong, settings and secrets at recreate time, a truncated state file. Against
the fake RunPod API (tests/fake_runpod.py) and a real local DVC remote; `medasr` runs as a user runs it where a user
would, the watcher in-process on a fake clock (tests/fake_runpod.Scenario). No request reaches RunPod."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from fake_runpod import FakeRunPod, Scenario
from helpers import run_env

from medasr.ops.lease import Holder, read_lease, take_lease
from medasr.ops.podstate import LaunchState
from medasr.ops.runpod import PodError, PodSpec, RunPodAPI, check_recreate, create_payload
from medasr.ops.status import publish_status, read_status
from medasr.ops.watch import WatchSettings, watch
from medasr.paths import POD_STATE

KEY = "rpa_test_key_0123456789"
SECRETS = {"AWS_SECRET_ACCESS_KEY": "planted-aws-secret", "WANDB_API_KEY": "planted-wandb-key"}
ENV = SECRETS | {"AWS_ACCESS_KEY_ID": "AKIATEST", "MEDASR_S3_URL": "s3://bucket/medasr"}
URL = "https://github.com/acme/medasr.git"
NOT_A_REPO = "you are not inside of a DVC repository (checked up to mount point '/')"


@pytest.fixture
def fake():
    server = FakeRunPod(KEY)
    yield server
    server.close()
    assert server.schema_violations == []  # every body sent matched RunPod's schema


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A checkout with a local-directory default DVC remote: where heartbeats and the lease live."""
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    # what `dvc init` and `dvc remote add -d r ...` write, without two DVC processes
    (repo / ".dvc" / "config").write_text(f"[core]\n    remote = r\n['remote \"r\"']\n    url = {tmp_path / 'r'}\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    monkeypatch.chdir(repo)  # the watcher saves .medasr/pod.json where `medasr pod` runs
    return repo


def medasr(repo: Path, fake: FakeRunPod, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    api = {"MEDASR_RUNPOD_API_URL": fake.url, "RUNPOD_API_KEY": KEY}
    return subprocess.run(
        ["medasr", *args], cwd=repo, env=run_env() | ENV | api | env, capture_output=True, text=True, timeout=120
    )


def up(repo: Path, fake: FakeRunPod, **env: str) -> subprocess.CompletedProcess[str]:
    return medasr(repo, fake, "pod", "up", "--repo-url", URL, "--git-ref", "abc123", "--volume", "vol1", **env)


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(n in result.stderr for n in needles), result.stderr


def beat(repo: Path, state: str, pod: str, when: float, run: str = "r1") -> None:
    """Publish a heartbeat of run `run` as runpod.sh on pod `pod` does, stamped `when` by the pod's clock."""
    heartbeat = repo / "heartbeat.json"
    heartbeat.write_text(json.dumps({"time": when, "state": state, "detail": "", "pod": pod, "run": run}))
    time.sleep(0.02)  # the filesystem's timestamp clock is coarse: two publishes never share a modification time
    publish_status(heartbeat, run, repo)


def actions(fake: FakeRunPod, action: str) -> list[str]:
    return [
        path.split("/")[3] for m, path, body in fake.requests if path.endswith("/action") and body == {"action": action}
    ]


def test_pod_up_twice_and_502s_never_make_two_pods_spend_covers_all_and_the_cap_stops_them(fake, repo):
    fake.cost_per_hour = cost = 3.6  # $/h: $0.001 a second
    first_up = up(repo, fake)
    assert first_up.returncode == 0, first_up.stderr
    one_line_error(up(repo, fake), "is RUNNING", "pod down --terminate")  # the second `pod up`
    assert len(fake.pods) == 1

    state = LaunchState.load(POD_STATE)
    first = state.pod_id
    fake.fail("POST", rf"/v2/pods/{first}/action", 2, action="restart")
    fake.fail("POST", r"/v2/pods/[^/]+/action", 3, action="terminate")
    fake.fail("POST", r"/v2/pods", 1, acted=True)  # the recreate's pod is made, but the answer is lost
    fake.fail("POST", r"/v2/pods/[^/]+/action", 10, action="stop")  # more than one round of tries
    events = {
        0: lambda: beat(repo, "running", first, time.time(), state.spec.run_id),
        # silent from here: restarted after 300 s (restart answers 502 twice first), then lost
        12: lambda: fake.set_status(first, "ERROR"),
    }
    scenario = Scenario([events.get(n, lambda: None) for n in range(40)], poll_s=60)
    said: list[str] = []

    def alive_beat(run_id):  # the new pod publishes every poll; the old one's beat is no sign of it
        if state.pod_id != first:
            beat(repo, "running", state.pod_id, time.time(), run_id)
        return read_status(run_id, repo)

    settings = WatchSettings(max_usd=1.5, poll_s=60, stale_after_s=300, backoff_base_s=0)
    code = watch(
        RunPodAPI(KEY, fake.url), state, alive_beat, ENV, settings, scenario.clock, scenario.sleep, said.append
    )

    assert code == 1 and "spending cap reached" in said[-1], said
    assert fake.max_alive == 1  # never two pods RunPod would bill at once, through every 502
    second = state.pod_id
    assert len(fake.pods) == 2 and second != first and [p.id for p in state.pods] == [first, second]
    assert actions(fake, "restart") == [first] * 3 and actions(fake, "terminate") == [first] * 4
    assert fake.pods[first]["status"] == "TERMINATED" and fake.pods[second]["status"] == "EXITED"
    assert len(actions(fake, "stop")) == 11  # ten 502s (two rounds of tries), then the one that took
    # spend covers both pods, each from first sight to last, with no gap: the first from `pod up`, before `watch`
    assert all(p.spent_usd > 0 for p in state.pods)
    assert state.spent_usd == pytest.approx(cost / 3600 * (scenario.t - state.pods[0].first_seen), rel=1e-9)
    assert json.loads((repo / POD_STATE).read_text())["pods"][1]["id"] == second  # kept for the next `watch`


def test_pod_up_respects_the_lease_and_pod_down_terminate_clears_the_way(fake, repo):
    api = RunPodAPI(KEY, fake.url)
    other = api.create(create_payload(PodSpec("other", URL, "abc", "elsewhere"), "NVIDIA H100 PCIe", ENV))["id"]
    take_lease(repo, Holder(pod=other, host="another-host", pid=7, pid_started=None, run="elsewhere"), settle_s=0.5)
    one_line_error(up(repo, fake), f"lease is held by pod {other}")
    assert len(fake.pods) == 1

    fake.set_status(other, "TERMINATED")  # its pod is gone: its lease is dead, whatever its expiry says
    assert up(repo, fake).returncode == 0 and read_lease(repo) is None
    mine = LaunchState.load(POD_STATE).pod_id
    take_lease(repo, Holder(pod=mine, host="pod-host", pid=1, pid_started=None, run="r"), settle_s=0.5)
    one_line_error(up(repo, fake), f"pod {mine} of run", "is RUNNING")

    down = medasr(repo, fake, "pod", "down", "--terminate")
    assert down.returncode == 0 and fake.pods[mine]["status"] == "TERMINATED", down
    assert read_lease(repo) is None
    assert up(repo, fake).returncode == 0 and fake.max_alive == 1

    # `pod watch` as a user runs it: the new pod's `done` ends it, with that pod stopped
    state = LaunchState.load(POD_STATE)
    beat(repo, "done", state.pod_id, 0, state.spec.run_id)
    watched = medasr(repo, fake, "pod", "watch", "--poll-s", "0.1")
    assert watched.returncode == 0 and "pipeline finished" in watched.stdout, watched
    assert fake.pods[state.pod_id]["status"] == "EXITED"


def test_an_unreadable_heartbeat_never_restarts_a_pod(fake, repo):
    api = RunPodAPI(KEY, fake.url)
    pod = api.create(create_payload(PodSpec("m", URL, "abc", "r1"), "NVIDIA H100 PCIe", ENV))["id"]
    state = LaunchState(pod, PodSpec("m", URL, "abc", "r1"))
    last = ({"time": 1.0, "state": "running", "detail": "", "pod": pod, "run": "r1"}, 1000.0)
    outage = 16  # polls of 60 s: over three times stale_after_s
    reads = iter([last] + [PermissionError("ExpiredToken: the laptop's credentials expired")] * outage + [last] * 40)

    def read(run_id):
        got = next(reads)
        if isinstance(got, Exception):
            raise got
        return got

    scenario = Scenario([], poll_s=60)
    t0 = scenario.t
    settings = WatchSettings(poll_s=60, stale_after_s=300, max_recoveries=1, backoff_base_s=0)
    code = watch(api, state, read, ENV, settings, scenario.clock, scenario.sleep, scenario.say)
    said = scenario.said

    warnings = [line for _, line in said if "cannot be read" in line]
    assert len(warnings) == outage and all("ExpiredToken" in line for line in warnings)
    # no restart during the outage; once readable, the unchanged heartbeat restarts the pod after a whole
    # stale_after_s (the positive control: this test can fail), and then the recovery limit stops it
    restarts = [(t - t0, line) for t, line in said if "restart" in line]
    assert restarts == [((outage + 6) * 60, f"pod {pod} is RUNNING: restart (1)")], said
    assert actions(fake, "restart") == [pod] and fake.pods[pod]["status"] == "EXITED"
    assert code == 1 and said[-1][1] == "gave up after 1 recoveries; every pod of the run is stopped"


def test_staleness_is_judged_by_the_remote_objects_changes_on_the_watchers_clock(fake, repo):
    api = RunPodAPI(KEY, fake.url)
    pod = api.create(create_payload(PodSpec("m", URL, "abc", "r1"), "NVIDIA H100 PCIe", ENV))["id"]
    state = LaunchState(pod, PodSpec("m", URL, "abc", "r1"))
    behind = time.time() - 3 * 3600  # the pod's clock: 3 h slow and stuck, so every heartbeat reads the same
    alive = [lambda: beat(repo, "running", pod, behind)] * 15  # 15 polls of 60 s: three times stale_after_s
    hung = [lambda: beat(repo, "running", pod, time.time() + 10 * 3600)] + [lambda: None] * 7  # last words, 10 h fast
    ends = [lambda: beat(repo, "done", "an-earlier-pod", behind), lambda: beat(repo, "done", pod, behind)]
    scenario = Scenario([*alive, *hung, *ends], poll_s=60)
    t0 = scenario.t
    settings = WatchSettings(poll_s=60, stale_after_s=300, backoff_base_s=0)
    read = lambda run_id: read_status(run_id, repo)  # noqa: E731
    code = watch(api, state, read, ENV, settings, scenario.clock, scenario.sleep, scenario.say)
    said = scenario.said

    # poll 16 saw the last change; the restart came at the first poll over stale_after_s later (poll 22), none before
    restarts = [(t - t0, line) for t, line in said if "restart" in line]
    assert restarts == [(22 * 60, f"pod {pod} is RUNNING: restart (1)")], said
    assert actions(fake, "restart") == [pod]
    # only the tracked pod's `done` ends the watch: an earlier pod's does not
    assert code == 0 and "pipeline finished" in said[-1][1] and scenario.polls == 15 + 8 + 2, said


def test_a_recreated_pod_gets_the_stored_settings_and_is_refused_without_a_secret(fake, repo):
    settings_at_up = {"MEDASR_MAX_USD": "7", "MEDASR_DEADLINE_H": "3", "MEDASR_STATUS_EVERY_S": "30"}
    token_url = "https://x-access-token:planted-git-token@github.com/acme/private.git"
    launched = medasr(repo, fake, "pod", "up", "--repo-url", token_url, "--git-ref", "abc123", **settings_at_up)
    assert launched.returncode == 0, launched.stderr
    saved = (repo / POD_STATE).read_text()
    assert "planted" not in saved and all(v not in launched.stdout + launched.stderr for v in SECRETS.values())
    state = LaunchState.load(POD_STATE)
    first = state.pod_id
    assert fake.pods[first]["env"]["MEDASR_GIT_TOKEN"] == "planted-git-token"
    assert fake.pods[first]["env"]["MEDASR_REPO_URL"] == "https://github.com/acme/private.git"
    assert "planted-git-token" not in fake.pods[first]["args"]

    fake.set_status(first, "TERMINATED")  # the pod is lost
    # `watch` runs later, elsewhere: no S3 URL, other settings, a rotated key, and no git token yet
    environ = SECRETS | {"AWS_ACCESS_KEY_ID": "AKIATEST", "WANDB_API_KEY": "rotated-wandb-key", "MEDASR_MAX_USD": "99"}

    def token_found():
        environ["MEDASR_GIT_TOKEN"] = "planted-git-token"

    done = lambda: beat(repo, "done", state.pod_id, 0, state.spec.run_id)  # noqa: E731
    scenario = Scenario([token_found, lambda: None, done], poll_s=60)
    said: list[str] = []
    read = lambda run_id: read_status(run_id, repo)  # noqa: E731
    settings = WatchSettings(poll_s=60, backoff_base_s=0)
    code = watch(RunPodAPI(KEY, fake.url), state, read, environ, settings, scenario.clock, scenario.sleep, said.append)

    assert code == 0, said
    refusal = [line for line in said if "cannot recreate" in line]
    assert refusal == [
        "recovery failed: cannot recreate the pod: MEDASR_GIT_TOKEN is not set here (environment or .env); "
        "the first had it"
    ]
    env = fake.pods[state.pod_id]["env"]
    assert env["MEDASR_S3_URL"] == ENV["MEDASR_S3_URL"] and env["MEDASR_MAX_USD"] == "7"  # stored, not the laptop's
    assert env["MEDASR_DEADLINE_H"] == "3" and env["MEDASR_STATUS_EVERY_S"] == "30"
    assert env["WANDB_API_KEY"] == "rotated-wandb-key" and env["MEDASR_GIT_TOKEN"] == "planted-git-token"
    assert len(fake.pods) == 2 and fake.max_alive == 1

    # a state file from before the settings were kept: a recreate needs MEDASR_S3_URL here, or refuses
    old_spec = PodSpec("m", URL, "abc", "r1")
    with pytest.raises(PodError, match="MEDASR_S3_URL is not set"):
        check_recreate(old_spec, {"AWS_SECRET_ACCESS_KEY": "x"})
    check_recreate(old_spec, {"MEDASR_S3_URL": "s3://b/p"})


def test_a_truncated_or_old_state_file_and_a_missing_dvc_repo_give_one_line(fake, repo, tmp_path):
    api = RunPodAPI(KEY, fake.url)
    pod = api.create(create_payload(PodSpec("m", URL, "abc", "r1"), "NVIDIA H100 PCIe", ENV))["id"]
    (repo / ".medasr").mkdir()
    old = {"pod_id": pod, "spec": {"name": "m", "repo_url": URL, "git_ref": "abc", "run_id": "r1"}, "spent_usd": 2.5}
    (repo / POD_STATE).write_text(json.dumps(old | {"recoveries": 1})[:40])
    one_line_error(medasr(repo, fake, "pod", "status"), ".medasr/pod.json is unreadable")

    (repo / POD_STATE).write_text(json.dumps(old | {"recoveries": 1}))  # written before `pods` existed: it loads
    status = medasr(repo, fake, "pod", "status")
    assert status.returncode == 0 and f"pod {pod}: RUNNING" in status.stdout, status
    assert "spent: ~$2.50 by 1 pod(s)" in status.stdout and "recoveries: 1" in status.stdout

    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    check = medasr(outside, fake, "remote", "check")
    assert check.returncode == 2 and "Traceback" not in check.stderr, check
    assert check.stderr.strip().splitlines() == [f"DVC cannot open {outside}: NotDvcRepoError: {NOT_A_REPO}"]


def created(api: RunPodAPI, n: int, run: str = "r1") -> list[str]:
    return [api.create(create_payload(PodSpec("m", URL, "abc", run), "NVIDIA H100 PCIe", ENV))["id"] for _ in range(n)]


def known(api: RunPodAPI, run: str, *pods: str) -> LaunchState:
    """The state of run `run` tracking the last of `pods`, having seen them all."""
    state = LaunchState(pods[-1], PodSpec("m", URL, "abc", run))
    for pod in pods:
        state.observe(pod, api.get(pod), time.time())
    state.save()
    return state


def test_a_pod_that_cannot_be_stopped_keeps_no_other_pod_billing(fake, repo, monkeypatch):
    api = RunPodAPI(KEY, fake.url)
    locked, tracked = created(api, 2)  # e.g. an orphan not terminated yet, and the pod the run uses
    fake.fail("POST", rf"/v2/pods/{locked}/action", 99, status=400)  # every action refused, as for a locked pod
    seen: list[tuple[str, str]] = []

    def unlocked():
        seen.append((fake.pods[locked]["status"], fake.pods[tracked]["status"]))
        fake.faults.clear()

    scenario = Scenario([unlocked], poll_s=60)
    settings = WatchSettings(max_usd=0, poll_s=60, tries=1, retry_s=1)  # the cap ends it at once
    state = known(api, "r1", locked, tracked)
    code = watch(api, state, lambda run_id: None, ENV, settings, scenario.clock, scenario.sleep, scenario.say)

    assert seen == [("RUNNING", "EXITED")], scenario.said  # the first round stopped the other pod all the same
    assert code == 1 and fake.pods[locked]["status"] == "TERMINATED" and fake.pods[tracked]["status"] == "EXITED"

    # `pod down` the same way: each pod tried, the one not stopped named, exit 1
    from typer.testing import CliRunner

    from stages.cli import app

    locked, tracked = created(api, 2, run="r2")
    known(api, "r2", locked, tracked)
    fake.fail("POST", rf"/v2/pods/{locked}/action", 99, status=400)
    monkeypatch.setattr(time, "sleep", lambda s: None)  # bring_down's backoff between its 8 tries
    down = CliRunner().invoke(app, ["pod", "down"], env={"MEDASR_RUNPOD_API_URL": fake.url, "RUNPOD_API_KEY": KEY})
    assert down.exit_code == 1 and f"pod {tracked}: stopped" in down.stdout, (down.output, down.exception)
    assert down.stderr.splitlines() == [f"error: pod {locked}: stop not confirmed by RunPod after 8 tries"]
    assert fake.pods[locked]["status"] == "RUNNING" and fake.pods[tracked]["status"] == "EXITED"


def test_an_answer_that_is_not_json_is_a_passing_fault(fake, repo):
    api = RunPodAPI(KEY, fake.url)
    (pod,) = created(api, 1)
    page = "<html><body>502 from the proxy, served as 200</body></html>"
    fake.fail("GET", r"/v2/pods", 1, status=200, text=page)
    fake.fail("GET", rf"/v2/pods/{pod}", 2, status=200, text=page)
    done = lambda: beat(repo, "done", pod, 0)  # noqa: E731
    scenario = Scenario([lambda: None, lambda: None, done], poll_s=60)
    read = lambda run_id: read_status(run_id, repo)  # noqa: E731
    state = LaunchState(pod, PodSpec("m", URL, "abc", "r1"))
    code = watch(api, state, read, ENV, WatchSettings(poll_s=60), scenario.clock, scenario.sleep, scenario.say)

    warnings = [line for _, line in scenario.said if line.startswith("warning")]
    assert warnings == [
        "warning: RunPod API GET /v2/pods -> 200 but not JSON (text/html)",
        f"warning: RunPod API GET /v2/pods/{pod} -> 200 but not JSON (text/html)",
        f"warning: RunPod API GET /v2/pods/{pod} -> 200 but not JSON (text/html)",
    ]
    assert code == 0 and fake.pods[pod]["status"] == "EXITED"


def test_an_orphan_pod_of_the_run_is_found_counted_and_terminated(fake, repo):
    fake.cost_per_hour = 3.6  # $/h: $0.001 a second
    api = RunPodAPI(KEY, fake.url)
    (first,) = created(api, 1)
    state = LaunchState(first, PodSpec("m", URL, "abc", "r1"))
    fake.set_status(first, "TERMINATED")  # the pod is lost: the watcher recreates it
    fake.fail("POST", r"/v2/pods", 1, acted=True)  # the create makes pod0002 but its answer is lost
    fake.unlisted = {"pod0002"}  # and RunPod's list does not show it yet: the next GPU type is tried, pod0003
    events = [fake.unlisted.clear, lambda: beat(repo, "done", state.pod_id, 0)]
    scenario = Scenario(events, poll_s=60)
    t0 = scenario.t
    read = lambda run_id: read_status(run_id, repo)  # noqa: E731
    settings = WatchSettings(poll_s=60, backoff_base_s=0)
    code = watch(api, state, read, ENV, settings, scenario.clock, scenario.sleep, scenario.say)

    assert code == 0 and state.pod_id == "pod0003", scenario.said
    assert (t0 + 60, "pod pod0002 of the run is alive beside pod pod0003: terminating it") in scenario.said  # poll 2
    assert fake.pods["pod0002"]["status"] == "TERMINATED" and fake.alive() == ["pod0003"]
    orphan = next(p for p in state.pods if p.id == "pod0002")
    assert orphan.ended and orphan.spent_usd == pytest.approx(0.06, abs=0.003)  # from its creation to its end


def test_a_pod_up_that_dies_before_saving_its_pod_leaves_a_run_down_and_up_still_find(fake, repo):
    import threading

    answer = threading.Event()
    fake.fail("POST", r"/v2/pods", 1, status=201, acted=True, hold=answer)
    api = {"MEDASR_RUNPOD_API_URL": fake.url, "RUNPOD_API_KEY": KEY}
    dying = subprocess.Popen(
        ["medasr", "pod", "up", "--repo-url", URL, "--git-ref", "abc"], cwd=repo, env=run_env() | ENV | api
    )
    try:
        deadline = time.time() + 60
        while not fake.pods and time.time() < deadline:
            time.sleep(0.05)
        (orphan,) = fake.pods  # created; the answer never reaches `pod up`
    finally:
        dying.kill()
        dying.wait()
        answer.set()
    one_line_error(up(repo, fake), f"pod {orphan} of run", "is RUNNING")
    assert len(fake.pods) == 1
    down = medasr(repo, fake, "pod", "down", "--terminate")
    assert down.returncode == 0 and f"pod {orphan}: terminated" in down.stdout, down
    assert up(repo, fake).returncode == 0 and fake.max_alive == 1
