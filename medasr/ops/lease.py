"""The lease: which pod may run the pipeline against this DVC remote. One per remote, since every pod of the project
shares its checkpoints there: a JSON object {pod, host, pid, pid_started, run, ttl_s, taken} at
`<remote>/medasr-status/lease.json`. runpod.sh takes it before each attempt and renews it with each heartbeat
(`medasr loop lease take`, `medasr loop beat --lease`); `medasr pod up|watch` read it. A bare `dvc repro` takes none.

Expiry is the remote object's modification time (the store's clock) plus the holder's `ttl_s`, against the reader's
clock: never a time the holder wrote. S3 has no compare-and-swap, so a taker writes, waits MEDASR_LEASE_SETTLE_S and
reads again, and whoever then finds another's lease backs off. That holds only while every taker's own read-to-written
time is under the settle time (a rival whose slow PUT lands after our re-read was slower than that): a taker that was
slower claims nothing and removes its write (exit 1, try again). A renewal reads before it writes, and counts as one
only when its write landed before the lease it read expired. Any read error but "not found" raises: an unreadable
lease is never taken for a free one.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from medasr import MedasrError
from medasr.ops.remote import default_remote
from medasr.paths import LEASE_FILE, REMOTE_STATUS

TTL_S = 900.0  # MEDASR_LEASE_TTL_S: a holder silent this long (no heartbeat reached the remote) has lost it
# MEDASR_LEASE_SETTLE_S: a taker whose read-to-written time exceeds it claims nothing; botocore retries a PUT for
# ~8 s, so a throttled store still takes the lease at the first try
SETTLE_S = 20.0
# The loop's pid, exported by runpod.sh ($$): the lease commands run in its children and background subshells.
PID_ENV = "MEDASR_LEASE_PID"

Lease = dict[str, Any]


@dataclass(frozen=True)
class Holder:
    """Who takes or renews the lease: this pod, this machine, and the loop process on it."""

    pod: str
    host: str
    pid: int
    pid_started: float | None  # the process's start time: a reused pid is not the holder
    run: str

    def holds(self, lease: Lease) -> bool:
        started = lease.get("pid_started")
        return (
            lease.get("pod") == self.pod
            and lease.get("host") == self.host
            and lease.get("pid") == self.pid
            and (started is None or self.pid_started is None or abs(float(started) - self.pid_started) < 1.0)
        )


class LeaseHeld(MedasrError):
    """Another live holder has the lease: retrying cannot help this pod (exit 2)."""

    def __init__(self, lease: Lease, expires_in: float) -> None:
        self.lease, self.expires_in = lease, expires_in
        super().__init__(f"lease held by {describe(lease, expires_in)}")


def describe(lease: Lease, expires_in: float | None = None) -> str:
    """`pod X (host H, pid P)`, with `, expires in N s` when given."""
    when = f", expires in {max(0, round(expires_in))} s" if expires_in is not None else ""
    return f"pod {lease.get('pod') or '?'} (host {lease.get('host') or '?'}, pid {lease.get('pid', '?')}){when}"


def process_started(pid: int) -> float | None:
    """When process `pid` of this machine started (epoch s), None when there is no such process."""
    import psutil  # a DVC dependency

    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except (psutil.Error, ValueError):
        return None


def process_alive(pid: Any, started: Any) -> bool:
    """Process `pid` of this machine runs, and is the one that started at `started` (when known)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    now_started = process_started(pid)
    if now_started is None:
        return False
    return started is None or abs(float(started) - now_started) < 1.0


def whoami(environ: dict[str, str] | None = None) -> Holder:
    env = os.environ if environ is None else environ
    pid = int(env.get(PID_ENV) or os.getppid())
    return Holder(
        pod=env.get("RUNPOD_POD_ID", ""),
        host=socket.gethostname(),
        pid=pid,
        pid_started=process_started(pid),
        run=env.get("MEDASR_RUN_ID", "default"),
    )


def expires_in(lease: Lease, modified: float, now: float) -> float:
    return modified + float(lease.get("ttl_s") or TTL_S) - now


def judge(
    lease: Lease | None, modified: float, now: float, me: Holder, alive: Callable[[Any, Any], bool] = process_alive
) -> tuple[str, str]:
    """(state, why): see lease_state; `why` says what makes a lease reclaimable."""
    if lease is None:
        return "free", "no lease"
    if me.holds(lease):
        return "mine", "held by this loop"
    if expires_in(lease, modified, now) <= 0:
        return "reclaimable", f"expired {round(-expires_in(lease, modified, now))} s ago"
    same_pod = (lease.get("pod") or "") == me.pod  # both "" off RunPod
    if lease.get("host") == me.host:  # a pid means something here only (and only for the same pod: names can clash)
        if same_pod and not alive(lease.get("pid"), lease.get("pid_started")):
            return "reclaimable", "its process on this machine is gone"
    elif me.pod and same_pod:  # a restarted pod's container: the old one and all its processes are gone
        return "reclaimable", "a former container of this pod held it"
    return "held", "held by another live holder"


def lease_state(
    lease: Lease | None, modified: float, now: float, me: Holder, alive: Callable[[Any, Any], bool] = process_alive
) -> str:
    """The lease's state for `me`: "free" (none), "mine" (this loop holds it), "reclaimable" (expired; held by a
    former container of this pod; or held on this machine, for this pod, by a process that is gone) or "held"
    (another live holder, such as a second loop in this container or another pod: keep off). `alive(pid,
    pid_started)` probes this machine's processes."""
    return judge(lease, modified, now, me, alive)[0]


def lease_location(repo_root: Path | str = ".") -> tuple[Any, str]:
    """The default remote's filesystem and the lease's path on it (opens the DVC repository: seconds of CPU)."""
    return _lease_file(repo_root)


