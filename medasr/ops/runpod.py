"""RunPod from your own machine: the API client, the pod request `medasr pod up` sends, and the launch state this
checkout keeps. `up` creates a pod whose start command clones this repo onto the volume and runs `bash runpod.sh`;
the watcher that keeps it alive is medasr/ops/watch.py.

RunPod's REST API v2. Every request body is validated, before it is sent, against RunPod's published OpenAPI
document kept in `medasr/resources/runpod-openapi-v2.json` (source: github.com/runpod/docs,
`api-reference-v2/openapi.json` at commit 098c7fb0, 2026-08-18, "Frontdoor v2.9.0"; copied 2026-11-21).
Secrets travel only in the create request's `env` (that is how a pod gets them); they are never printed, logged or
written to the state file (medasr/ops/podstate.py), which keeps the pod's other settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from medasr import MedasrError
from medasr.log import get_logger
from medasr.ops.pod_start import START_SCRIPT, split_repo_url
from medasr.secrets import FORWARDED_SECRETS, REDACTED, SECRETS, redact_url

log = get_logger(__name__)

API_URL = "https://api.runpod.io"  # MEDASR_RUNPOD_API_URL overrides it (the tests' fake server on 127.0.0.1)
# A100 40 GB or larger, cheapest first; ids as RunPod's v1 API enumerates them (GPUTypeId in its OpenAPI document)
DEFAULT_GPUS = (
    "NVIDIA A100-SXM4-40GB",
    "NVIDIA A100 80GB PCIe",
    "NVIDIA A100-SXM4-80GB",
    "NVIDIA H100 PCIe",
    "NVIDIA H100 80GB HBM3",
)
DEFAULT_IMAGE = "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404"  # the image RunPod's v2 API docs use
# What the pod needs from this machine's environment (or .env): the remote, tracking and runpod.sh settings.
FORWARDED_ENV = (
    *FORWARDED_SECRETS,
    "AWS_DEFAULT_REGION",
    "MEDASR_S3_URL",
    "MEDASR_S3_ENDPOINT_URL",
    "WANDB_MODE",
    "MEDASR_MAX_FAST_FAILURES",
    "MEDASR_HUNG_AFTER_S",
    "MEDASR_ON_SUCCESS",
    "MEDASR_GIT_PUSH",
    "MEDASR_DEADLINE_H",
    "MEDASR_MAX_USD",
    "MEDASR_MAX_STALLED_ATTEMPTS",
    "MEDASR_LEASE_TTL_S",
    "MEDASR_STATUS_EVERY_S",
    "MEDASR_STOP_MARGIN_S",
)
SETTINGS = tuple(k for k in FORWARDED_ENV if k not in FORWARDED_SECRETS)  # stored in the state file's spec
STOPPED = ("EXITED", "TERMINATED")  # RunPod bills no compute for these (`cost` 0.0); every other status may bill


class PodError(MedasrError):
    """A RunPod API call failed, or the pod cannot be managed as asked. The message never holds a secret."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status RunPod answered; None: unreachable, or no call at all


def transient(exc: PodError) -> bool:
    """Worth the same call again later (RunPod's API document: 429 and 5xx), unlike a 4xx answer."""
    return exc.status is None or exc.status == 429 or exc.status >= 500


# --- the published schema -----------------------------------------------------------------------------------------
@cache
def api_document() -> dict[str, Any]:
    return json.loads((resources.files("medasr.resources") / "runpod-openapi-v2.json").read_text())


def schema_errors(instance: Any, schema_name: str) -> list[str]:
    """Where `instance` breaks `components.schemas.<schema_name>` of RunPod's OpenAPI document (empty: valid)."""
    from openapi_schema_validator import OAS31Validator

    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": api_document()["components"]}
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
        for e in OAS31Validator(schema).iter_errors(instance)
    ]


