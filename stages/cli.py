"""`medasr`: the command line. Each command parses its options, validates params and hands each stage the params
blocks it reads; the stages and the library do the work.

Each stage command validates the whole params file first (every problem reported at once, exit 2) and only then
imports its stage, so a typo costs milliseconds and never touches outputs. Heavy imports (datasets, NeMo) happen
inside the commands that need them. The remote, W&B and RunPod commands live in stages/cli_ops.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from dotenv import load_dotenv

from medasr import MedasrError
from medasr import log as logs
from medasr.params import MODEL_MAX_AUDIO_SECONDS, EvalParams, Params, ParamsError, load_params
from medasr.paths import EVAL_METRICS, MODEL_DIR, command_log
from stages import cli_loop, cli_ops

app = typer.Typer(
    help="Medical speech fine-tuning pipeline for canary-qwen-2.5b. DVC calls one command per stage; "
    "run `dvc repro` for the whole pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(cli_ops.remote_app, name="remote")
app.add_typer(cli_ops.wandb_app, name="wandb")
app.add_typer(cli_ops.pod_app, name="pod")
app.add_typer(cli_loop.loop_app, name="loop", hidden=True)

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", "-p", help="Params file (relative to the working dir).")
EXIT_BAD_PARAMS = cli_ops.EXIT_BAD_PARAMS
EXIT_FAILED = cli_ops.EXIT_FAILED


STAGE_COMMANDS = {"fetch", "subset", "manifest", "testsets", "train", "eval"}


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Debug logging, and the libraries' messages on the console (not only in logs/)."
    ),
) -> None:
    # Variables already in the environment win over .env, so a pod's injected secrets are never shadowed.
    load_dotenv(Path.cwd() / ".env", override=False)
    logs.setup(verbose, command_log(ctx.invoked_subcommand or "medasr"))
    if ctx.invoked_subcommand in STAGE_COMMANDS:
        _hold_stage_pidfile()


def _hold_stage_pidfile() -> None:
    """Write this process's pid to $MEDASR_STAGE_PIDFILE (runpod.sh sends its stop signals there, so they reach the
    stage process, which stops its own data workers and ranks, and not those workers), removed at exit while it still
    names this process. DDP ranks > 0, which Lightning's launcher starts by re-running this command, leave it alone."""
    import atexit
    import os

    from medasr.files import write_text_atomic
    from medasr.paths import STAGE_PIDFILE_ENV
    from stages.train.checkpoints import RANK0_ENV

    pidfile, pid = os.environ.get(STAGE_PIDFILE_ENV), str(os.getpid())
    ranks = [os.environ.get(v) or "0" for v in ("LOCAL_RANK", "RANK")]
    if not pidfile or RANK0_ENV in os.environ or ranks != ["0", "0"]:
        return
    write_text_atomic(pidfile, pid + "\n")

    def release() -> None:
        path = Path(pidfile)
        if path.is_file() and path.read_text().strip() == pid:
            path.unlink(missing_ok=True)

    atexit.register(release)


def _params(path: Path) -> Params:
    try:
        return load_params(path)
    except ParamsError as exc:
        typer.echo(f"error: invalid params in {exc.source}:", err=True)
        for problem in exc.problems:
            typer.echo(f"  - {problem}", err=True)
        raise typer.Exit(EXIT_BAD_PARAMS) from None


def _one_line_errors(work: Callable[[], Any]) -> Any:
    """Run `work`; an expected failure (MedasrError) becomes `error: ...` and exit 1, without a traceback."""
    try:
        return work()
    except MedasrError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None


@app.command()
def fetch(params: Path = PARAMS_OPTION) -> None:
    """Read the dataset named by fetch.*: a hub id, or a local parquet file, audiofolder, NeMo manifest, OSCE
    segment list or TextGrid folder (PriMock57).

    Writes data/raw/ (parquet shards of original audio bytes + text, and source.json). First checks that every
    local dataset path in fetch.* and eval.test_sets exists, so a typo fails here rather than after training.
    """
    from medasr.ops.doctor import dataset_problems

    p = _params(params)
    if problems := dataset_problems(p.fetch, p.eval.test_sets):
        typer.echo("error: dataset not found:", err=True)
        for problem in problems:
            typer.echo(f"  - {problem}", err=True)
        raise typer.Exit(EXIT_BAD_PARAMS)
    from stages import fetch as stage

    _one_line_errors(lambda: stage.run(p.fetch))


