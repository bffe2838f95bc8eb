"""Live checkpoint mirroring to the DVC default remote, so a training survives the loss of its machine.

DVC cannot push a stage's outputs while the stage runs, so the train stage mirrors its own checkpoints. It uses the
filesystem of the repo's default DVC remote (S3 through dvc-s3, or a local directory): the same storage, endpoint
and credentials as `dvc push`. Layout: `<remote>/medasr-checkpoints/<fingerprint>/step-NNNNNNNN/`, with
`meta.json` uploaded last as the completeness marker. A half-uploaded checkpoint has no meta.json and is never
used. `medasr train --fresh` moves a run's folder to `<fingerprint>.aside-<UTC time>/` beside it (`Mirror.set_aside`).
Uploads run on a background thread with retries: a failed upload is reported, never fatal to training. Reads are
retried too (`Mirror.read`), and a read that failed raises: it is never taken for an empty or corrupt mirror.
Folders of fingerprints no longer trained are pruned by last use (`Mirror.prune_fingerprints`), never one that
a pod may still be training. A local directory remote is listed with errors raised (`find`).
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from medasr.files import atomic_dir
from medasr.log import get_logger
from medasr.ops.remote import default_remote
from medasr.paths import CHECKPOINT_META, REMOTE_CHECKPOINTS, aside_of
from medasr.secrets import one_line

log = get_logger(__name__)
T = TypeVar("T")


@dataclass
class Mirror:
    fs: Any  # a dvc-objects FileSystem (S3, local, ...)
    root: str  # <remote path>/medasr-checkpoints/<fingerprint>
    remote: str  # the DVC remote's name, for messages
    # reads (listing, download) that fail are retried this often, waiting first_delay_s, then twice as long each
    # time; on top of the S3 client's own retries (botocore: 5 attempts, about 8 s), so a fault must outlast both
    read_attempts: int = 4
    first_delay_s: float = 2.0

    def read(self, what: str, fn: Callable[[], T]) -> T:
        """`fn`, a read of the remote, retried with backoff; the last attempt's exception is raised."""
        delay = self.first_delay_s
        for attempt in range(1, self.read_attempts):
            try:
                return fn()
            except Exception as exc:
                log.warning(
                    "%s on DVC remote %r failed (attempt %d/%d), retrying in %.1f s: %s",
                    what,
                    self.remote,
                    attempt,
                    self.read_attempts,
                    delay,
                    one_line(exc),
                )
                time.sleep(delay)
                delay *= 2
        return fn()

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

    def steps(self) -> dict[str, bool]:
        """The mirrored checkpoint folders, each with whether it finished uploading (its own meta.json is there).
        One listing, which raises when it fails: only a run that has mirrored nothing yet is empty. (`fs.exists`
        is no test for that: s3fs answers False for a bucket it could not reach.)"""
        steps: dict[str, bool] = {}
        for path in find(self.fs, self.root):
            name, *rest = self.fs.relparts(path, self.root)
            if name.startswith("step-"):
                steps[name] = steps.get(name, False) or rest == [CHECKPOINT_META]
        return steps

    def complete_steps(self) -> list[str]:
        """Names of the mirrored checkpoints that finished uploading, newest first."""
        return sorted((name for name, complete in self.steps().items() if complete), reverse=True)

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` complete checkpoints; older folders go, half-uploaded ones (a killed upload)
        included. Newer half-uploaded ones stay: only the upload in progress could be writing them."""
        steps = self.steps()
        kept = sorted(name for name, complete in steps.items() if complete)[-keep:]
        for name in sorted(steps):
            if kept and name < kept[0]:
                self.fs.rm(self.fs.join(self.root, name), recursive=True)

    def prune_fingerprints(self, keep: int, min_age_s: float, now: float | None = None) -> list[str]:
        """Delete the folders (runs and their aside copies) of the fingerprints other than this run's, all but those
        of the `keep` - 1 used last; returns their names. Last use: the time of the newest checkpoint completed in
        their folders (one without any counts as oldest). A fingerprint used less than `min_age_s` before `now` (the
        reader's clock against the store's, as for the lease) is kept whatever the count: a pod may be training it,
        and a live run mirrors far more often."""
        now = time.time() if now is None else now
        base, current = self.fs.parent(self.root), self.fs.name(self.root)
        folders: set[str] = set()
        newest: dict[str, str] = {}  # folder -> its newest completeness marker (step folders sort by step)
        for path in sorted(find(self.fs, base)):
            folder, *rest = self.fs.relparts(path, base)
            if fingerprint_of(folder):
                folders.add(folder)
                if len(rest) == 2 and rest[0].startswith("step-") and rest[1] == CHECKPOINT_META:
                    newest[folder] = path
        last_use = {fingerprint_of(folder) or "": 0.0 for folder in folders}
        for folder, marker in newest.items():
            owner = fingerprint_of(folder) or ""
            last_use[owner] = max(last_use[owner], self.fs.modified(marker).timestamp())
        stale = {fp for fp in stale_fingerprints(last_use, current, keep) if now - last_use[fp] >= min_age_s}
        gone = sorted(folder for folder in folders if fingerprint_of(folder) in stale)
        for folder in gone:
            self.fs.rm(self.fs.join(base, folder), recursive=True)
        return gone

    def set_aside(self, name: str) -> bool:
        """`medasr train --fresh`: move this run's mirrored checkpoints to the sibling `name` (see paths.aside_name);
        only the newest aside copy of the fingerprint is kept. False when there was no complete checkpoint to move.

        S3 has no rename, so everything is copied first (each checkpoint's meta.json last, as in `upload`), then every
        completeness marker goes in one delete request, then the rest. Interrupted while copying, the run is as it was
        (a retry starts over); after that, nothing left in it is resumable and the aside copy is complete. What is
        left without any marker (such an interrupted move, a run stopped before its first checkpoint) is deleted
        without becoming an aside copy, which would replace the complete one."""
        files = sorted(find(self.fs, self.root))
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
            for remote_path in find(self.fs, src):
                local = tmp / Path(remote_path).relative_to(src)
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote_path, str(local))
        return run_dir / name


def find(fs: Any, path: str) -> list[str]:
    """Every file under `path` on a remote's filesystem; a listing that fails raises. dvc-objects walks a local
    directory without an error handler, so a folder it could not read (EIO, ESTALE on a network volume) would be
    left out: nothing mirrored (a fresh start), or a download missing files (taken for corrupt). Only a missing
    `path` itself is empty."""
    if fs.protocol != "local":
        return list(fs.find(path))

    def fail(exc: OSError) -> None:
        if not (isinstance(exc, FileNotFoundError) and exc.filename == path):
            raise exc

    return [os.path.join(root, name) for root, _, names in os.walk(path, onerror=fail) for name in names]


FINGERPRINT = re.compile(r"[0-9a-f]{16}")  # what stages/train/checkpoints.py `fingerprint` names a run's folder


def fingerprint_of(name: str) -> str | None:
    """The fingerprint whose checkpoints a folder named `name` holds (its run folder, or an aside copy), or None
    for anything else: pruning never touches a folder it did not make."""
    fingerprint = aside_of(name) or name
    return fingerprint if FINGERPRINT.fullmatch(fingerprint) else None


def stale_fingerprints(last_use: dict[str, float], current: str, keep: int) -> set[str]:
    """Which fingerprints' folders to prune: all but `current` (always kept, counted as one of `keep`) and the
    `keep` - 1 others used last (`last_use`: epoch seconds per fingerprint)."""
    others = sorted((fp for fp in last_use if fp != current), key=lambda fp: (last_use[fp], fp), reverse=True)
    return set(others[max(keep - 1, 0) :])


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
    return remote.name, {n: sum(s or 0 for s in fs.sizes(find(fs, fs.join(base, n)))) for n in asides(fs, base)}


def open_mirror(fingerprint: str, repo_root: Path | str = ".") -> Mirror | None:
    """The mirror on the repo's default DVC remote, or None (with a log line) when there is none."""
    try:
        remote = default_remote(repo_root)
    except Exception as exc:  # not a DVC repo (e.g. a test's scratch folder): nothing to mirror to
        log.info("checkpoints stay local: %s", one_line(exc))
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
                log.info("mirrored %s to DVC remote %r", folder.name, self.mirror.remote)
                break
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
        else:
            log.error("gave up mirroring %s; the next checkpoint will be tried as usual", folder.name)
            return
        try:  # the checkpoint is safe on the remote: a failure here only leaves older ones longer, till the next
            self.mirror.prune(self.keep)
        except Exception as exc:
            log.warning(
                "mirrored %s, but pruning older checkpoints on %r failed (tried again after the next upload): %s",
                folder.name,
                self.mirror.remote,
                one_line(exc),
            )
