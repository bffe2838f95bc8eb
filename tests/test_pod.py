"""`medasr pod`: request bodies checked against RunPod's published API schema, and the controller (`pod watch`)
driven through a pod's life against a fake RunPod API on 127.0.0.1 (tests/fake_runpod.py), with the heartbeat
going through a real DVC remote. No request ever reaches RunPod."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_runpod import FakeRunPod, Scenario
from fake_runpod import schema_errors as independent_schema_errors
from helpers import git, run_env, scratch_clone

from medasr.ops.podstate import LaunchState
from medasr.ops.runpod import PodError, PodSpec, RunPodAPI, create_payload, redacted
from medasr.ops.status import publish_status, read_status
from medasr.ops.watch import WatchSettings, decide, watch

KEY = "rpa_test_key_0123456789"
SECRETS = {"AWS_SECRET_ACCESS_KEY": "planted-aws-secret", "WANDB_API_KEY": "planted-wandb-key"}
ENV = SECRETS | {"AWS_ACCESS_KEY_ID": "AKIATEST", "MEDASR_S3_URL": "s3://bucket/medasr", "HOME": "/root"}


def spec(**kw) -> PodSpec:
    return PodSpec(name="medasr", repo_url="https://github.com/acme/medasr.git", git_ref="abc123", run_id="r1", **kw)


def test_the_create_request_matches_runpods_schema_and_is_shown_without_secrets():
    body = create_payload(spec(volume_id="vol123"), "NVIDIA A100-SXM4-40GB", ENV)
    # create_payload checks the body with the client's own validator; check it again with the fake server's
    # independent one (tests/fake_runpod.py), and the fields that matter one by one
    assert independent_schema_errors(body, "CreatePodRequest") == []
    assert body["name"] == "medasr" and body["image"] == spec().image and body["cloud"] == "SECURE"
    assert body["gpu"] == {"id": "NVIDIA A100-SXM4-40GB", "count": 1}
    assert body["mounts"] == {"network": [{"volumeId": "vol123", "path": "/workspace"}]}
    assert body["env"]["AWS_SECRET_ACCESS_KEY"] == "planted-aws-secret"  # the pod needs it: it goes in the request
    assert "HOME" not in body["env"] and body["env"]["MEDASR_RUN_ID"] == "r1"
    assert "runpod.sh" in body["args"]
    shown = json.dumps(redacted(body))
    assert all(value not in shown for value in SECRETS.values())

    # a token in MEDASR_REPO_URL (.env) reaches the pod as MEDASR_GIT_TOKEN only, and is never shown
    token_url = "https://u:planted-git-token@github.com/a/b"
    local = create_payload(spec(), "NVIDIA H100 PCIe", ENV | {"MEDASR_REPO_URL": token_url})
    assert local["mounts"] == {"persistent": {"size": 100, "path": "/workspace"}}
    assert local["env"]["MEDASR_GIT_TOKEN"] == "planted-git-token"
    assert local["env"]["MEDASR_REPO_URL"] == spec().repo_url and "planted-git-token" not in local["args"]
    assert "planted-git-token" not in json.dumps(redacted(local))

    with pytest.raises(PodError) as bad:
        create_payload(spec(gpu_count=0, disk_gb=0), "NVIDIA H100 PCIe", ENV)
    assert "gpu/count" in str(bad.value) and "disk" in str(bad.value)


def test_decide_what_to_do_about_an_unfinished_run():
    running = {"id": "p1", "status": "RUNNING"}
    assert decide(running, 10, 600) == "wait"  # the heartbeat changed 10 s ago (this machine's clock)
    assert decide(running, 601, 600) == "restart"
    assert decide({"id": "p1", "status": "EXITED"}, 0, 600) == "start"
    assert decide({"id": "p1", "status": "STARTING"}, 9999, 600) == "wait"
    assert decide({"id": "p1", "status": "ERROR"}, 0, 600) == "recreate"
    assert decide({"id": "p1", "status": "TERMINATED"}, 0, 600) == "recreate"
    assert decide(None, 0, 600) == "recreate"


@pytest.fixture
def fake():
    server = FakeRunPod(KEY)
    yield server
    server.close()
    assert server.schema_violations == []  # every body we sent matched RunPod's schema


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    """A DVC repo with a local-directory default remote: where runpod.sh publishes its heartbeat."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "remote", "add", "-d", "r", str(tmp_path / "r")]):
        subprocess.run(cmd, cwd=repo, env=run_env(), check=True, capture_output=True)
    monkeypatch.chdir(repo)
    return repo


