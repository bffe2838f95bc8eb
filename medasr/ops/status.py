"""The run status runpod.sh publishes for `medasr pod watch|status` on another machine: its heartbeat (one JSON
object: time, state, detail, pod, run) copied to `<remote>/medasr-status/<run id>/status.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medasr.ops.remote import default_remote
from medasr.paths import REMOTE_STATUS, STATUS_FILE


def _status_file(remote: Any, run_id: str) -> str:
    return str(remote.fs.join(remote.path, REMOTE_STATUS, run_id, STATUS_FILE))


def publish_status(heartbeat: Path, run_id: str, repo_root: Path | str = ".") -> None:
    """Upload the loop's heartbeat to the DVC remote, where the watcher reads it."""
    remote = default_remote(repo_root)
    if remote is None:
        raise RuntimeError("no default DVC remote to publish the run status to")
    target = _status_file(remote, run_id)
    remote.fs.makedirs(remote.fs.parent(target), exist_ok=True)
    remote.fs.put_file(str(heartbeat), target)


def read_status(run_id: str, repo_root: Path | str = ".") -> dict[str, Any] | None:
    """The last status runpod.sh published for `run_id`, or None before the first."""
    remote = default_remote(repo_root)
    if remote is None:
        raise RuntimeError("no default DVC remote: run `medasr remote setup` (with the pod's MEDASR_S3_URL)")
    try:
        return json.loads(remote.fs.cat_file(_status_file(remote, run_id)))
    except FileNotFoundError:
        return None
