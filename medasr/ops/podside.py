"""What runpod.sh asks on the pod between attempts (`medasr loop ...`): how far the run got (the last complete local
checkpoint step, the stages DVC finished), whether the pod's own deadline or budget is reached, and stopping the
pod so that money stops even when `runpodctl` fails. Plain file and HTTP work: these run every few seconds, so
nothing here imports torch, NeMo or the stages.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from medasr import MedasrError
from medasr.files import write_json_atomic
from medasr.ops.lease import LeaseHeld, lease_location, process_alive, take_lease, whoami
from medasr.ops.status import _status_file
from medasr.paths import (
    CHECKPOINT_META,
    CHECKPOINT_ROOT,
    POD_CLOCK_DIR,
    STAGE_PIDFILE_ENV,
    STATUS_FILE,
    VALIDATION_STATUS,
    aside_of,
)
from medasr.secrets import REDACTED, SECRETS, one_line

DVC_LOCK = Path("dvc.lock")


# --- progress -------------------------------------------------------------------------------------------------------
def last_step(ckpt_root: Path = CHECKPOINT_ROOT) -> int | None:
    """The step of the newest complete local checkpoint (`<fingerprint>/step-NNNNNNNN/` with its meta.json, which is
    written last), over every run folder but those moved aside; None when there is none."""
    found = []
    for meta in ckpt_root.glob(f"*/step-*/{CHECKPOINT_META}"):
        if aside_of(meta.parent.parent.name) is not None:
            continue
        try:
            found.append((meta.stat().st_mtime, int(meta.parent.name.removeprefix("step-"))))
        except (OSError, ValueError):  # removed by rotation meanwhile, or not a step folder
            continue
    return max(found)[1] if found else None


def validation_warning(ckpt_root: Path = CHECKPOINT_ROOT) -> str | None:
    """The warning of the running training's last validation (a WER markedly worse than its best so far), or None:
    none yet, or that validation was fine. Only shown: a worse WER is no failure, so nothing acts on it."""
    try:
        warning = json.loads((ckpt_root / VALIDATION_STATUS).read_text()).get("warning")
    except (OSError, ValueError, AttributeError):  # none yet (or not ours): the next beat reads it again
        return None
    return str(warning) if warning else None


def progress_token(ckpt_root: Path = CHECKPOINT_ROOT, lock: Path = DVC_LOCK) -> str:
    """One token that changes whenever the run progressed: a newer checkpoint step, or a stage DVC finished."""
    step = last_step(ckpt_root)
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()[:12] if lock.is_file() else "none"
    return f"step={'none' if step is None else step} lock={digest}"


def error_line(exc: BaseException) -> str:
    """One line for an error: ours as worded, any other redacted of secrets."""
    return str(exc) if isinstance(exc, MedasrError) else one_line(exc)


# --- the heartbeat ----------------------------------------------------------------------------------------------------
class Beater:
    """Publishes runpod.sh's heartbeat file, with the last complete checkpoint step and the last validation's warning
    added (`step`, `warning`), as the run status; with a lease, renews this loop's lease first, so a pod that lost it
    publishes nothing over the new holder's status. The remote is opened once (a DVC Repo costs seconds of CPU), so
    `medasr loop beat --every` pays only S3 requests per beat; lease reads ask the store each time
    (info(refresh=True)), never s3fs's listing cache."""

    def __init__(self, heartbeat: Path, run_id: str, lease: bool, repo_root: Path | str = ".") -> None:
        self.heartbeat, self.run_id, self.repo_root = heartbeat, run_id, repo_root
        self.me = whoami() if lease else None
        self._where: tuple[tuple[Any, str], tuple[Any, str]] | None = None

    def beat(self) -> list[str]:
        """One beat; returns its problems, one line each (the next beat tries again: the lease's TTL covers a few).
        Raises LeaseHeld, having published nothing, when another live holder has the lease."""
        try:
            status = json.loads(self.heartbeat.read_text()) | {"step": last_step(), "warning": validation_warning()}
        except (OSError, ValueError, TypeError) as exc:  # runpod.sh rewrites it: read again at the next beat
            return [f"heartbeat {self.heartbeat} unreadable: {error_line(exc)}"]
        try:
            if self._where is None:
                self._where = _status_file(self.run_id, self.repo_root), lease_location(self.repo_root)
        except Exception as exc:
            return [f"could not publish the run status: {error_line(exc)}"]
        (fs, target), lease_at = self._where
        problems = []
        if self.me is not None:
            try:
                take_lease(self.repo_root, self.me, where=lease_at)
            except LeaseHeld:
                raise
            except Exception as exc:
                problems.append(f"could not renew the lease: {error_line(exc)}")
        try:
            with tempfile.TemporaryDirectory(prefix="medasr-beat-") as tmp:
                (Path(tmp) / STATUS_FILE).write_text(json.dumps(status))
                fs.makedirs(fs.parent(target), exist_ok=True)
                fs.put_file(str(Path(tmp) / STATUS_FILE), target)
        except Exception as exc:
            problems.append(f"could not publish the run status: {error_line(exc)}")
        return problems


