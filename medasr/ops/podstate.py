"""What this checkout knows about the run it launched, in `.medasr/pod.json` (git-ignored, no secrets): the pod it
uses now, its settings (PodSpec: a recreated pod gets what `pod up` sent), and every pod the run created with what
each has cost as seen from this machine, so spend covers them all, orphans and the gaps between two `watch`es too.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from medasr.files import write_json_atomic
from medasr.ops.runpod import STOPPED, PodError, PodSpec, RunPodAPI
from medasr.paths import POD_STATE
from medasr.secrets import one_line


@dataclass
class PodRecord:
    """One pod the run created, as this machine saw it (times: this machine's clock, epoch s)."""

    id: str
    first_seen: float
    last_seen: float
    cost_per_hour: float = 0.0  # the highest seen: RunPod reports 0.0 while a pod is stopped
    billing: bool = True  # last seen in a status that bills: assumed to bill until seen otherwise
    ended: bool = False  # terminated: bills nothing more
    spent_usd: float = 0.0


@dataclass
class LaunchState:
    pod_id: str  # the pod the run uses now
    spec: PodSpec
    recoveries: int = 0
    pods: list[PodRecord] = field(default_factory=list)  # every pod the run created, in the order seen

    @property
    def spent_usd(self) -> float:
        return sum(p.spent_usd for p in self.pods)

    def live(self) -> list[str]:
        """The run's pods not known to be terminated."""
        return [p.id for p in self.pods if not p.ended]

    def ids(self) -> list[str]:
        """The run's pods not known to be terminated, and the tracked one (none while `pod up` has not seen its
        create answered)."""
        return [pod_id for pod_id in dict.fromkeys([*self.live(), self.pod_id]) if pod_id]

    def add_listed(self, api: RunPodAPI, now: float) -> None:
        """Add the run's pods RunPod lists (not terminated, env MEDASR_RUN_ID) that this state does not know: made by
        a create whose answer was lost (and not listed yet when `launch` looked), or by a `pod up` that died before
        saving it. Each is counted from its creation, and the first is tracked when no pod is."""
        for pod in api.find(self.spec.run_id):
            if pod["id"] not in {p.id for p in self.pods}:
                self.pods.append(PodRecord(pod["id"], first_seen=now, last_seen=min(now, _created(pod) or now)))
                self.observe(pod["id"], pod, now)
            self.pod_id = self.pod_id or pod["id"]

    def observe(self, pod_id: str, pod: dict[str, Any] | None, now: float) -> None:
        """Account for what a GET answered about `pod_id` at `now`: a pod last seen billing bills until now, at the
        highest hourly cost seen (the laptop asleep, or between two `watch`es, included)."""
        record = next((p for p in self.pods if p.id == pod_id), None)
        if record is None:
            record = PodRecord(pod_id, first_seen=now, last_seen=now)
            self.pods.append(record)
        record.cost_per_hour = max(record.cost_per_hour, float((pod or {}).get("cost") or 0.0))
        if record.billing and not record.ended:
            record.spent_usd += record.cost_per_hour * max(0.0, now - record.last_seen) / 3600
        status = pod.get("status") if pod else "TERMINATED"
        record.last_seen, record.billing, record.ended = now, status not in STOPPED, status == "TERMINATED"

    def save(self, path: Path = POD_STATE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path = POD_STATE) -> LaunchState:
        if not path.is_file():
            raise PodError(f"no pod launched from this checkout ({path} missing): run `medasr pod up` first")
        try:
            data = json.loads(path.read_text())
            spent = float(data.pop("spent_usd", 0.0))  # a state file from before `pods`: its spend, on its pod
            pods = [PodRecord(**p) for p in (data.pop("pods") if "pods" in data else [_first(data["pod_id"], spent)])]
            return cls(**(data | {"spec": PodSpec(**data["spec"]), "pods": pods}))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise PodError(
                f"{path} is unreadable ({type(exc).__name__}): check RunPod's console for this run's pod, then "
                "remove the file"
            ) from None


def _created(pod: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(pod.get("createdAt")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _first(pod_id: str, spent_usd: float) -> dict[str, Any]:
    now = time.time()
    return asdict(PodRecord(pod_id, first_seen=now, last_seen=now, spent_usd=spent_usd))


def clear_to_launch(
    api: RunPodAPI, say: Callable[[str], None], repo_root: Path | str = ".", path: Path = POD_STATE
) -> None:
    """PodError with one line when a new run must not start (previous_pod, lease_holder). A lease that cannot be read
    is only a warning: the pod checks the lease itself before it trains."""
    if problem := previous_pod(api, path):
        raise PodError(problem)
    try:
        problem = lease_holder(api, repo_root)
    except PodError:
        raise
    except Exception as exc:
        say(f"warning: the remote's lease cannot be read ({one_line(exc)}); the pod checks it itself")
    if problem:
        raise PodError(problem)


def previous_pod(api: RunPodAPI, path: Path = POD_STATE) -> str | None:
    """Why `pod up` must not start a new run: a pod of the run in `path` (or listed for it) that RunPod still knows
    (not TERMINATED). An unreadable state file raises PodError: it may name a pod that still runs."""
    if not path.is_file():
        return None
    state = LaunchState.load(path)
    state.add_listed(api, time.time())
    for pod_id in state.ids():
        pod = api.get(pod_id)
        if pod and pod.get("status") != "TERMINATED":
            return (
                f"pod {pod_id} of run {state.spec.run_id} is {pod.get('status')}: `medasr pod down --terminate` "
                "first, or `medasr pod watch` to go on with that run"
            )
    return None


def lease_holder(api: RunPodAPI, repo_root: Path | str = ".") -> str | None:
    """Why `pod up` must not start a pod: the remote's lease is held by a live holder. A lease whose pod RunPod says
    is terminated is released here. Raises whatever reading the remote raises."""
    from medasr.ops.lease import Holder, describe, expires_in, lease_state, read_lease, release_lease

    found = read_lease(repo_root)
    if found is None:
        return None
    lease, modified = found
    me = Holder(pod="", host=socket.gethostname(), pid=os.getpid(), pid_started=None, run="")
    if lease_state(lease, modified, time.time(), me) != "held":
        return None
    holder = str(lease.get("pod") or "")
    pod = api.get(holder) if holder else {}
    if pod is None or pod.get("status") == "TERMINATED":
        release_lease(repo_root, pod_id=holder)
        return None
    left = expires_in(lease, modified, time.time())
    return f"the remote's lease is held by {describe(lease, left)}: one pod per remote"