# --- what to create -----------------------------------------------------------------------------------------------
@dataclass
class PodSpec:
    """The pod's settings (no secrets): kept in the state file so `watch` can recreate the same pod."""

    name: str
    repo_url: str  # no credentials in it (see redact_url); a private repo needs a token-bearing URL in MEDASR_REPO_URL
    git_ref: str
    run_id: str
    gpus: list[str] = field(default_factory=lambda: list(DEFAULT_GPUS))
    gpu_count: int = 1
    image: str = DEFAULT_IMAGE
    disk_gb: int = 60
    volume_id: str | None = None  # a network volume: survives the pod, so a recreated pod reuses venv and caches
    volume_gb: int = 100  # host-local volume when there is no network volume
    cloud: str = "SECURE"
    data_centers: list[str] = field(default_factory=list)
    # The forwarded settings `pod up` sent (SETTINGS, no secrets) and the names of the secrets it sent: a recreated
    # pod gets the same. None in a state file written before they were kept: then this environment's settings.
    env: dict[str, str] | None = None
    secrets: list[str] | None = None


def secret_values(environ: dict[str, str]) -> dict[str, str]:
    """The secrets a pod gets from this environment; a token in MEDASR_REPO_URL counts as MEDASR_GIT_TOKEN."""
    found = {k: environ[k] for k in FORWARDED_SECRETS if environ.get(k)}
    token = split_repo_url(environ.get("MEDASR_REPO_URL", ""))[1]
    return ({"MEDASR_GIT_TOKEN": token} if token else {}) | found


def pod_env(spec: PodSpec, environ: dict[str, str]) -> dict[str, str]:
    settings = spec.env if spec.env is not None else {k: environ[k] for k in SETTINGS if environ.get(k)}
    return (
        settings
        | secret_values(environ)
        | {
            "MEDASR_REPO_URL": spec.repo_url,
            "MEDASR_GIT_REF": spec.git_ref,
            "MEDASR_RUN_ID": spec.run_id,
        }
    )


def check_recreate(spec: PodSpec, environ: dict[str, str]) -> None:
    """A recreated pod must get what the first one got: PodError naming the first variable this environment lacks
    (never its value). Settings come from the state file; secrets only from the environment."""
    settings = spec.env if spec.env is not None else environ
    if not settings.get("MEDASR_S3_URL"):
        raise PodError("cannot recreate the pod: MEDASR_S3_URL is not set (it would get an empty local remote)")
    have = secret_values(environ)
    for name in spec.secrets or ():
        if name not in have:
            raise PodError(f"cannot recreate the pod: {name} is not set here (environment or .env); the first had it")


def create_payload(spec: PodSpec, gpu: str, environ: dict[str, str]) -> dict[str, Any]:
    """A CreatePodRequest body, validated against RunPod's schema (PodError listing every problem)."""
    mounts: dict[str, Any] = (
        {"network": [{"volumeId": spec.volume_id, "path": "/workspace"}]}
        if spec.volume_id
        else {"persistent": {"size": spec.volume_gb, "path": "/workspace"}}
    )
    body: dict[str, Any] = {
        "name": spec.name,
        "image": spec.image,
        "gpu": {"id": gpu, "count": spec.gpu_count},
        "disk": spec.disk_gb,
        "cloud": spec.cloud,
        "mounts": mounts,
        "env": pod_env(spec, environ),
        "args": f"bash -c '{START_SCRIPT}'",
    }
    if spec.data_centers:
        body["dataCenterIds"] = spec.data_centers
    if problems := schema_errors(body, "CreatePodRequest"):
        raise PodError("the pod request does not match RunPod's API schema: " + "; ".join(problems))
    return body


def redacted(body: dict[str, Any]) -> dict[str, Any]:
    """The request as it may be shown: secret values replaced, credentials stripped from URLs."""
    env = dict(body.get("env", {}))
    for key in env:
        if key in SECRETS:
            env[key] = REDACTED
        elif key == "MEDASR_REPO_URL":
            env[key] = redact_url(env[key])
    return body | {"env": env}