def test_the_fake_api_refuses_a_body_that_breaks_the_schema():
    """Straight to the fake with httpx, past the client and its own validation: the fake's check stands alone."""
    import httpx

    server = FakeRunPod(KEY)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        good = create_payload(spec(), "NVIDIA H100 PCIe", ENV)
        bad = good | {"gpu": {"id": "NVIDIA H100 PCIe", "count": 0}, "surprise": True}
        refused = httpx.post(f"{server.url}/v2/pods", json=bad, headers=auth, timeout=10)
        assert refused.status_code == 422, refused.text
        errors = refused.json()["errors"]
        assert any(e.startswith("gpu/count:") for e in errors) and any("surprise" in e for e in errors), errors
        assert server.pods == {} and server.schema_violations == errors

        created = httpx.post(f"{server.url}/v2/pods", json=good, headers=auth, timeout=10)
        assert created.status_code == 201 and created.json()["id"] in server.pods
        pod = created.json()["id"]
        action = httpx.post(f"{server.url}/v2/pods/{pod}/action", json={"action": "explode"}, headers=auth, timeout=10)
        assert action.status_code == 422 and server.pods[pod]["status"] == "RUNNING"
        assert any(e.startswith("action:") for e in action.json()["errors"])
    finally:
        server.close()


def beat(repo: Path, state: str, pod: str, detail: str = "", age_s: float = 0, **added: object) -> None:
    """Publish a heartbeat as runpod.sh on pod `pod` does (`added`: what `medasr loop beat` adds)."""
    logs = repo / "pod-logs"
    logs.mkdir(exist_ok=True)
    record = {"time": time.time() - age_s, "state": state, "detail": detail, "pod": pod, "run": "r1"} | added
    (logs / "heartbeat").write_text(json.dumps(record))
    publish_status(logs / "heartbeat", "r1", repo)


def test_watch_recovers_a_stopped_pod_and_a_silent_one_then_stops_when_the_pipeline_finishes(fake, dvc_repo):
    api = RunPodAPI(KEY, base_url=fake.url)
    first = api.create(create_payload(spec(volume_id="vol123"), "NVIDIA A100-SXM4-40GB", ENV))["id"]
    state = LaunchState(pod_id=first, spec=spec(volume_id="vol123"))
    beat(dvc_repo, "running", first)

    def interrupted():  # the pod was stopped, and its machine has no GPU left to start it again
        fake.set_status(first, "EXITED")
        fake.no_gpu_left.add(first)

    def silent():  # the new pod runs, but its loop never reports (hung): past stale_after, restart it
        scenario.t += 400

    def finished():
        beat(dvc_repo, "done", state.pod_id)

    scenario = Scenario([lambda: None, interrupted, lambda: None, silent, finished], poll_s=30)
    said: list[str] = []
    settings = WatchSettings(max_usd=100, poll_s=30, stale_after_s=300, backoff_base_s=0)
    read = lambda run_id: read_status(run_id, dvc_repo)  # noqa: E731
    code = watch(api, state, read, ENV, settings, clock=scenario.clock, sleep=scenario.sleep, say=said.append)

    assert code == 0, said
    second = state.pod_id
    assert second != first and fake.pods[first]["status"] == "TERMINATED"
    actions = [(path.split("/")[3], body["action"]) for _, path, body in fake.requests if path.endswith("/action")]
    assert actions == [(first, "start"), (first, "terminate"), (second, "restart"), (second, "stop")], actions
    (recreated,) = fake.bodies("POST", "/v2/pods")[1:]
    assert recreated["mounts"]["network"][0]["volumeId"] == "vol123" and recreated["env"]["MEDASR_RUN_ID"] == "r1"
    assert state.recoveries == 2 and state.spent_usd > 0
    saved = (dvc_repo / ".medasr" / "pod.json").read_text()
    assert json.loads(saved)["pod_id"] == second and all(v not in saved for v in SECRETS.values())
    assert any("pipeline finished" in line for line in said)


def test_a_validation_warning_in_the_heartbeat_is_shown_and_never_acted_on(fake, dvc_repo):
    from typer.testing import CliRunner

    from stages.cli import app

    api = RunPodAPI(KEY, base_url=fake.url)
    pod = api.create(create_payload(spec(), "NVIDIA H100 PCIe", ENV))["id"]
    state = LaunchState(pod, spec())
    state.save()
    warning = "step 400: val WER 0.3100 is markedly worse than the best so far, 0.2200"
    beat(dvc_repo, "running", pod, detail="attempt 1", step=400, warning=warning)
    env = {"RUNPOD_API_KEY": KEY, "MEDASR_RUNPOD_API_URL": fake.url}
    shown = CliRunner().invoke(app, ["pod", "status"], env=env)
    assert shown.exit_code == 0 and f"warning: {warning}" in shown.output, shown.output

    # a pod that trains on, validating worse: the watcher waits (no restart, no recovery) until the pipeline is done
    scenario = Scenario([lambda: None, lambda: None, lambda: beat(dvc_repo, "done", pod, warning=warning)], poll_s=30)
    read = lambda run_id: read_status(run_id, dvc_repo)  # noqa: E731
    settings = WatchSettings(max_usd=100, poll_s=30, stale_after_s=300)
    assert watch(api, state, read, ENV, settings, scenario.clock, scenario.sleep, scenario.say) == 0
    assert state.recoveries == 0 and [b["action"] for _, p, b in fake.requests if p.endswith("/action")] == ["stop"]


