"""The `medasr remote|wandb|pod` commands: the DVC remote, W&B and RunPod around the pipeline (medasr/ops). Each
parses its options and delegates; failures the user can act on print one line and exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from medasr.ops.runpod import PodError

EXIT_BAD_PARAMS = 2
EXIT_FAILED = 1

remote_app = typer.Typer(help="DVC remote for this machine.", no_args_is_help=True)


@remote_app.command("setup")
def remote_setup() -> None:
    """Choose this machine's default DVC remote in .dvc/config.local: S3 when MEDASR_S3_URL is set, else a local
    folder under $MEDASR_WORKDIR. A default set in .dvc/config (`dvc remote add -d`) is kept. Writes no secrets."""
    from medasr.ops.remote import setup_default_remote

    try:
        typer.echo(setup_default_remote())
    except (ValueError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        typer.echo(f"error: {detail.strip()}", err=True)
        raise typer.Exit(EXIT_FAILED) from None


@remote_app.command("check")
def remote_check() -> None:
    """List the default DVC remote with the given credentials. Exit 0: reachable; 1: unreachable (worth retrying);
    2: refused or not configured (retrying cannot help). One line, never a credential."""
    from medasr.ops.remote import check_remote

    code, message = check_remote()
    typer.echo(message, err=code != 0)
    raise typer.Exit(code)


@remote_app.command("publish-status", hidden=True)
def remote_publish_status(
    heartbeat: Path = typer.Option(..., help="runpod.sh's heartbeat file (JSON)."),
    run_id: str = typer.Option("default", envvar="MEDASR_RUN_ID"),
) -> None:
    """Upload runpod.sh's heartbeat to the DVC remote, where `medasr pod watch|status` read it."""
    from medasr.ops.status import publish_status

    try:
        publish_status(heartbeat, run_id)
    except Exception as exc:  # best effort: the loop goes on; the watcher sees an older heartbeat
        typer.echo(f"could not publish the run status: {type(exc).__name__}: {str(exc)[:200]}", err=True)
        raise typer.Exit(EXIT_FAILED) from None


wandb_app = typer.Typer(help="Weights & Biases.", no_args_is_help=True)


@wandb_app.command("check")
def wandb_check() -> None:
    """Exit 0 when W&B is usable as configured (offline, disabled, or a key the server accepts), else 1 with one
    line saying why. The key is never printed."""
    from medasr.tracking import verify_wandb, wandb_mode

    problem = verify_wandb()
    if problem:
        typer.echo(problem, err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"W&B mode: {wandb_mode()}")


pod_app = typer.Typer(
    help="RunPod: launch the pod that runs `bash runpod.sh`, inspect it, and watch it until the metrics land.",
    no_args_is_help=True,
)


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def _pod_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except PodError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None


def _api() -> Any:
    from medasr.ops.runpod import RunPodAPI

    return _pod_call(RunPodAPI, os.environ.get("RUNPOD_API_KEY", ""))


def _release_lease(pod_id: str) -> bool:
    """Free the remote's lease when terminated pod `pod_id` holds it, so the next pod need not wait for its expiry."""
    from medasr.ops.lease import release_lease

    return release_lease(".", pod_id=pod_id)


def _release_quietly(pod_id: str) -> bool:
    from medasr.secrets import one_line

    try:
        return _release_lease(pod_id)
    except Exception as exc:  # it expires by itself
        typer.echo(f"warning: the remote's lease cannot be released ({one_line(exc)}); it expires by itself", err=True)
        return False


