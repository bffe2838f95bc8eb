"""The heartbeat and the watcher together: the real runpod.sh (install and preflight included) on a checkout whose
DVC remote is a local S3 server, its pipeline replaced by a 20 s command (MEDASR_CHILD), publishing every second;
`medasr pod watch`'s loop in this process against the fake RunPod API, reading that heartbeat from the remote."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fake_runpod import FakeRunPod
from helpers import CREDENTIALS, wait_for
from test_runpod_pipeline import pod_checkout, runpod

from medasr.ops.podstate import LaunchState
from medasr.ops.runpod import PodSpec, RunPodAPI, create_payload
from medasr.ops.status import read_status
from medasr.ops.watch import WatchSettings, watch

KEY = "rpa_heartbeat_test_key_0123"
SCALE = 16.0  # the watcher's clock runs 16 times faster than the real one: 15 real s cover three staleness limits
STALE_S = 80.0  # its staleness limit, on that clock: 5 real seconds without a new heartbeat


class Done(Exception):
    """Ends a watcher that never sees an ending of its own (its heartbeat reads all fail)."""


@pytest.mark.e2e  # preflight runs `medasr doctor`, which imports torch
def test_a_live_heartbeat_keeps_the_watcher_from_restarting_a_healthy_pod(tmp_path, s3, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the watchers keep their state in .medasr/pod.json
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    fake = FakeRunPod(KEY)
    api = RunPodAPI(KEY, base_url=fake.url)
    spec = PodSpec(name="medasr", repo_url="https://example.invalid/medasr.git", git_ref="abc123", run_id="default")
    pod = api.create(create_payload(spec, "NVIDIA H100 PCIe", {}))["id"]
    repo = pod_checkout(tmp_path / "pod")
    child = "for i in $(seq 20); do echo step $i; sleep 1; done"
    proc = runpod(
        repo,
        tmp_path / "work",
        s3,
        "--once",
        MEDASR_S3_URL=f"s3://{s3.bucket}/pipeline",
        MEDASR_CHILD=child,
        MEDASR_STATUS_EVERY_S="1",
        RUNPOD_POD_ID=pod,
    )
    key = "pipeline/medasr-status/default/status.json"

    def status() -> dict | None:
        try:
            return json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
        except Exception:
            return None

    seen: list[dict] = []
    watched: dict[str, object] = {}
    finished = threading.Event()
    t0 = time.time()

    def clock() -> float:
        return t0 + (time.time() - t0) * SCALE

    def run_watcher(name: str, read_beat, sleep) -> None:
        times: list[float] = []

        def timed() -> float:
            times.append(clock())
            return times[-1]

        try:
            settings = WatchSettings(poll_s=1, stale_after_s=STALE_S, retry_s=0.1)
            watched[name] = watch(api, LaunchState(pod, spec), read_beat, {}, settings, timed, sleep, lambda _: None)
        except Done:
            watched[name] = "ended by the test"
        except Exception as exc:  # the assertion below shows it
            watched[name] = exc
        watched[f"{name} span"] = times[-1] - times[0] if times else 0.0

    def failing_read(run_id: str):
        raise PermissionError("ExpiredToken: the laptop's credentials expired")

    def sleep_until_finished(seconds: float) -> None:
        if finished.wait(seconds):
            raise Done

    try:
        wait_for(lambda: (beat := status()) is not None and beat["state"] == "running", proc, 300, "a heartbeat")
        watchers = [
            threading.Thread(target=run_watcher, args=("reads", lambda r: read_status(r, repo), time.sleep)),
            threading.Thread(target=run_watcher, args=("fails", failing_read, sleep_until_finished)),
        ]
        for thread in watchers:
            thread.start()
        while proc.poll() is None:
            if (beat := status()) is not None and beat not in seen:
                seen.append(beat)
            time.sleep(0.25)  # beats are at least 1 s apart
        out = proc.stdout.read()
        assert proc.returncode == 0, out[-4000:]
        if (beat := status()) not in seen:
            seen.append(beat)
        watchers[0].join(timeout=60)
        finished.set()
        watchers[1].join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        finished.set()
        fake.close()

    running = [b for b in seen if b["state"] == "running"]
    assert seen[-1]["state"] == "done" and all(b["state"] == "running" for b in seen[:-1]), seen
    assert len(running) >= 10, (
        f"only {len(running)} running statuses reached the remote: {[b.get('time') for b in running]}"
    )
    assert all(b["pod"] == pod and b["run"] == "default" and "step" in b for b in running)
    assert watched["reads"] == 0, watched  # it saw "done"
    assert watched["fails"] == "ended by the test", watched
    assert watched["reads span"] >= 3 * STALE_S and watched["fails span"] >= 3 * STALE_S, watched
    # neither watcher restarted, started or recreated the pod: the only action is the stop after "done"
    assert fake.bodies("POST", r"/v2/pods/[^/]+/action") == [{"action": "stop"}]
    assert len(fake.bodies("POST", r"/v2/pods")) == 1