def _lease_file(repo_root: Path | str) -> tuple[Any, str]:
    remote = default_remote(repo_root)
    if remote is None:
        raise MedasrError("no default DVC remote: run `medasr remote setup` (with the pod's MEDASR_S3_URL)")
    return remote.fs, str(remote.fs.join(remote.path, REMOTE_STATUS, LEASE_FILE))


def modified_time(info: dict[str, Any]) -> float:
    """A remote object's modification time (epoch s) from its `fs.info`: `mtime` (local), `LastModified` (S3)."""
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str) and value:
            return datetime.fromisoformat(value).timestamp()
    raise MedasrError(f"the DVC remote gives no modification time for {info.get('name')}")


def _read(fs: Any, target: str) -> tuple[Lease, float] | None:
    try:
        text = fs.cat_file(target)
        modified = modified_time(fs.info(target, refresh=True))  # after the read: never older than what was read
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(text)
    except ValueError:
        lease = None
    # an unparseable lease (written by hand, or by another tool) holds until its modification time plus TTL_S
    return (lease if isinstance(lease, dict) else {}), modified


def read_lease(repo_root: Path | str = ".") -> tuple[Lease, float] | None:
    """(lease, modified): the lease on the default DVC remote and its modification time (epoch s, the store's clock),
    or None when there is none. Raises on any other error (network, credentials)."""
    return _read(*_lease_file(repo_root))


def check_lease(
    repo_root: Path | str = ".", me: Holder | None = None, clock: Callable[[], float] = time.time
) -> tuple[str, str]:
    """(state, one line) of the lease for `me` (default: whoami()), as lease_state says; read only. Raises when the
    lease cannot be read."""
    found = read_lease(repo_root)
    if found is None:
        return "free", "lease free: no lease"
    state, why = judge(*found, clock(), me or whoami())
    if state == "held":
        return state, f"lease held by {describe(found[0], expires_in(*found, clock()))}"
    return state, f"lease {state}: {why}"


def _write(fs: Any, target: str, lease: Lease) -> None:
    with tempfile.TemporaryDirectory(prefix="medasr-lease-") as tmp:
        local = Path(tmp) / LEASE_FILE
        local.write_text(json.dumps(lease, sort_keys=True) + "\n")
        fs.makedirs(fs.parent(target), exist_ok=True)
        fs.put_file(str(local), target)


def _env_s(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        raise MedasrError(f"{name} must be a number of seconds, got {os.environ[name]!r}") from None


def take_lease(
    repo_root: Path | str = ".",
    me: Holder | None = None,
    *,
    ttl_s: float | None = None,
    settle_s: float | None = None,
    clock: Callable[[], float] = time.time,
    where: tuple[Any, str] | None = None,
) -> str:
    """Take or renew the lease for `me` (default: whoami()). Returns one line saying what happened; raises LeaseHeld
    when another live holder has it (also when a rival wrote over ours while it settled), MedasrError (try again) when
    reading and writing it took `settle_s` or longer. `where`: (fs, path) from lease_location, to skip opening the
    DVC repository again (a long-lived caller)."""
    me = me or whoami()
    ttl = _env_s("MEDASR_LEASE_TTL_S", TTL_S) if ttl_s is None else ttl_s
    settle = _env_s("MEDASR_LEASE_SETTLE_S", SETTLE_S) if settle_s is None else settle_s
    fs, target = where or _lease_file(repo_root)
    started = time.monotonic()
    found = _read(fs, target)
    lease, modified = found if found is not None else (None, 0.0)
    state, why = judge(lease, modified, clock(), me)
    if state == "held":
        assert lease is not None
        raise LeaseHeld(lease, expires_in(lease, modified, clock()))
    taken = lease.get("taken") if state == "mine" and lease else clock()
    mine = {"pod": me.pod, "host": me.host, "pid": me.pid, "pid_started": me.pid_started, "run": me.run}
    _write(fs, target, mine | {"ttl_s": ttl, "taken": taken})
    gap = time.monotonic() - started
    if state == "mine" and lease and expires_in(lease, modified, clock()) > 0:
        return "lease renewed"  # landed while ours was live: no rival could take it meanwhile
    if gap >= settle:  # our write may have landed over a rival that settled and claimed it: remove it, claim nothing
        again = _read(fs, target)
        if again is not None and me.holds(again[0]):
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(target)
        raise MedasrError(
            f"lease not claimed: reading and writing it took {gap:.1f} s, not under MEDASR_LEASE_SETTLE_S={settle:g} s"
        )
    time.sleep(settle)
    again = _read(fs, target)
    if again is None:
        raise MedasrError("the lease vanished right after it was written (released by another machine?)")
    if not me.holds(again[0]):
        raise LeaseHeld(again[0], expires_in(again[0], again[1], clock()))
    if state != "reclaimable":
        return "lease renewed" if state == "mine" else f"lease taken by {describe(mine)}"
    assert lease is not None
    return f"lease reclaimed from {describe(lease)}: {why}"


def release_lease(repo_root: Path | str = ".", pod_id: str | None = None) -> bool:
    """Remove the lease when pod `pod_id` holds it, or (pod_id None) when this loop (whoami()) does. True when
    removed; False when there was none or another holder has it (left alone). Raises on remote errors."""
    fs, target = _lease_file(repo_root)
    found = _read(fs, target)
    if found is None:
        return False
    lease = found[0]
    if not (lease.get("pod") == pod_id if pod_id is not None else whoami().holds(lease)):
        return False
    with contextlib.suppress(FileNotFoundError):  # gone meanwhile: released all the same
        fs.rm_file(target)
    return True