# --- the API ----------------------------------------------------------------------------------------------------
class RunPodAPI:
    """RunPod's REST API v2: the pod calls this tool makes. Errors become one-line PodErrors without the key."""

    def __init__(self, api_key: str, base_url: str | None = None, timeout_s: float = 30.0) -> None:
        import httpx

        if not api_key:
            raise PodError("RUNPOD_API_KEY is not set (environment or .env)")
        self.base_url = (base_url or os.environ.get("MEDASR_RUNPOD_API_URL") or API_URL).rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s
        )

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, json=body, **kwargs)
        except httpx.HTTPError as exc:
            raise PodError(f"RunPod API unreachable ({self.base_url}): {type(exc).__name__}: {exc}") from None
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            try:
                problem = response.json()
                detail = f"{problem.get('title', '')}: {problem.get('detail', '')} {problem.get('errors') or ''}"
            except (ValueError, AttributeError):  # not JSON, or JSON but no problem object
                detail = response.text[:300]
            code = response.status_code
            raise PodError(f"RunPod API {method} {path} -> {code} {detail.strip()}", code)
        try:
            return response.json() if response.content else {}
        except ValueError:  # a proxy's or a gateway's page: worth the same call again later
            kind = response.headers.get("content-type", "?")
            raise PodError(f"RunPod API {method} {path} -> {response.status_code} but not JSON ({kind})") from None

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v2/pods", body)

    def get(self, pod_id: str) -> dict[str, Any] | None:
        """The pod, or None when RunPod no longer knows it (terminated)."""
        return self._call("GET", f"/v2/pods/{pod_id}")

    def find(self, run_id: str) -> list[dict[str, Any]]:
        """The pods of run `run_id` (their env's MEDASR_RUN_ID) RunPod lists, but terminated ones."""
        return [
            pod
            for pod in (self._call("GET", "/v2/pods") or {}).get("pods", [])
            if (pod.get("env") or {}).get("MEDASR_RUN_ID") == run_id and pod.get("status") != "TERMINATED"
        ]

    def action(self, pod_id: str, action: str) -> None:
        body = {"action": action}
        if problems := schema_errors(body, "PodActionRequest"):
            raise PodError("; ".join(problems))
        if self._call("POST", f"/v2/pods/{pod_id}/action", body) is None:
            raise PodError(f"pod {pod_id} not found", 404)

    def logs(self, pod_id: str, tail: int, follow: bool, idle_s: float = 5.0) -> Iterator[str]:
        """Log lines (Server-Sent Events). Without `follow`, stops once the backfill has gone quiet for `idle_s`."""
        import httpx

        timeout = httpx.Timeout(30.0, read=None if follow else idle_s)
        try:
            with self.http.stream("GET", f"/v2/pods/{pod_id}/logs", params={"tail": tail}, timeout=timeout) as r:
                if r.status_code >= 400:
                    raise PodError(f"RunPod API GET /v2/pods/{pod_id}/logs -> {r.status_code}")
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        yield json.loads(line[5:]).get("line", "")
        except httpx.ReadTimeout:
            return
        except httpx.HTTPError as exc:
            raise PodError(f"RunPod API unreachable ({self.base_url}): {type(exc).__name__}") from None


def refused(exc: PodError) -> bool:
    """The API key was refused: no retry can help."""
    return " -> 401" in str(exc) or " -> 403" in str(exc)


def launch(api: RunPodAPI, spec: PodSpec, environ: dict[str, str]) -> dict[str, Any]:
    """Create the pod on the first GPU type in `spec.gpus` that RunPod can place. A create answered with a 5xx or
    not at all may have made the pod all the same: a pod of this run that RunPod lists is taken, never a second."""
    if found := api.find(spec.run_id):
        log.info("pod %s of run %s exists already: taking it", found[0]["id"], spec.run_id)
        return found[0]
    failures = []
    for gpu in spec.gpus:
        body = create_payload(spec, gpu, environ)
        try:
            pod = api.create(body)
        except PodError as exc:
            if refused(exc):
                raise
            if transient(exc) and (made := api.find(spec.run_id)):
                return made[0]
            failures.append(f"{gpu}: {exc}")
            log.warning("could not create a pod on %s: %s", gpu, exc)
            continue
        log.info("created pod %s on %s", pod["id"], gpu)
        return pod
    raise PodError("no GPU type could be placed:\n  " + "\n  ".join(failures))
