"""Live checkpoint mirroring to the DVC default remote, so a training survives the loss of its machine.

DVC cannot push a stage's outputs while the stage runs, so the train stage mirrors its own checkpoints. It uses the
filesystem of the repo's default DVC remote (S3 through dvc-s3, or a local directory): the same storage, endpoint
and credentials as `dvc push`. Layout: `<remote>/medasr-checkpoints/<fingerprint>/step-NNNNNNNN/`, with
`meta.json` uploaded last as the completeness marker. A half-uploaded checkpoint has no meta.json and is never
used. Uploads run on a background thread with retries: a failed upload is reported, never fatal to training.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.files import atomic_dir
from stages.log import get_logger

log = get_logger(__name__)

PREFIX = "medasr-checkpoints"
META = "meta.json"


@dataclass
class Mirror:
    fs: Any  # a dvc-objects FileSystem (S3, local, ...)
    root: str  # <remote path>/medasr-checkpoints/<fingerprint>
    remote: str  # the DVC remote's name, for messages

    def upload(self, folder: Path) -> None:
        """Copy one checkpoint folder; its meta.json goes last, so a partial copy is never mistaken for complete."""
        dest = self.fs.join(self.root, folder.name)
        marker = folder / META  # only the top-level one is the completeness marker (best/meta.json is data)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p != marker)
        for path in files:
            target = self.fs.join(dest, *path.relative_to(folder).parts)
            self.fs.makedirs(self.fs.parent(target), exist_ok=True)
            self.fs.put_file(str(path), target)
        self.fs.put_file(str(marker), self.fs.join(dest, META))

    def complete_steps(self) -> list[str]:
        """Names of the mirrored checkpoints that finished uploading, newest first."""
        if not self.fs.exists(self.root):
            return []
        names = sorted((Path(p).name for p in self.fs.ls(self.root, detail=False)), reverse=True)
        return [n for n in names if n.startswith("step-") and self.fs.exists(self.fs.join(self.root, n, META))]

    def prune(self, keep: int) -> None:
        for name in self.complete_steps()[keep:]:
            self.fs.rm(self.fs.join(self.root, name), recursive=True)

    def download(self, name: str, run_dir: Path) -> Path:
        """Fetch one mirrored checkpoint into the local run folder (atomically); returns its local path."""
        src = self.fs.join(self.root, name)
        with atomic_dir(run_dir / name) as tmp:
            for remote_path in self.fs.find(src):
                local = tmp / Path(remote_path).relative_to(src)
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote_path, str(local))
        return run_dir / name


def default_remote(repo_root: Path | str = ".") -> Any:
    """The repo's default DVC remote (a dvc-data Remote: `.fs`, `.path`, `.name`), or None when there is none."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    repo = Repo(str(repo_root))
    try:
        return repo.cloud.get_remote()
    except NoRemoteError:
        return None
    finally:
        repo.close()


def open_mirror(fingerprint: str, repo_root: Path | str = ".") -> Mirror | None:
    """The mirror on the repo's default DVC remote, or None (with a log line) when there is none."""
    try:
        remote = default_remote(repo_root)
    except Exception as exc:  # not a DVC repo (e.g. a test's scratch folder): nothing to mirror to
        log.info("no DVC repo here (%s): checkpoints stay local", type(exc).__name__)
        return None
    if remote is None:
        log.info("no default DVC remote: checkpoints stay local (`dvc remote add -d ...` to mirror them)")
        return None
    root = remote.fs.join(remote.path, PREFIX, fingerprint)
    log.info("mirroring checkpoints to DVC remote %r", remote.name)
    return Mirror(remote.fs, root, remote.name)