# --- the pod's own deadline and budget --------------------------------------------------------------------------------
def _number(environ: dict[str, str], name: str) -> float | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{name} must be a positive number, got {text!r}")
    return value


def workdir(environ: dict[str, str]) -> Path:
    """$MEDASR_WORKDIR: the volume on a pod (as `medasr remote setup` chooses it)."""
    found = environ.get("MEDASR_WORKDIR") or ("/workspace" if Path("/workspace").is_dir() else None)
    return Path(found) if found else Path.home() / ".cache" / "medasr"


def _started_at(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() if text else None
    except ValueError:
        return None


def pod_clock(pod_id: str, api: Any, clock_file: Path, now: float) -> tuple[float, float | None, str | None]:
    """(start, hourly cost or None, warning or None) of pod `pod_id`. The start is the earliest of RunPod's
    `startedAt` (its last start) and the first time this volume saw the pod, so a stop and start does not reset
    the clock; the cost is RunPod's, else the last one seen. The file keeps both for when the API cannot be read."""
    try:
        kept = json.loads(clock_file.read_text())
        start, cost = float(kept["start"]), None if kept.get("cost_per_h") is None else float(kept["cost_per_h"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet (or unusable): first seen now
        kept, start, cost = {}, now, None
    warning = None
    try:
        pod = api.get(pod_id) if api is not None else None
        if api is None:
            warning = "RUNPOD_API_KEY unset"
        elif pod is None:
            warning = f"RunPod does not know pod {pod_id}"
        else:
            start = min(start, _started_at(pod.get("startedAt")) or start)
            cost = float(pod["cost"]) if float(pod.get("cost") or 0) > 0 else cost
    except Exception as exc:  # the API is the better source, not a required one
        warning = one_line(exc)
    if kept != {"start": start, "cost_per_h": cost}:
        try:
            write_json_atomic(clock_file, {"start": start, "cost_per_h": cost})
        except OSError as exc:  # judged all the same; only the fallback for a later call is lost
            warning = (f"{warning}; " if warning else "") + f"{clock_file} not written: {one_line(exc)}"
    return start, cost, warning


def budget_verdict(
    start: float, cost_per_h: float | None, now: float, deadline_h: float | None, max_usd: float | None
) -> tuple[bool, str]:
    """(reached, one line) for a pod up since `start` at `cost_per_h` USD/h (None: unknown)."""
    hours = max(0.0, now - start) / 3600
    if deadline_h is not None and hours >= deadline_h:
        return True, f"deadline reached: the pod has been up {hours:.2f} h, MEDASR_DEADLINE_H={deadline_h:g}"
    spent = hours * cost_per_h if cost_per_h is not None else None
    if max_usd is not None and spent is not None and spent >= max_usd:
        return True, (
            f"budget reached: ~${spent:.2f} spent ({hours:.2f} h at ${cost_per_h:.2f}/h), MEDASR_MAX_USD={max_usd:g}"
        )
    parts = [f"up {hours:.2f} h" + (f" of {deadline_h:g}" if deadline_h is not None else "")]
    if max_usd is not None:
        parts.append(f"~${spent:.2f} of ${max_usd:g}" if spent is not None else "cost unknown")
    return False, "budget: " + ", ".join(parts)


def check_budget(environ: dict[str, str], now: float | None = None, api: Any = ...) -> tuple[int, str | None]:
    """(0, line) within budget or off; (2, line) deadline or budget reached. Raises ValueError on a bad setting."""
    pod_id = environ.get("RUNPOD_POD_ID", "")
    deadline_h, max_usd = _number(environ, "MEDASR_DEADLINE_H"), _number(environ, "MEDASR_MAX_USD")
    if not pod_id or (deadline_h is None and max_usd is None):
        return 0, None
    if api is ...:
        from medasr.ops.runpod import RunPodAPI

        key = environ.get("RUNPOD_API_KEY", "")
        api = RunPodAPI(key, base_url=environ.get("MEDASR_RUNPOD_API_URL"), timeout_s=15) if key else None
    now = time.time() if now is None else now
    clock_file = workdir(environ) / POD_CLOCK_DIR / f"{pod_id}.json"
    start, cost, warning = pod_clock(pod_id, api, clock_file, now)
    reached, line = budget_verdict(start, cost, now, deadline_h, max_usd)
    if warning and not reached:
        line += f" (RunPod API not read: {warning}; start as first seen here, last cost seen)"
    return (2 if reached else 0), line


# --- stopping the pod ------------------------------------------------------------------------------------------------
def _retry(what: Callable[[], None], tries: int, backoff_s: float) -> str | None:
    """Call `what` up to `tries` times, waiting backoff_s, 2*backoff_s, ... between; None on success, else the last
    error as one line."""
    error = None
    for attempt in range(max(1, tries)):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            what()
            return None
        except Exception as exc:
            error = one_line(exc)
    return error


def stop_pod(environ: dict[str, str], api: Any = ...) -> tuple[bool, str]:
    """Stop this pod: `runpodctl stop pod` with retries, then RunPod's REST API with retries. (stopped, one line);
    not on a pod (RUNPOD_POD_ID unset) counts as stopped. Neither the line nor anything logged holds a secret."""
    pod_id = environ.get("RUNPOD_POD_ID", "")
    if not pod_id:
        return True, "not on a RunPod pod (RUNPOD_POD_ID unset): nothing to stop"
    try:  # a typo in a setting must not keep the pod running
        tries = int(environ.get("MEDASR_STOP_RETRIES") or 4)
        backoff = float(environ.get("MEDASR_STOP_BACKOFF_S") or 5)
    except ValueError:
        tries, backoff = 4, 5.0

    def runpodctl() -> None:
        done = subprocess.run(
            ["runpodctl", "stop", "pod", pod_id], capture_output=True, text=True, timeout=120, env=environ
        )
        if done.returncode != 0:  # what a tool we run prints is not ours to trust: no secret value passes
            said = (done.stderr or done.stdout).strip()[-200:]
            for value in filter(None, (environ.get(name, "") for name in SECRETS)):
                said = said.replace(value, REDACTED)
            raise RuntimeError(f"exit {done.returncode}: {said}")

    installed = shutil.which("runpodctl", path=environ.get("PATH")) is not None
    ctl_error = _retry(runpodctl, tries, backoff) if installed else "not installed"
    if ctl_error is None:
        return True, f"stopped pod {pod_id} (runpodctl)"
    if api is ...:
        from medasr.ops.runpod import RunPodAPI

        key = environ.get("RUNPOD_API_KEY", "")
        api = RunPodAPI(key, base_url=environ.get("MEDASR_RUNPOD_API_URL"), timeout_s=30) if key else None
    if api is None:
        return False, f"could not stop pod {pod_id}: runpodctl: {ctl_error}; RunPod API: RUNPOD_API_KEY unset"
    api_error = _retry(lambda: api.action(pod_id, "stop"), tries, backoff)
    if api_error is None:
        return True, f"stopped pod {pod_id} through RunPod's API (runpodctl failed: {ctl_error})"
    return False, f"could not stop pod {pod_id}: runpodctl: {ctl_error}; RunPod API: {api_error}"


def stage_running(environ: dict[str, str] | None = None) -> int | None:
    """The pid of the stage process runpod.sh's pidfile ($MEDASR_STAGE_PIDFILE) names, when it still runs."""
    env = os.environ if environ is None else environ
    path = env.get(STAGE_PIDFILE_ENV, "")
    try:
        pid = int(Path(path).read_text().split()[0]) if path else 0
    except (OSError, ValueError, IndexError):
        return None
    return pid if process_alive(pid, None) else None