@pod_app.command("up")
def pod_up(
    gpu: list[str] = typer.Option(None, help="GPU type id, in order of preference (repeat). Default: A100 40GB+."),
    volume: str = typer.Option(None, envvar="MEDASR_RUNPOD_VOLUME", help="Network volume id (survives the pod)."),
    data_center: list[str] = typer.Option(None, help="Data center id (repeat); the network volume's, if any."),
    name: str = typer.Option("medasr", help="Pod name."),
    image: str = typer.Option(None, help="Container image (default: RunPod's PyTorch image)."),
    disk_gb: int = typer.Option(60, min=10, help="Container disk (GB; wiped when the pod stops)."),
    repo_url: str = typer.Option(None, help="Repo the pod clones (default: git remote origin)."),
    git_ref: str = typer.Option(None, help="Commit the pod runs (default: HEAD, which must be pushed)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the validated request (no secrets); send nothing."),
) -> None:
    """Create a GPU pod whose start command clones this repo onto /workspace and runs `bash runpod.sh`.

    The remote, W&B and HF settings and secrets are passed as pod env from this environment (or .env). Then run
    `medasr pod watch`.
    """
    from medasr.ops.pod_start import split_repo_url
    from medasr.ops.podstate import LaunchState, clear_to_launch
    from medasr.ops.runpod import (
        DEFAULT_GPUS,
        DEFAULT_IMAGE,
        SETTINGS,
        PodSpec,
        create_payload,
        launch,
        redacted,
        secret_values,
    )

    environ = dict(os.environ)
    ref = git_ref or _git("rev-parse", "HEAD")
    url, token = split_repo_url(repo_url or environ.get("MEDASR_REPO_URL") or _git("remote", "get-url", "origin"))
    if token:  # travels only as the pod's MEDASR_GIT_TOKEN: never in the state file or the pod's command
        environ["MEDASR_GIT_TOKEN"] = token
    problems = []
    if not url:
        problems.append("no repo URL for the pod to clone: add a git remote `origin` or pass --repo-url")
    if not git_ref and ref and not _git("branch", "-r", "--contains", ref):
        problems.append(f"HEAD {ref[:12]} is on no remote branch, so the pod cannot check it out: push it first")
    if not environ.get("MEDASR_S3_URL"):
        problems.append("MEDASR_S3_URL is not set: the pod's results, checkpoints and heartbeat need an S3 remote")
    if _git("status", "--porcelain", "--untracked-files=no"):
        typer.echo("warning: uncommitted changes stay here; the pod runs the committed state", err=True)
    spec = PodSpec(
        name=name,
        repo_url=url,
        git_ref=ref,
        run_id=f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}",
        gpus=list(gpu or DEFAULT_GPUS),
        image=image or DEFAULT_IMAGE,
        disk_gb=disk_gb,
        volume_id=volume,
        data_centers=list(data_center or []),
        env={k: environ[k] for k in SETTINGS if environ.get(k)},  # what a recreated pod gets too
        secrets=sorted(secret_values(environ)),  # names only: `pod watch` needs them to recreate the pod
    )
    body = _pod_call(create_payload, spec, spec.gpus[0], environ)
    if dry_run:
        typer.echo(json.dumps(redacted(body), indent=2))
        for problem in problems:
            typer.echo(f"problem: {problem}", err=True)
        return
    if problems:
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(EXIT_BAD_PARAMS)
    api = _api()
    _pod_call(clear_to_launch, api, lambda line: typer.echo(line, err=True))
    LaunchState(pod_id="", spec=spec).save()  # the run before its pod: were this dying, watch and down find the pod
    pod = _pod_call(launch, api, spec, environ)
    state = LaunchState(pod_id=pod["id"], spec=spec)
    state.observe(pod["id"], pod, time.time())
    state.save()
    typer.echo(f"pod {pod['id']} created ({pod.get('status', '?')}), run {spec.run_id}; next: `medasr pod watch`")


@pod_app.command("status")
def pod_status() -> None:
    """The pod's state and cost, the last heartbeat runpod.sh published, and what every pod of the run has cost."""
    from medasr.ops.podstate import LaunchState
    from medasr.ops.status import read_status
    from medasr.secrets import one_line

    state, api = _pod_call(LaunchState.load), _api()
    _pod_call(state.add_listed, api, time.time())  # a pod `pod up` did not live to record, too
    pod = _pod_call(api.get, state.pod_id) if state.pod_id else None
    if state.pod_id:
        state.observe(state.pod_id, pod, time.time())
    state.save()
    if not state.pod_id:
        typer.echo(f"run {state.spec.run_id}: no pod (`pod up` failed before creating one?)")
    elif pod is None:
        typer.echo(f"pod {state.pod_id}: gone (terminated)")
    else:
        gpu = (pod.get("gpu") or {}).get("id", "?")
        typer.echo(f"pod {state.pod_id}: {pod.get('status')} on {gpu}, ${pod.get('cost', 0):.2f}/h")
    try:
        found = read_status(state.spec.run_id)
    except Exception as exc:
        typer.echo(f"run {state.spec.run_id}: the heartbeat cannot be read ({one_line(exc)})")
    else:
        if found:  # its age by the remote's clock, the pod's never
            beat, modified = found
            age = f"published {time.time() - modified:.0f}s ago, pod {beat.get('pod') or '?'}"
            typer.echo(f"run {state.spec.run_id}: {beat.get('state')} {beat.get('detail', '')} ({age})")
            if beat.get("warning"):  # the last validation's: shown, never acted on
                typer.echo(f"warning: {beat['warning']}")
        else:
            typer.echo(f"run {state.spec.run_id}: no heartbeat published yet")
    spent = f"~${state.spent_usd:.2f} by {len(state.pods)} pod(s) until last seen"
    typer.echo(f"spent: {spent}; recoveries: {state.recoveries}")


