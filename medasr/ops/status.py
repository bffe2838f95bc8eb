"""The run status runpod.sh publishes for `medasr pod watch|status` on another machine: its heartbeat (one JSON
object: time, state, detail, pod, run) copied to `<remote>/medasr-status/<run id>/status.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medasr.ops.remote import default_remote
from medasr.paths import REMOTE_STATUS, STATUS_FILE


def _status_file(run_id: str, repo_root: Path | str) -> tuple[Any, str]:
    """The default remote's filesystem and the path of `run_id`'s status file on it."""
    remote = default_remote(repo_root)
    if remote is None:
        raise RuntimeError("no default DVC remote: run `medasr remote setup` (with the pod's MEDASR_S3_URL)")
    return remote.fs, str(remote.fs.join(remote.path, REMOTE_STATUS, run_id, STATUS_FILE))


def publish_status(heartbeat: Path, run_id: str, repo_root: Path | str = ".") -> None:
    """Upload the loop's heartbeat to the DVC remote, where the watcher reads it."""
    fs, target = _status_file(run_id, repo_root)
    fs.makedirs(fs.parent(target), exist_ok=True)
    fs.put_file(str(heartbeat), target)


def read_status(run_id: str, repo_root: Path | str = ".") -> dict[str, Any] | None:
    """The last status runpod.sh published for `run_id`, or None before the first."""
    fs, target = _status_file(run_id, repo_root)
    try:
        return json.loads(fs.cat_file(target))
    except FileNotFoundError:
        return None
