"""The repository's default DVC remote, as this machine sees it: which one it is (`default_remote`), choosing it
(`medasr remote setup`) and checking it (`medasr remote check`). The checkpoint mirror and the run status use the
same remote, with the same endpoint and credentials as `dvc push`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medasr import StageError
from medasr.secrets import one_line


def default_remote(repo_root: Path | str = ".") -> Any:
    """The repo's default DVC remote (a dvc-data Remote: `.fs`, `.path`, `.name`), or None when there is none.
    Outside a DVC repository, or with a config DVC refuses: StageError, one line."""
    from dvc.config import NoRemoteError
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        repo = Repo(str(repo_root))
    except DvcException as exc:
        raise StageError(f"DVC cannot open {Path(repo_root).resolve()}: {one_line(exc)}") from None
    try:
        return repo.cloud.get_remote()
    except NoRemoteError:
        return None
    except DvcException as exc:
        raise StageError(f"DVC cannot open the default remote: {one_line(exc)}") from None
    finally:
        repo.close()


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
    REMOTE_REJECTED (credentials refused, bucket missing, no remote, not in a DVC repository: retrying cannot help).
    A remote path nothing was pushed to yet (a new prefix in an existing bucket) is fine: `dvc push` creates it.
    `dvc status -c` is no health check: it can report "in sync" for a remote it cannot reach."""
    try:
        remote = default_remote(repo_root)
    except StageError as exc:
        return REMOTE_REJECTED, str(exc)
    if remote is None:
        return REMOTE_REJECTED, "no default DVC remote: run `medasr remote setup`"
    fs, path = remote.fs, remote.path
    try:
        try:
            fs.ls(path, detail=False)
        except FileNotFoundError:
            # nothing under the path yet: a listing of it (empty) tells a missing prefix from a missing bucket,
            # which raises; unlike `fs.exists`, which answers False for a bucket it could not reach
            list(fs.find(path))
    except (PermissionError, FileNotFoundError) as exc:  # s3fs maps AccessDenied/InvalidAccessKeyId/NoSuchBucket
        return REMOTE_REJECTED, f"DVC remote {remote.name!r} refused access: {one_line(exc)}"
    except Exception as exc:
        return REMOTE_UNREACHABLE, f"DVC remote {remote.name!r} unreachable: {one_line(exc)}"
    return REMOTE_OK, f"DVC remote {remote.name!r} reachable"