@pod_app.command("logs")
def pod_logs(
    tail: int = typer.Option(200, min=0, max=5000, help="Lines of history."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming."),
) -> None:
    """The pod's container log (runpod.sh's own output) through RunPod's API."""
    from medasr.ops.podstate import LaunchState

    state = _pod_call(LaunchState.load)

    def stream() -> None:
        for line in _api().logs(state.pod_id, tail, follow):
            typer.echo(line)

    _pod_call(stream)


@pod_app.command("down")
def pod_down(terminate: bool = typer.Option(False, "--terminate", help="Delete it (network volume kept).")) -> None:
    """Stop every pod of the run (its volume and the remote keep everything), or terminate them, each confirmed by
    RunPod. Terminating also frees the remote's lease a pod of the run held, so `pod up` may start a new run."""
    from medasr.ops.podstate import LaunchState
    from medasr.ops.runpod import refused
    from medasr.ops.watch import WatchSettings, bring_down

    state = _pod_call(LaunchState.load)
    api, action = _api(), "terminate" if terminate else "stop"
    _pod_call(state.add_listed, api, time.time())
    failures = []
    for pod_id in state.ids():  # every one tried: a pod that cannot be brought down keeps none of the others billing
        try:
            pod = bring_down(api, pod_id, action, WatchSettings(), time.sleep, typer.echo)
        except PodError as exc:
            failures.append(f"error: {exc}")
            if refused(exc):
                break  # the API key: no other pod can be reached either
            continue
        state.observe(pod_id, pod, time.time())
        state.save()
        typer.echo(f"pod {pod_id}: {'terminated' if pod is None or pod.get('status') == 'TERMINATED' else 'stopped'}")
        if terminate and _release_quietly(pod_id):
            typer.echo(f"released the remote's lease pod {pod_id} held")
    for line in failures:
        typer.echo(line, err=True)
    if failures:
        raise typer.Exit(EXIT_FAILED)


@pod_app.command("watch")
def pod_watch(
    max_usd: float = typer.Option(50.0, min=0, help="Spending cap for this run (USD): the pod is stopped there."),
    poll_s: float = typer.Option(60.0, min=0.05, help="Seconds between polls."),
    stale_after_s: float = typer.Option(2700.0, min=1, help="A running pod silent this long is restarted."),
    max_recoveries: int = typer.Option(10, min=0, help="Starts, restarts and recreations before giving up."),
    backoff_base_s: float = typer.Option(30.0, min=0, help="Backoff between recoveries (doubles, full jitter)."),
) -> None:
    """Keep the run alive until runpod.sh reports it finished: start a stopped pod, restart a silent one, recreate
    a lost one on the same network volume. Exits 0 when the pipeline finished, 1 when it gave up or hit a cap."""
    from medasr import MedasrError
    from medasr.ops.podstate import LaunchState
    from medasr.ops.status import read_status
    from medasr.ops.watch import WatchSettings, watch

    state = _pod_call(LaunchState.load)
    try:  # without the remote the watcher is blind: it never acts on a heartbeat it cannot read
        read_status(state.spec.run_id)
    except MedasrError as exc:  # no DVC repo here, or no default remote
        typer.echo(f"error: the run status cannot be read: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    except Exception:  # e.g. the network: the watcher warns each poll until it can read it
        pass
    settings = WatchSettings(
        max_usd=max_usd,
        poll_s=poll_s,
        stale_after_s=stale_after_s,
        max_recoveries=max_recoveries,
        backoff_base_s=backoff_base_s,
    )
    environ = dict(os.environ)
    code = _pod_call(watch, _api(), state, read_status, environ, settings, say=typer.echo, release_lease=_release_lease)
    raise typer.Exit(code)
