"""What counts as a secret, and how a value that may hold one is shown: the only place these rules live.

Secrets come from the environment (or a git-ignored .env); they are never logged or written to params, dvc.lock,
W&B config, data artifacts, error messages or process arguments. Code shows whether one is set, never its value.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

# Every secret the project reads. RunPod sets RUNPOD_API_KEY inside a pod itself, so the launcher never forwards it.
SECRETS = (
    "WANDB_API_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "RUNPOD_API_KEY",
    "MEDASR_GIT_TOKEN",  # the pod's git token (a private repo's clone, MEDASR_GIT_PUSH): see medasr/ops/pod_start.py
)
FORWARDED_SECRETS = tuple(name for name in SECRETS if name != "RUNPOD_API_KEY")
REDACTED = "<redacted>"


def redact_url(url: str) -> str:
    """The URL without any user:password@ (a git token, an S3 key), as it may be shown or stored."""
    parts = urlsplit(url)
    # host[:port] as written: `hostname` would drop the port of a self-hosted git server
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else url


def one_line(exc: BaseException) -> str:
    """An exception as one short line for a log or an error message. Libraries we call (botocore/s3fs, httpx)
    name buckets and hosts in their messages, never credentials; URLs in it lose their user:password@."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"{type(exc).__name__}: {' '.join(redact_url(word) if '://' in word else word for word in text.split())[:300]}"
    )
