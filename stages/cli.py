"""`medasr`: the command line. It only loads params and delegates to one stage module per command.

Each stage command validates the whole params file first (every problem reported at once, exit 2) and only then
imports its stage, so a typo costs milliseconds and never touches outputs. Heavy imports (datasets, NeMo) happen
inside the commands that need them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from dotenv import load_dotenv

from stages import StageError
from stages import log as logs
from stages.params import Params, ParamsError, load_params

app = typer.Typer(
    help="Medical speech fine-tuning pipeline for canary-qwen-2.5b. DVC calls one command per stage; "
    "run `dvc repro` for the whole pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", "-p", help="Params file (relative to the working dir).")
EXIT_BAD_PARAMS = 2
EXIT_STAGE_FAILED = 1


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    # Variables already in the environment win over .env, so a pod's injected secrets are never shadowed.
    load_dotenv(Path.cwd() / ".env", override=False)
    logs.setup(verbose)


def _params(path: Path) -> Params:
    try:
        return load_params(path)
    except ParamsError as exc:
        typer.echo(f"error: invalid params in {exc.source}:", err=True)
        for problem in exc.problems:
            typer.echo(f"  - {problem}", err=True)
        raise typer.Exit(EXIT_BAD_PARAMS) from None


def _run_stage(name: str, params_path: Path, whole: bool = False) -> None:
    """Validate params, then run one stage with its own block (or, for train/eval, the whole params)."""
    params = _params(params_path)
    stage = importlib.import_module(f"stages.{name}")  # after validation: heavy imports only when needed
    try:
        stage.run(params if whole else getattr(params, name))
    except StageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_STAGE_FAILED) from None


@app.command()
def fetch(params: Path = PARAMS_OPTION) -> None:
    """Read the dataset named by fetch.*: a hub id, or a local parquet file, audiofolder, NeMo manifest, OSCE
    segment list or TextGrid folder (PriMock57).

    Writes data/raw/ (parquet shards of original audio bytes + text, and source.json). First checks that every
    local dataset path in fetch.* and eval.test_sets exists, so a typo fails here rather than after training.
    """
    from stages.fetch import source_problems

    problems = source_problems(_params(params))
    if problems:
        typer.echo("error: dataset not found:", err=True)
        for problem in problems:
            typer.echo(f"  - {problem}", err=True)
        raise typer.Exit(EXIT_BAD_PARAMS)
    _run_stage("fetch", params)


@app.command()
def subset(params: Path = PARAMS_OPTION) -> None:
    """Filter data/raw/ and split it into train/val by stable hashes, per subset.*.

    Writes data/subset/{train,val,dropped}.jsonl and metrics/data.json (kept, hours, dropped per reason).
    """
    _run_stage("subset", params)


@app.command()
def manifest(params: Path = PARAMS_OPTION) -> None:
    """Decode, downmix and resample the subset to 16 kHz mono FLAC, per manifest.*.

    Reads data/subset/ and data/raw/; writes data/manifests/{train,val}.json (NeMo manifests) and audio/.
    """
    _run_stage("manifest", params)


@app.command()
def train(params: Path = PARAMS_OPTION) -> None:
    """LoRA fine-tune per model.*, lora.*, train.*; resumes from its newest matching checkpoint.

    Reads data/manifests/; writes models/canary-qwen-medical-lora/, metrics/train.json, and resumable checkpoints
    under checkpoints/train/ (git-ignored).
    """
    _run_stage("train", params, whole=True)


@app.command()
def testsets(params: Path = PARAMS_OPTION) -> None:
    """Prepare the held-out test sets in eval.test_sets (read like fetch.*, screened like subset, written like the
    manifest stage; clips that overlap train/val are dropped).

    Reads data/subset/; writes data/testsets/<name>/manifest.json (+ audio/) and metrics/testsets.json.
    """
    _run_stage("testsets", params, whole=True)


@app.command(name="eval")
def evaluate(params: Path = PARAMS_OPTION) -> None:
    """Transcribe val and every test set with the fine-tuned and the base model and score both, per eval.*.

    Reads data/manifests/val.json, data/testsets/ and models/canary-qwen-medical-lora/; writes metrics/eval.json
    (val.* and test.<name>.*, each with finetuned, base and wer_reduction) and metrics/predictions.jsonl.
    """
    _run_stage("eval", params, whole=True)


@app.command()
def transcribe(
    model: Path = typer.Argument(..., help="An exported model folder (models/canary-qwen-medical-lora)."),
    audio: list[Path] = typer.Argument(..., help="Audio files: any rate or channel count libsndfile reads."),
    batch_size: int = typer.Option(8, min=1),
    max_new_tokens: int = typer.Option(256, min=1),
) -> None:
    """Print `file<TAB>transcript` for each audio file, greedy decoding with the training prompt.

    Unreadable files are reported on stderr and skipped; the exit code is 1 if any was skipped.
    """
    from stages.audio import AudioDecodeError, decode
    from stages.inference import transcribe as run_transcribe
    from stages.model import load_model

    readable = []
    for path in audio:
        try:
            decode(path.read_bytes())
            readable.append(path)
        except (OSError, AudioDecodeError) as exc:
            typer.echo(f"skipped {path}: {exc}", err=True)
    try:
        loaded = load_model(model)
    except StageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_STAGE_FAILED) from None
    import torch

    if torch.cuda.is_available():
        loaded = loaded.to("cuda", dtype=torch.bfloat16)
    for path, text in zip(readable, run_transcribe(loaded, readable, batch_size, max_new_tokens), strict=True):
        typer.echo(f"{path}\t{text}")
    if len(readable) < len(audio):
        raise typer.Exit(EXIT_STAGE_FAILED)


@app.command()
def export(
    model: Path = typer.Option(Path("models/canary-qwen-medical-lora"), help="Exported model folder to read."),
    out: Path = typer.Option(..., help="Folder to write."),
    merged: bool = typer.Option(False, "--merged", help="Merge the LoRA adapter into the LLM (required)."),
) -> None:
    """Write a self-contained copy of a trained model with the LoRA merged in (plus a card of how it was made)."""
    from stages.model import export_merged

    if not merged:
        typer.echo(
            "error: only --merged export is supported; the unmerged folder is the train stage's output", err=True
        )
        raise typer.Exit(EXIT_BAD_PARAMS)
    try:
        export_merged(model, out)
    except StageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_STAGE_FAILED) from None
    typer.echo(f"wrote {out}")


remote_app = typer.Typer(help="DVC remote for this machine.", no_args_is_help=True)
app.add_typer(remote_app, name="remote")


@remote_app.command("setup")
def remote_setup() -> None:
    """Choose this machine's default DVC remote in .dvc/config.local: S3 when MEDASR_S3_URL is set, else a local
    folder under $MEDASR_WORKDIR. A default set in .dvc/config (`dvc remote add -d`) is kept. Writes no secrets."""
    import subprocess

    from stages.remote import setup_default_remote

    try:
        typer.echo(setup_default_remote())
    except (ValueError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        typer.echo(f"error: {detail.strip()}", err=True)
        raise typer.Exit(EXIT_STAGE_FAILED) from None


@remote_app.command("check")
def remote_check() -> None:
    """List the default DVC remote with the given credentials. Exit 0: reachable; 1: unreachable (worth retrying);
    2: refused or not configured (retrying cannot help). One line, never a credential."""
    from stages.remote import check_remote

    code, message = check_remote()
    typer.echo(message, err=code != 0)
    raise typer.Exit(code)


@remote_app.command("publish-status", hidden=True)
def remote_publish_status(
    logs: Path = typer.Option(..., help="runpod.sh's log folder (heartbeat, runpod.log, pipeline.log)."),
    run_id: str = typer.Option("default", envvar="MEDASR_RUN_ID"),
) -> None:
    """Upload runpod.sh's heartbeat and log tail to the DVC remote, where `medasr pod watch|status` read them."""
    from stages.remote import publish_status

    try:
        publish_status(logs / "heartbeat", [logs / "runpod.log", logs / "pipeline.log"], run_id)
    except Exception as exc:  # best effort: the loop goes on; the watcher sees an older heartbeat
        typer.echo(f"could not publish the run status: {type(exc).__name__}: {str(exc)[:200]}", err=True)
        raise typer.Exit(EXIT_STAGE_FAILED) from None


