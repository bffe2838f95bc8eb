"""`medasr`: the command line. It only loads params and delegates to one stage module per command.

Each stage command validates the whole params file first (every problem reported at once, exit 2) and only then
imports its stage, so a typo costs milliseconds and never touches outputs. Heavy imports (datasets, NeMo) happen
inside the commands that need them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

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
    """Read the dataset named by fetch.* (hub id or local parquet/audiofolder/NeMo manifest).

    Writes data/raw/ (parquet shards of original audio bytes + text, and source.json).
    """
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


@app.command(name="eval")
def evaluate(params: Path = PARAMS_OPTION) -> None:
    """Transcribe the val split with the fine-tuned and the base model and score both, per eval.*.

    Reads data/manifests/val.json and models/canary-qwen-medical-lora/; writes metrics/eval.json and
    metrics/predictions.jsonl.
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
