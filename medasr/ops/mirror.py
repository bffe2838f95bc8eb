"""Live checkpoint mirroring to the DVC default remote, so a training survives the loss of its machine.

DVC cannot push a stage's outputs while the stage runs, so the train stage mirrors its own checkpoints. It uses the
filesystem of the repo's default DVC remote (S3 through dvc-s3, or a local directory): the same storage, endpoint
and credentials as `dvc push`. Layout: `<remote>/medasr-checkpoints/<fingerprint>/step-NNNNNNNN/`, with
`meta.json` uploaded last as the completeness marker. A half-uploaded checkpoint has no meta.json and is never
used. `medasr train --fresh` moves a run's folder to `<fingerprint>.aside-<UTC time>/` beside it (`Mirror.set_aside`).
Uploads run on a background thread with retries: a failed upload is reported, never fatal to training.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medasr.files import atomic_dir
from medasr.log import get_logger
from medasr.ops.remote import default_remote
from medasr.paths import CHECKPOINT_META, REMOTE_CHECKPOINTS, aside_of
from medasr.secrets import one_line

log = get_logger(__name__)


@dataclass
class Mirror:
    fs: Any  # a dvc-objects FileSystem (S3, local, ...)
    root: str  # <remote path>/medasr-checkpoints/<fingerprint>
    remote: str  # the DVC remote's name, for messages

    def upload(self, folder: Path) -> None:
        """Copy one checkpoint folder; its meta.json goes last, so a partial copy is never mistaken for complete."""
        dest = self.fs.join(self.root, folder.name)
        marker = folder / CHECKPOINT_META  # only the top-level one is the completeness marker (best/meta.json is data)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p != marker)
        for path in files:
            target = self.fs.join(dest, *path.relative_to(folder).parts)
            self.fs.makedirs(self.fs.parent(target), exist_ok=True)
            self.fs.put_file(str(path), target)
        self.fs.put_file(str(marker), self.fs.join(dest, CHECKPOINT_META))

    def complete_steps(self) -> list[str]:
        """Names of the mirrored checkpoints that finished uploading, newest first."""
        if not self.fs.exists(self.root):
            return []
        names = sorted((Path(p).name for p in self.fs.ls(self.root, detail=False)), reverse=True)
        return [
            n for n in names if n.startswith("step-") and self.fs.exists(self.fs.join(self.root, n, CHECKPOINT_META))
        ]

    def prune(self, keep: int) -> None:
        for name in self.complete_steps()[keep:]:
            self.fs.rm(self.fs.join(self.root, name), recursive=True)

    def set_aside(self, name: str) -> bool:
        """`medasr train --fresh`: move this run's mirrored checkpoints to the sibling `name` (see paths.aside_name);
        only the newest aside copy of the fingerprint is kept. False when there was no complete checkpoint to move.

        S3 has no rename, so everything is copied first (each checkpoint's meta.json last, as in `upload`), then every
        completeness marker goes in one delete request, then the rest. Interrupted while copying, the run is as it was
        (a retry starts over); after that, nothing left in it is resumable and the aside copy is complete. What is
        left without any marker (such an interrupted move, a run stopped before its first checkpoint) is deleted
        without becoming an aside copy, which would replace the complete one."""
        files = sorted(self.fs.find(self.root))
        parts = {f: self.fs.relparts(f, self.root) for f in files}
        markers = [f for f in files if parts[f][0].startswith("step-") and parts[f][1:] == (CHECKPOINT_META,)]
        base, fingerprint = self.fs.parent(self.root), self.fs.name(self.root)
        if markers:
            for path in [f for f in files if f not in markers] + markers:
                self.fs.copy(path, self.fs.join(base, name, *parts[path]))
            self.fs.rm(markers)
        if files:
            self.fs.rm(self.root, recursive=True)
        for older in [n for n in asides(self.fs, base) if aside_of(n) == fingerprint][:-1]:  # names sort by time
            self.fs.rm(self.fs.join(base, older), recursive=True)
        return bool(markers)

    def download(self, name: str, run_dir: Path) -> Path:
        """Fetch one mirrored checkpoint into the local run folder (atomically); returns its local path."""
        src = self.fs.join(self.root, name)
        with atomic_dir(run_dir / name) as tmp:
            for remote_path in self.fs.find(src):
                local = tmp / Path(remote_path).relative_to(src)
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote_path, str(local))
        return run_dir / name


def asides(fs: Any, base: str) -> list[str]:
    """The names of the aside copies (see paths.aside_name) in the checkpoints folder `base` of a filesystem."""
    if not fs.exists(base):
        return []
    return sorted(n for n in (fs.name(p) for p in fs.ls(base, detail=False)) if aside_of(n))


def remote_asides(repo_root: Path | str = ".") -> tuple[str, dict[str, int]] | None:
    """The default DVC remote's name and its aside copies with the bytes each holds; None without a remote."""
    remote = default_remote(repo_root)
    if remote is None:
        return None
    fs, base = remote.fs, remote.fs.join(remote.path, REMOTE_CHECKPOINTS)
    return remote.name, {n: sum(s or 0 for s in fs.sizes(list(fs.find(fs.join(base, n))))) for n in asides(fs, base)}


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
    root = remote.fs.join(remote.path, REMOTE_CHECKPOINTS, fingerprint)
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
                    one_line(exc),
                )
                if not folder.exists():  # superseded and pruned locally meanwhile
                    return
                time.sleep(delay)
                delay = min(delay * 2, 60.0)
        log.error("gave up mirroring %s; the next checkpoint will be tried as usual", folder.name)