def test_watch_stops_the_pod_at_the_spending_cap(fake, dvc_repo):
    api = RunPodAPI(KEY, base_url=fake.url)
    fake.cost_per_hour = 3600.0  # $1 per second
    pod = api.create(create_payload(spec(), "NVIDIA H100 PCIe", ENV))["id"]
    scenario = Scenario([], poll_s=2)
    said: list[str] = []
    settings = WatchSettings(max_usd=5, poll_s=2)
    state = LaunchState(pod, spec())
    code = watch(api, state, lambda _: None, ENV, settings, scenario.clock, scenario.sleep, said.append)
    assert code == 1 and "spending cap reached" in said[-1]
    assert fake.pods[pod]["status"] == "EXITED" and scenario.polls == 3


def test_watch_does_not_revive_a_run_that_gave_up(fake, dvc_repo):
    api = RunPodAPI(KEY, base_url=fake.url)
    pod = api.create(create_payload(spec(), "NVIDIA H100 PCIe", ENV))["id"]
    fake.set_status(pod, "EXITED")  # runpod.sh stopped its own pod after giving up
    beat(dvc_repo, "gave up", pod, detail="5 fast failures in a row")
    said: list[str] = []
    read = lambda run_id: read_status(run_id, dvc_repo)  # noqa: E731
    code = watch(api, LaunchState(pod, spec()), read, ENV, WatchSettings(), time.time, lambda s: None, said.append)
    assert code == 1 and "gave up: 5 fast failures in a row" in said[-1]
    assert [m for m, p, b in fake.requests if m == "POST"] == ["POST"]  # only the create: nothing revived


def medasr(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stages.cli", "pod", *args],
        cwd=repo,
        env=run_env() | ENV | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pod_commands_from_the_cli(tmp_path, fake):
    repo = scratch_clone(tmp_path / "clone")
    api_env = {"MEDASR_RUNPOD_API_URL": fake.url, "RUNPOD_API_KEY": KEY}

    unpushed = medasr(repo, "up", **api_env)  # no origin: the pod could not clone this commit
    assert unpushed.returncode == 2 and "no repo URL" in unpushed.stderr
    assert fake.requests == []

    dry = medasr(repo, "up", "--dry-run", "--repo-url", "https://github.com/acme/medasr.git", **api_env)
    assert dry.returncode == 0 and json.loads(dry.stdout)["env"]["AWS_SECRET_ACCESS_KEY"] == "<redacted>"
    assert fake.requests == []

    fake.unavailable_gpus = {"NVIDIA A100-SXM4-40GB"}
    head = git(repo, "rev-parse", "HEAD").strip()
    up = medasr(repo, "up", "--volume", "vol9", "--repo-url", "https://x.invalid/m.git", "--git-ref", head, **api_env)
    assert up.returncode == 0, up.stderr
    (pod_id,) = fake.pods
    assert fake.pods[pod_id]["gpu"]["id"] == "NVIDIA A100 80GB PCIe"  # the next GPU type in the preference list
    assert fake.pods[pod_id]["env"]["MEDASR_GIT_REF"] == head
    for text in (up.stdout, up.stderr, (repo / ".medasr" / "pod.json").read_text()):
        assert all(value not in text for value in SECRETS.values()) and KEY not in text

    status = medasr(repo, "status", **api_env)
    assert status.returncode == 0 and f"pod {pod_id}: RUNNING on NVIDIA A100 80GB PCIe" in status.stdout
    logs = medasr(repo, "logs", **api_env)
    assert logs.returncode == 0 and logs.stdout.splitlines() == fake.log_lines
    down = medasr(repo, "down", **api_env)
    assert down.returncode == 0 and fake.pods[pod_id]["status"] == "EXITED"

    wrong = medasr(repo, "status", **(api_env | {"RUNPOD_API_KEY": "rpa_wrong_key"}))
    assert wrong.returncode == 1 and "401 Unauthorized" in wrong.stderr and "rpa_wrong_key" not in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_watch_keeps_trying_when_no_gpu_can_be_placed_for_a_while(fake, dvc_repo):
    api = RunPodAPI(KEY, base_url=fake.url)
    pod = api.create(create_payload(spec(), "NVIDIA H100 PCIe", ENV))["id"]
    fake.set_status(pod, "TERMINATED")  # the pod is gone
    fake.unavailable_gpus = set(spec().gpus)  # and no GPU type has capacity

    def capacity_back():
        fake.unavailable_gpus = set()

    scenario = Scenario([capacity_back, lambda: None, lambda: beat(dvc_repo, "done", state.pod_id)], poll_s=60)
    said: list[str] = []
    state = LaunchState(pod, spec())
    read = lambda run_id: read_status(run_id, dvc_repo)  # noqa: E731
    settings = WatchSettings(backoff_base_s=0)
    code = watch(api, state, read, ENV, settings, scenario.clock, scenario.sleep, said.append)
    assert code == 0, said
    assert any("recovery failed: no GPU type could be placed" in line for line in said)
    assert state.pod_id != pod and state.recoveries == 2
