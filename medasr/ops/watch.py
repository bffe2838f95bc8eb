"""`medasr pod watch`: the controller a pod cannot be for itself. It polls the pod and the heartbeat runpod.sh
publishes to the DVC remote, and when the pod stopped, died or hung before the pipeline finished, it starts,
restarts or recreates it (on the same network volume) with backoff, under a spending cap, until the metrics land.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from medasr.ops.runpod import LaunchState, PodError, RunPodAPI, launch, refused


def decide(pod: dict[str, Any] | None, beat: dict[str, Any] | None, now: float, stale_after_s: float) -> str:
    """What the controller does about an unfinished run: wait, start (a stopped pod), restart (running, but its loop
    has gone silent) or recreate (the pod is gone or broken). Pure, so each case is tested on its own."""
    if pod is None or pod.get("status") in {"TERMINATED", "ERROR"}:
        return "recreate"
    status = pod.get("status")
    if status == "EXITED":
        return "start"
    if status != "RUNNING":
        return "wait"  # PROVISIONING, STARTING
    started = _epoch(pod.get("startedAt")) or now
    last_sign = max(started, float(beat["time"]) if beat and beat.get("pod") in ("", pod["id"]) else 0.0)
    return "restart" if now - last_sign > stale_after_s else "wait"


def _epoch(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else None


@dataclass
class WatchSettings:
    max_usd: float = 50.0
    poll_s: float = 60.0
    stale_after_s: float = 2700.0  # the loop publishes every minute; a fresh volume's install takes ~10 min
    max_recoveries: int = 10
    backoff_base_s: float = 30.0
    backoff_max_s: float = 900.0


def watch(
    api: RunPodAPI,
    state: LaunchState,
    read_beat: Callable[[str], dict[str, Any] | None],
    environ: dict[str, str],
    settings: WatchSettings,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] = print,
) -> int:
    """Keep the run's pod alive until runpod.sh reports `done` (0), `gave up` (1), or the spending cap or the
    recovery limit is reached (1; the pod is stopped). Spend is the pod's hourly cost over the time seen running."""
    last_poll = clock()
    not_before = 0.0  # backoff: no recovery action before this time
    while True:
        now = clock()
        try:
            pod = api.get(state.pod_id)
        except PodError as exc:  # RunPod's API briefly unreachable: keep watching; a refused key ends it
            if refused(exc):
                raise
            say(f"warning: {exc}")
            sleep(settings.poll_s)
            continue
        running = bool(pod and pod.get("status") == "RUNNING")
        if pod and running:
            state.spent_usd += float(pod.get("cost") or 0.0) * (now - last_poll) / 3600
        last_poll = now
        beat = read_beat(state.spec.run_id)
        state.save()
        if verdict := _verdict(beat, state, settings):
            if running:
                api.action(state.pod_id, "stop")
            say(verdict[1])
            return verdict[0]
        action = decide(pod, beat, now, settings.stale_after_s)
        if action != "wait" and now >= not_before:
            if state.recoveries >= settings.max_recoveries:
                say(f"gave up after {state.recoveries} recoveries; the pod is left as it is")
                return 1
            state.recoveries += 1
            say(f"pod {state.pod_id} is {pod.get('status') if pod else 'gone'}: {action} ({state.recoveries})")
            try:
                _recover(api, state, action, environ, say)
            except PodError as exc:  # e.g. no GPU type has capacity right now: try again after the backoff
                if refused(exc):
                    raise
                say(f"recovery failed: {exc}")
            state.save()
            cap = min(settings.backoff_max_s, settings.backoff_base_s * 2**state.recoveries)
            not_before = clock() + random.uniform(0, cap)  # full jitter
        sleep(settings.poll_s)


def _verdict(beat: dict[str, Any] | None, state: LaunchState, settings: WatchSettings) -> tuple[int, str] | None:
    """Whether the watch ends now (exit code, message): the run finished, gave up, or hit the spending cap."""
    if beat and beat.get("state") == "done":
        return 0, f"pipeline finished; spent ~${state.spent_usd:.2f}. Results: `dvc pull` then `dvc metrics show`"
    if beat and beat.get("state") == "gave up":
        return 1, f"runpod.sh gave up: {beat.get('detail', '')} (logs: `medasr pod logs`); not restarting it"
    if state.spent_usd >= settings.max_usd:
        return 1, f"spending cap reached (~${state.spent_usd:.2f} of ${settings.max_usd:.2f}): pod stopped"
    return None


def _recover(api: RunPodAPI, state: LaunchState, action: str, environ: dict[str, str], say: Callable) -> None:
    if action in ("start", "restart"):
        try:
            api.action(state.pod_id, action)
            return
        except PodError as exc:  # e.g. the stopped pod's machine has no free GPU now
            say(f"could not {action} pod {state.pod_id} ({exc}); recreating it")
    if api.get(state.pod_id) is not None:
        try:
            api.action(state.pod_id, "terminate")  # the network volume is kept; the pod's own disk is expendable
        except PodError as exc:
            say(f"could not terminate pod {state.pod_id}: {exc}")
    pod = launch(api, state.spec, environ)
    state.pod_id = pod["id"]
    say(f"recreated as pod {state.pod_id}")