@app.command()
def subset(params: Path = PARAMS_OPTION) -> None:
    """Filter data/raw/ and split it into train/val by stable hashes, per subset.*.

    Writes data/subset/{train,val,dropped}.jsonl and metrics/data.json (kept, hours, dropped per reason).
    """
    p = _params(params)
    from stages import subset as stage

    _one_line_errors(lambda: stage.run(p.subset))


@app.command()
def manifest(params: Path = PARAMS_OPTION) -> None:
    """Decode, downmix and resample the subset to 16 kHz mono FLAC, per manifest.*.

    Reads data/subset/ and data/raw/; writes data/manifests/{train,val}.json (NeMo manifests) and audio/.
    """
    p = _params(params)
    from stages import manifest as stage

    _one_line_errors(lambda: stage.run(p.manifest))


@app.command()
def train(
    params: Path = PARAMS_OPTION,
    fresh: bool = typer.Option(
        False,
        "--fresh",
        envvar="MEDASR_TRAIN_FRESH",  # how `dvc repro`/`dvc exp run`, which run plain `medasr train`, ask for it
        help="Start over: move this run's checkpoints (local and on the DVC remote) aside to "
        "<fingerprint>.aside-<UTC time>, keeping the newest aside copy per run.",
    ),
) -> None:
    """LoRA fine-tune per model.*, lora.*, train.*; resumes from its newest matching checkpoint unless --fresh.

    Reads data/manifests/; writes models/canary-qwen-medical-lora/, metrics/train.json, and resumable checkpoints
    under checkpoints/train/ (git-ignored).
    """
    p = _params(params)
    from stages.train.run import run

    _one_line_errors(lambda: run(p.model, p.lora, p.train, val_max_new_tokens=p.eval.max_new_tokens, fresh=fresh))


@app.command()
def testsets(params: Path = PARAMS_OPTION) -> None:
    """Prepare the held-out test sets in eval.test_sets (read like fetch.*, screened like subset, written like the
    manifest stage; clips that overlap train/val are dropped).

    Reads data/subset/; writes data/testsets/<name>/manifest.json (+ audio/) and metrics/testsets.json.
    """
    p = _params(params)
    from stages import testsets as stage

    _one_line_errors(lambda: stage.run(p.eval.test_sets, p.subset, p.manifest))


@app.command(name="eval")
def evaluate(params: Path = PARAMS_OPTION) -> None:
    """Transcribe val, every test set and a sample of the training clips with the fine-tuned and the base model
    and score both, per eval.*; on the GPU when there is one, in the precision the model was trained in.

    Reads data/manifests/{val,train}.json, data/testsets/, models/canary-qwen-medical-lora/; writes metrics/eval.json
    (val.*, test.<name>.*, train_sample.*: finetuned, base, wer_reduction with 95% intervals; summary, runtime),
    predictions.jsonl, report.md and wer_by_set.json (the plot) under metrics/; prints the headline table."""
    p = _params(params)
    from medasr.report import headline_table
    from stages import eval as stage

    typer.echo(headline_table(_one_line_errors(lambda: stage.run(p.eval, p.model, p.lora, p.train.seed))))