class Uploader:
    """One background thread that mirrors checkpoints in order, retrying with backoff; never raises into training."""

    def __init__(self, mirror: Mirror, keep: int, retries: int = 6, first_delay_s: float = 1.0) -> None:
        self.mirror, self.keep, self.retries, self.first_delay_s = mirror, keep, retries, first_delay_s
        self.queue: queue.Queue[Path | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="checkpoint-mirror", daemon=True)
        self.thread.start()

    def submit(self, folder: Path) -> None:
        self.queue.put(folder)

    def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every queued upload; True when all finished (uploaded or given up)."""
        deadline = time.monotonic() + timeout_s
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.queue.unfinished_tasks

    def _work(self) -> None:
        while True:
            folder = self.queue.get()
            try:
                if folder is not None and folder.exists():
                    self._upload_with_retries(folder)
            finally:
                self.queue.task_done()

    def _upload_with_retries(self, folder: Path) -> None:
        delay = self.first_delay_s
        for attempt in range(1, self.retries + 1):
            try:
                self.mirror.upload(folder)
                self.mirror.prune(self.keep)
                log.info("mirrored %s to DVC remote %r", folder.name, self.mirror.remote)
                return
            except Exception as exc:  # network, auth, server down: report, retry, never kill training
                log.warning(
                    "mirroring %s to %r failed (attempt %d/%d): %s",
                    folder.name,
                    self.mirror.remote,
                    attempt,
                    self.retries,
                    _one_line(exc),
                )
                if not folder.exists():  # superseded and pruned locally meanwhile
                    return
                time.sleep(delay)
                delay = min(delay * 2, 60.0)
        log.error("gave up mirroring %s; the next checkpoint will be tried as usual", folder.name)


def _one_line(exc: BaseException) -> str:
    """An exception as one short line (no credentials: botocore/s3fs messages name the bucket, not the keys)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def setup_default_remote(repo_root: Path = Path("."), environ: dict[str, str] | None = None) -> str:
    """Pick this machine's default DVC remote, in the git-ignored `.dvc/config.local`, and say which.

    - A default the user set in the committed config (`dvc remote add -d ...`) is respected: nothing changes.
    - MEDASR_S3_URL (s3://bucket/prefix) set: an S3 remote, with MEDASR_S3_ENDPOINT_URL for S3-compatible stores
      (MinIO, R2, RunPod's volume S3 API). Credentials stay in the environment (AWS_*), never in any config file.
    - Otherwise a local-directory remote under $MEDASR_WORKDIR (/workspace on a RunPod volume when it exists, else
      ~/.cache/medasr), so the pipeline and its checkpoint mirroring work without any cloud account.
    """
    import os
    import subprocess

    env = dict(os.environ if environ is None else environ)

    def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["dvc", *args], cwd=repo_root, capture_output=True, text=True, check=check, env=env)

    committed = dvc("config", "--project", "core.remote", check=False)
    if committed.returncode == 0 and committed.stdout.strip():
        # .dvc/config.local outranks .dvc/config: drop a default this command chose earlier, so the user's applies
        dvc("config", "--local", "--unset", "core.remote", check=False)
        return f"default remote {committed.stdout.strip()!r} from .dvc/config (set by you) kept"
    if url := env.get("MEDASR_S3_URL", "").strip():
        if not url.startswith("s3://"):
            raise ValueError(f"MEDASR_S3_URL must look like s3://bucket/prefix, got {url!r}")
        dvc("remote", "add", "--local", "--force", "--default", "medasr-s3", url)
        if endpoint := env.get("MEDASR_S3_ENDPOINT_URL", "").strip():
            dvc("remote", "modify", "--local", "medasr-s3", "endpointurl", endpoint)
        return f"default remote 'medasr-s3' -> {url}" + (f" at {endpoint}" if endpoint else "")
    workdir = env.get("MEDASR_WORKDIR") or ("/workspace" if Path("/workspace").is_dir() else None)
    base = Path(workdir) if workdir else Path.home() / ".cache" / "medasr"
    store = (base / "dvc-remote").resolve()
    store.mkdir(parents=True, exist_ok=True)
    dvc("remote", "add", "--local", "--force", "--default", "medasr-local", str(store))
    return f"default remote 'medasr-local' -> {store} (set MEDASR_S3_URL for S3)"


REMOTE_OK, REMOTE_UNREACHABLE, REMOTE_REJECTED = 0, 1, 2


def check_remote(repo_root: Path | str = ".") -> tuple[int, str]:
    """Preflight: a real listing of the default DVC remote with the given credentials. Returns a code and one line
    naming the remote (never a credential): REMOTE_OK; REMOTE_UNREACHABLE (network, server down: worth retrying);
    REMOTE_REJECTED (credentials refused, bucket missing, no remote: retrying cannot help).
    `dvc status -c` is no health check: it can report "in sync" for a remote it cannot reach."""
    remote = default_remote(repo_root)
    if remote is None:
        return REMOTE_REJECTED, "no default DVC remote: run `medasr remote setup`"
    fs, path = remote.fs, remote.path
    try:
        fs.ls(path if fs.exists(path) else (fs.parent(path) or path), detail=False)
    except (PermissionError, FileNotFoundError) as exc:  # s3fs maps AccessDenied/InvalidAccessKeyId/NoSuchBucket
        return REMOTE_REJECTED, f"DVC remote {remote.name!r} refused access: {_one_line(exc)}"
    except Exception as exc:
        return REMOTE_UNREACHABLE, f"DVC remote {remote.name!r} unreachable: {_one_line(exc)}"
    return REMOTE_OK, f"DVC remote {remote.name!r} reachable"


# --- run status, published by runpod.sh for `medasr pod watch` on another machine -------------------------------
STATUS_PREFIX = "medasr-status"
STATUS_FILE = "status.json"
LOG_TAIL_FILE = "log-tail.txt"


def _status_root(remote: Any, run_id: str) -> str:
    return str(remote.fs.join(remote.path, STATUS_PREFIX, run_id))


def publish_status(
    heartbeat: Path, logs: list[Path], run_id: str, repo_root: Path | str = ".", lines: int = 200
) -> None:
    """Upload the loop's heartbeat (JSON) and the tail of its logs to `<remote>/medasr-status/<run_id>/`."""
    import tempfile

    remote = default_remote(repo_root)
    if remote is None:
        raise RuntimeError("no default DVC remote to publish the run status to")
    root = _status_root(remote, run_id)
    remote.fs.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tail = Path(tmp) / LOG_TAIL_FILE
        chunks = []
        for path in logs:
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"==> {path.name} <==\n" + "\n".join(text) + "\n")
        tail.write_text("".join(chunks))
        remote.fs.put_file(str(tail), remote.fs.join(root, LOG_TAIL_FILE))
        remote.fs.put_file(str(heartbeat), remote.fs.join(root, STATUS_FILE))


def read_status(run_id: str, repo_root: Path | str = ".") -> tuple[dict[str, Any] | None, str]:
    """The last status and log tail runpod.sh published for `run_id` ({} and "" before the first)."""
    import json

    remote = default_remote(repo_root)
    if remote is None:
        raise RuntimeError("no default DVC remote: run `medasr remote setup` (with the pod's MEDASR_S3_URL)")
    root = _status_root(remote, run_id)
    try:
        status = json.loads(remote.fs.cat_file(remote.fs.join(root, STATUS_FILE)))
    except FileNotFoundError:
        return None, ""
    try:
        tail = remote.fs.cat_file(remote.fs.join(root, LOG_TAIL_FILE)).decode(errors="replace")
    except FileNotFoundError:
        tail = ""
    return status, tail