wandb_app = typer.Typer(help="Weights & Biases.", no_args_is_help=True)
app.add_typer(wandb_app, name="wandb")


@wandb_app.command("check")
def wandb_check() -> None:
    """Exit 0 when W&B is usable as configured (offline, disabled, or a key the server accepts), else 1 with one
    line saying why. The key is never printed."""
    from stages.tracking import verify_wandb, wandb_mode

    problem = verify_wandb()
    if problem:
        typer.echo(problem, err=True)
        raise typer.Exit(EXIT_STAGE_FAILED)
    typer.echo(f"W&B mode: {wandb_mode()}")


pod_app = typer.Typer(
    help="RunPod: launch the pod that runs `bash runpod.sh`, inspect it, and watch it until the metrics land.",
    no_args_is_help=True,
)
app.add_typer(pod_app, name="pod")


def _git(*args: str) -> str:
    import subprocess

    out = subprocess.run(["git", *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def _pod_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from stages.pod import PodError

    try:
        return fn(*args, **kwargs)
    except PodError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_STAGE_FAILED) from None


def _api() -> Any:
    import os

    from stages.pod import RunPodAPI

    return _pod_call(RunPodAPI, os.environ.get("RUNPOD_API_KEY", ""))


def _read_beat(run_id: str) -> dict | None:
    from stages.remote import read_status

    try:
        return read_status(run_id)[0]
    except Exception as exc:  # the remote may be briefly unreachable: the watcher goes on with the pod's status
        typer.echo(f"warning: could not read the run status from the DVC remote: {type(exc).__name__}", err=True)
        return None


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
    import json
    import os
    import time

    from stages.pod import (
        DEFAULT_GPUS,
        DEFAULT_IMAGE,
        LaunchState,
        PodSpec,
        create_payload,
        launch,
        redact_url,
        redacted,
    )

    environ = dict(os.environ)
    ref = git_ref or _git("rev-parse", "HEAD")
    url = repo_url or _git("remote", "get-url", "origin")
    problems = []
    if not url and not environ.get("MEDASR_REPO_URL"):
        problems.append("no repo URL for the pod to clone: add a git remote `origin` or pass --repo-url")
    if not git_ref and ref and not _git("branch", "-r", "--contains", ref):
        problems.append(f"HEAD {ref[:12]} is on no remote branch, so the pod cannot check it out: push it first")
    if not environ.get("MEDASR_S3_URL"):
        problems.append("MEDASR_S3_URL is not set: the pod's results, checkpoints and heartbeat need an S3 remote")
    if _git("status", "--porcelain", "--untracked-files=no"):
        typer.echo("warning: uncommitted changes stay here; the pod runs the committed state", err=True)
    if url and redact_url(url) != url and not environ.get("MEDASR_REPO_URL"):
        # a token in the URL: it travels only as pod env; put it in .env (MEDASR_REPO_URL) for `pod watch` too
        environ["MEDASR_REPO_URL"] = url
    spec = PodSpec(
        name=name,
        repo_url=redact_url(url),
        git_ref=ref,
        run_id=f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}",
        gpus=list(gpu or DEFAULT_GPUS),
        image=image or DEFAULT_IMAGE,
        disk_gb=disk_gb,
        volume_id=volume,
        data_centers=list(data_center or []),
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
    pod = _pod_call(launch, api, spec, environ)
    LaunchState(pod_id=pod["id"], spec=spec).save()
    typer.echo(f"pod {pod['id']} created ({pod.get('status', '?')}), run {spec.run_id}; next: `medasr pod watch`")


@pod_app.command("status")
def pod_status() -> None:
    """The pod's state and cost, and the last heartbeat runpod.sh published."""
    import time

    from stages.pod import LaunchState

    state = _pod_call(LaunchState.load)
    pod = _pod_call(_api().get, state.pod_id)
    if pod is None:
        typer.echo(f"pod {state.pod_id}: gone (terminated)")
    else:
        gpu = (pod.get("gpu") or {}).get("id", "?")
        typer.echo(f"pod {state.pod_id}: {pod.get('status')} on {gpu}, ${pod.get('cost', 0):.2f}/h")
    beat = _read_beat(state.spec.run_id)
    if beat:
        age = time.time() - float(beat.get("time", 0))
        typer.echo(f"run {state.spec.run_id}: {beat.get('state')} {beat.get('detail', '')} ({age:.0f}s ago)")
    else:
        typer.echo(f"run {state.spec.run_id}: no heartbeat published yet")
    typer.echo(f"spent (as seen by `medasr pod watch`): ~${state.spent_usd:.2f}; recoveries: {state.recoveries}")


@pod_app.command("logs")
def pod_logs(
    tail: int = typer.Option(200, min=0, max=5000, help="Lines of history."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming."),
) -> None:
    """The pod's container log (runpod.sh's own output) through RunPod's API."""
    from stages.pod import LaunchState

    state = _pod_call(LaunchState.load)

    def stream() -> None:
        for line in _api().logs(state.pod_id, tail, follow):
            typer.echo(line)

    _pod_call(stream)


@pod_app.command("down")
def pod_down(terminate: bool = typer.Option(False, "--terminate", help="Delete it (network volume kept).")) -> None:
    """Stop the pod (its volume and the remote keep everything), or terminate it."""
    from stages.pod import LaunchState

    state = _pod_call(LaunchState.load)
    _pod_call(_api().action, state.pod_id, "terminate" if terminate else "stop")
    typer.echo(f"pod {state.pod_id}: {'terminated' if terminate else 'stopped'}")


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
    import os

    from stages.pod import LaunchState, WatchSettings, watch

    state = _pod_call(LaunchState.load)
    settings = WatchSettings(
        max_usd=max_usd,
        poll_s=poll_s,
        stale_after_s=stale_after_s,
        max_recoveries=max_recoveries,
        backoff_base_s=backoff_base_s,
    )
    code = _pod_call(watch, _api(), state, _read_beat, dict(os.environ), settings, say=typer.echo)
    raise typer.Exit(code)


@app.command()
def doctor(params: Path = PARAMS_OPTION) -> None:
    """Check this machine: package versions, GPU, disk, DVC remote, W&B mode, secrets present, params valid.

    Prints a table; exits 1 when a check fails. Secret values are never printed, only whether they are set.
    """
    from stages import doctor as stage

    checks = stage.run_checks(params)
    stage.print_table(checks)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(EXIT_STAGE_FAILED)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