@app.command()
def report() -> None:
    """Print metrics/eval.json's headline table: per set both models' WER and the reduction with its 95% interval,
    the pooled gain and forgetting check, the headline sentence. metrics/report.md holds the rest."""
    from medasr.report import headline_table

    if not EVAL_METRICS.is_file():
        typer.echo(f"error: {EVAL_METRICS} is missing: run `medasr eval` (or `dvc repro`) first", err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo(headline_table(json.loads(EVAL_METRICS.read_text(encoding="utf-8"))))


@app.command()
def transcribe(
    model: Path = typer.Argument(..., help="An exported model folder (models/canary-qwen-medical-lora)."),
    audio: list[Path] = typer.Argument(..., help="Audio files: any rate or channel count libsndfile reads."),
    batch_size: int = typer.Option(8, min=1),
    max_new_tokens: int = typer.Option(256, min=1),
    chunk_s: float = typer.Option(
        EvalParams.model_fields["chunk_s"].default,
        help=f"Longer audio is decoded in windows of at most this many seconds (0 < s <= {MODEL_MAX_AUDIO_SECONDS:g}), "
        "cut at silences.",
    ),
    overlap_s: float = typer.Option(
        EvalParams.model_fields["chunk_overlap_s"].default,
        help="Seconds neighbouring windows share (below --chunk-s): their transcripts are merged on the words there.",
    ),
) -> None:
    """Print `file<TAB>transcript` for each audio file, whatever its length, greedy decoding with the training
    prompt, on the GPU when there is one, in the precision the model was trained in.

    Unreadable files are reported on stderr and skipped; the exit code is 1 if any was skipped.
    """
    from medasr.longform import check_window_settings

    try:
        check_window_settings(chunk_s, overlap_s)
    except ValueError as exc:
        typer.echo(f"error: --chunk-s / --overlap-s: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_PARAMS) from None
    from medasr.audio import audio_problem
    from medasr.device import place
    from medasr.export import load_model, model_precision
    from medasr.inference import transcribe_long

    readable = []
    for path in audio:
        if problem := audio_problem(path):
            typer.echo(f"skipped {path}: {problem}", err=True)
        else:
            readable.append(path)
    precision = _one_line_errors(lambda: model_precision(model))  # before loading: a wrong folder fails at once
    loaded = place(_one_line_errors(lambda: load_model(model)), precision)  # the accelerator, as in training
    done = transcribe_long(loaded, readable, batch_size, max_new_tokens, chunk_s, overlap_s)
    for path, transcript in zip(readable, done, strict=True):
        typer.echo(f"{path}\t{transcript.text}")
    if len(readable) < len(audio):
        raise typer.Exit(EXIT_FAILED)


@app.command(name="download-model")
def download_model(params: Path = PARAMS_OPTION) -> None:
    """Put model.pretrained (at model.revision) and its LLM's tokenizer/config in the Hugging Face cache (HF_HOME),
    so no GPU stage waits on a download; offline (HF_HUB_OFFLINE=1) only checks they are cached.

    Nothing to do for the tiny and compose presets.
    """
    from medasr.release import download

    p = _params(params)
    _one_line_errors(lambda: download(p.model.preset, p.model.pretrained, p.model.revision))


@app.command()
def export(
    model: Path = typer.Option(MODEL_DIR, help="Exported model folder to read."),
    out: Path = typer.Option(..., help="Folder to write."),
    repo: str = typer.Option(
        None, "--push-to-hub", metavar="REPO", help="Then upload the folder to this Hugging Face model repo."
    ),
) -> None:
    """Write a self-contained copy of a trained model with the LoRA merged in, plus a model card of how it was made
    and, for the pipeline's own model, its test results from metrics/eval.json (in Hugging Face's model-index).

    With --push-to-hub, the folder is then uploaded (the repo is created private when missing) with the token in
    HF_TOKEN; without one the command stops before any work.
    """
    from medasr.export import eval_results, export_merged, hub_token, push_to_hub

    token = _one_line_errors(lambda: hub_token(repo)) if repo is not None else None
    _one_line_errors(lambda: export_merged(model, out, eval_results(model)))
    typer.echo(f"wrote {out}")
    if repo is not None and token is not None:
        typer.echo(f"uploaded to {repo}: {_one_line_errors(lambda: push_to_hub(out, repo, token))}")


@app.command()
def doctor(
    params: Path = PARAMS_OPTION,
    disk: Path = typer.Option(
        None, help="Only check the free disk space at this path: one line, exit 1 below MEDASR_MIN_FREE_GB."
    ),
) -> None:
    """Check this machine: package versions, GPU, disk, DVC remote, W&B mode, secrets present, params valid.

    Prints a table; exits 1 when a check fails. Secret values are never printed, only whether they are set.
    """
    from medasr.ops import doctor as checks

    if disk is not None:
        check = checks.disk(disk)
        typer.echo(check.value, err=check.status != "ok")
        raise typer.Exit(EXIT_FAILED if check.status != "ok" else 0)
    found = checks.run_checks(params)
    checks.print_table(found)
    if any(c.status == "fail" for c in found):
        raise typer.Exit(EXIT_FAILED)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
