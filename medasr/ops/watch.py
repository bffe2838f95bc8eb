"""`medasr pod watch`: the controller a pod cannot be for itself. It polls the run's pods and the heartbeat runpod.sh
publishes to the DVC remote, and when the pod stopped, died or hung before the pipeline finished, it starts,
restarts or recreates it (on the same network volume) with backoff, under a spending cap, until the metrics land.

What it never does: act on a heartbeat it could not read (an expired credential is not a silent pod); compare the
pod's clock with this machine's (a heartbeat is fresh when the remote object changed, timed on this clock); create a
pod before the old one is confirmed terminated; end on a stop RunPod has not confirmed.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medasr.ops.podstate import LaunchState
from medasr.ops.runpod import STOPPED, PodError, RunPodAPI, check_recreate, launch, refused, transient
from medasr.secrets import one_line

Beat = tuple[dict[str, Any], float] | None  # (heartbeat, the remote object's modification time) or none yet


def decide(pod: dict[str, Any] | None, quiet_s: float, stale_after_s: float) -> str:
    """What the controller does about an unfinished run: wait, start (a stopped pod), restart (running, but its
    heartbeat has not changed for `quiet_s` seconds of this machine's clock) or recreate (the pod is gone or broken).
    Pure, so each case is tested on its own."""
    if pod is None or pod.get("status") in {"TERMINATED", "ERROR"}:
        return "recreate"
    status = pod.get("status")
    if status == "EXITED":
        return "start"
    if status != "RUNNING":
        return "wait"  # PROVISIONING, STARTING
    return "restart" if quiet_s > stale_after_s else "wait"


@dataclass
class WatchSettings:
    max_usd: float = 50.0
    poll_s: float = 60.0
    stale_after_s: float = 2700.0  # the loop publishes every minute; a fresh volume's install takes ~10 min
    max_recoveries: int = 10
    backoff_base_s: float = 30.0
    backoff_max_s: float = 900.0
    retry_s: float = 5.0  # a stop or terminate not yet confirmed is tried again after this, doubling
    retry_max_s: float = 120.0
    tries: int = 8  # per stop or terminate, each followed by a GET that must confirm it


def bring_down(
    api: RunPodAPI, pod_id: str, action: str, settings: WatchSettings, sleep: Callable, say: Callable
) -> dict[str, Any] | None:
    """Stop or terminate `pod_id` until RunPod's GET confirms it (stop: EXITED, TERMINATED or gone; terminate:
    TERMINATED or gone), trying again with backoff. A pod in ERROR cannot be stopped: it is terminated (its network
    volume stays). Returns the last GET; PodError when still unconfirmed after `settings.tries`."""
    wait = settings.retry_s
    for attempt in range(settings.tries + 1):
        if attempt:
            sleep(wait)
            wait = min(settings.retry_max_s, 2 * wait)
        try:
            if _done(pod := api.get(pod_id), action):
                return pod
            if attempt < settings.tries:
                api.action(pod_id, "terminate" if pod and pod.get("status") == "ERROR" else action)
                if _done(pod := api.get(pod_id), action):  # RunPod may have done it at once
                    return pod
        except PodError as exc:
            if refused(exc):
                raise
            say(f"warning: {action} pod {pod_id}: {exc}")
    raise PodError(f"pod {pod_id}: {action} not confirmed by RunPod after {settings.tries} tries")


def _done(pod: dict[str, Any] | None, action: str) -> bool:
    status = pod.get("status") if pod else "TERMINATED"
    return status == "TERMINATED" or (action == "stop" and status in STOPPED)


def watch(
    api: RunPodAPI,
    state: LaunchState,
    read_beat: Callable[[str], Beat],
    environ: dict[str, str],
    settings: WatchSettings,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] = print,
    release_lease: Callable[[str], Any] | None = None,
) -> int:
    """Keep the run's pod alive until runpod.sh reports `done` (0), `gave up` (1), or the spending cap or the
    recovery limit is reached (1). Every ending first stops every pod of the run, confirmed by RunPod.
    `read_beat(run_id)`: (heartbeat, the remote object's modification time), None before the first, raising when it
    cannot be read (medasr.ops.status.read_status). `release_lease(pod_id)` frees the remote's lease when a
    terminated pod still holds it."""
    not_before = 0.0  # backoff: no recovery action before this time
    quiet_since, last_mark = clock(), None  # when the tracked pod's heartbeat last changed, on this clock
    ending: tuple[int, str] | None = None
    while True:
        now = clock()
        try:
            pod = _poll_pods(api, state, now)
        except PodError as exc:  # RunPod's API briefly unreachable: keep watching; a refused key ends it
            if refused(exc):
                raise
            say(f"warning: {exc}")
            sleep(settings.poll_s)
            continue
        _drop_extras(api, state, pod, settings, clock, sleep, say, release_lease)
        try:
            beat, modified = read_beat(state.spec.run_id) or (None, None)
            readable = True
        except Exception as exc:  # whatever the remote raised: this poll takes no recovery action
            beat, modified, readable = None, None, False
            say(f"warning: the run status cannot be read ({one_line(exc)}): no recovery this poll")
        if beat is not None and beat.get("pod") not in ("", state.pod_id):
            beat = None  # an earlier pod's: says nothing about this one
        if beat is not None and (mark := (modified, json.dumps(beat, sort_keys=True))) != last_mark:
            quiet_since, last_mark = now, mark
        if not readable or not pod or pod.get("status") != "RUNNING":
            quiet_since = now  # silence counts only while the pod runs and its heartbeat can be read (an outage of
            # the remote silences the pod too: it gets a whole stale_after_s once the remote answers again)
        state.save()
        ending = ending or _verdict(beat, state, settings)
        if ending:
            if _stop_all(api, state, settings, clock, sleep, say):
                say(ending[1])
                return ending[0]
        elif (
            readable
            and now >= not_before
            and (action := decide(pod, now - quiet_since, settings.stale_after_s)) != "wait"
        ):
            if state.recoveries >= settings.max_recoveries:
                ending = 1, f"gave up after {state.recoveries} recoveries; every pod of the run is stopped"
                continue
            else:
                state.recoveries += 1
                say(f"pod {state.pod_id} is {pod.get('status') if pod else 'gone'}: {action} ({state.recoveries})")
                try:
                    _recover(api, state, action, environ, settings, clock, sleep, say, release_lease)
                    quiet_since = clock()
                except PodError as exc:  # e.g. no GPU type has capacity, a 502: try again after the backoff
                    if refused(exc):
                        raise
                    say(f"recovery failed: {exc}")
                state.save()
                cap = min(settings.backoff_max_s, settings.backoff_base_s * 2**state.recoveries)
                not_before = clock() + random.uniform(0, cap)  # full jitter
        sleep(settings.poll_s)


def _poll_pods(api: RunPodAPI, state: LaunchState, now: float) -> dict[str, Any] | None:
    """List the run's pods (an orphan joins the state, see LaunchState.add_listed), GET every pod of the run not known
    terminated, and account for its cost; the tracked pod's answer."""
    state.add_listed(api, now)
    tracked = None
    for pod_id in state.ids():
        pod = api.get(pod_id)
        state.observe(pod_id, pod, now)
        if pod_id == state.pod_id:
            tracked = pod
    return tracked


def _verdict(beat: dict[str, Any] | None, state: LaunchState, settings: WatchSettings) -> tuple[int, str] | None:
    """Whether the watch ends now (exit code, message): the run finished, gave up, or hit the spending cap."""
    if beat and beat.get("state") == "done":
        return 0, f"pipeline finished; spent ~${state.spent_usd:.2f}. Results: `dvc pull` then `dvc metrics show`"
    if beat and beat.get("state") == "gave up":
        return 1, f"runpod.sh gave up: {beat.get('detail', '')} (logs: `medasr pod logs`); its pod is stopped"
    if state.spent_usd >= settings.max_usd:
        return 1, f"spending cap reached (~${state.spent_usd:.2f} of ${settings.max_usd:.2f}): every pod stopped"
    return None


def _stop_all(
    api: RunPodAPI, state: LaunchState, settings: WatchSettings, clock: Callable, sleep: Callable, say: Callable
) -> bool:
    """Stop every pod of the run, each confirmed by RunPod, each tried even when another was not (one pod that cannot
    be stopped must not keep the others billing); False (after saying why) when one is not yet."""
    stopped = True
    for pod_id in state.ids():
        stopped &= _bring_down_observed(api, state, pod_id, "stop", settings, clock, sleep, say, "trying again")
    return stopped


def _bring_down_observed(
    api: RunPodAPI,
    state: LaunchState,
    pod_id: str,
    action: str,
    settings: WatchSettings,
    clock: Callable,
    sleep: Callable,
    say: Callable,
    retry_note: str,
) -> bool:
    """`bring_down` one pod and record what RunPod confirmed; False (after a warning) when it could not be done now.
    A refused key raises: no retry can help. The state is saved either way."""
    try:
        state.observe(pod_id, bring_down(api, pod_id, action, settings, sleep, say), clock())
        return True
    except PodError as exc:
        if refused(exc):
            raise
        say(f"warning: {exc}; {retry_note}")
        return False
    finally:
        state.save()


def _drop_extras(
    api: RunPodAPI,
    state: LaunchState,
    tracked: dict[str, Any] | None,
    settings: WatchSettings,
    clock: Callable,
    sleep: Callable,
    say: Callable,
    release_lease: Callable[[str], Any] | None,
) -> None:
    """Terminate (confirmed) every other pod of the run while the tracked one lives: one pod runs a run. Without a
    tracked pod the next recreate takes a listed one instead (runpod.launch)."""
    if not tracked or tracked.get("status") == "TERMINATED":
        return
    for extra in [pod_id for pod_id in state.live() if pod_id != state.pod_id]:
        say(f"pod {extra} of the run is alive beside pod {state.pod_id}: terminating it")
        note = "trying again at the next poll"
        if _bring_down_observed(api, state, extra, "terminate", settings, clock, sleep, say, note):
            _release(extra, release_lease, say)


def _release(pod_id: str, release_lease: Callable[[str], Any] | None, say: Callable) -> None:
    if release_lease is not None:
        try:
            if release_lease(pod_id):
                say(f"released the lease terminated pod {pod_id} held")
        except Exception as exc:  # the next pod waits for its expiry instead
            say(f"warning: could not release pod {pod_id}'s lease ({one_line(exc)}); it expires by itself")


def _recover(
    api: RunPodAPI,
    state: LaunchState,
    action: str,
    environ: dict[str, str],
    settings: WatchSettings,
    clock: Callable,
    sleep: Callable,
    say: Callable,
    release_lease: Callable[[str], Any] | None,
) -> None:
    if action in ("start", "restart"):
        try:
            api.action(state.pod_id, action)
            return
        except PodError as exc:  # a 4xx, e.g. the stopped pod's machine has no free GPU now; a 5xx is tried again
            if transient(exc):
                raise
            say(f"could not {action} pod {state.pod_id} ({exc}); recreating it")
    check_recreate(state.spec, environ)  # before the old pod is touched
    if old := state.pod_id:  # none when `pod up` died before its create answered, and no pod of the run is listed
        state.observe(old, bring_down(api, old, "terminate", settings, sleep, say), clock())
        state.save()
        _release(old, release_lease, say)
    pod = launch(api, state.spec, environ)
    state.pod_id = pod["id"]
    state.observe(pod["id"], pod, clock())
    say(f"recreated as pod {state.pod_id}")
