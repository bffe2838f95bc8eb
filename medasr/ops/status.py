"""The run status runpod.sh publishes for `medasr pod watch|status` on another machine: its heartbeat (one JSON
object: time, state, detail, pod, run; `medasr loop beat` adds step and warning) copied to
`<remote>/medasr-status/<run id>/status.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medasr import MedasrError
from medasr.ops.lease import modified_time
from medasr.ops.remote import default_remote
from medasr.paths import REMOTE_STATUS, STATUS_FILE


def _status_file(run_id: str, repo_root: Path | str) -> tuple[Any, str]:
    """The default remote's filesystem and the path of `run_id`'s status file on it."""
    remote = default_remote(repo_root)
    if remote is None:
        raise MedasrError("no default DVC remote: run `medasr remote setup` (with the pod's MEDASR_S3_URL)")
    return remote.fs, str(remote.fs.join(remote.path, REMOTE_STATUS, run_id, STATUS_FILE))


def publish_status(heartbeat: Path, run_id: str, repo_root: Path | str = ".") -> None:
    """Upload the loop's heartbeat to the DVC remote, where the watcher reads it."""
    fs, target = _status_file(run_id, repo_root)
    fs.makedirs(fs.parent(target), exist_ok=True)
    fs.put_file(str(heartbeat), target)


def read_status(run_id: str, repo_root: Path | str = ".") -> tuple[dict[str, Any], float] | None:
    """(beat, modified): the last status published for `run_id` and the remote object's modification time (epoch s,
    the store's clock), or None before the first. Any other error raises (network, credentials, a garbled object):
    an unreadable heartbeat is not silence."""
    fs, target = _status_file(run_id, repo_root)
    try:
        text = fs.cat_file(target)
        modified = modified_time(fs.info(target, refresh=True))
    except FileNotFoundError:
        return None
    beat = json.loads(text)
    if not isinstance(beat, dict):
        raise ValueError(f"the run status is not a JSON object: {str(beat)[:80]}")
    return beat, modified
