"""Experiment tracking behind one function: `loggers()` returns the Lightning loggers for a training run.

- DVCLive: loss, learning rate and validation metrics per step, so `dvc plots show` draws the curves. Its files
  live in the checkpoint folder (they travel with the checkpoint) and are copied to `metrics/train_curves/`.
- Weights & Biases: project `medical-asr-poc-<model.preset>`, run name from the LoRA params and fingerprint.
  Online when WANDB_API_KEY is set, offline otherwise (sync later with `wandb sync`), off with
  WANDB_MODE=disabled. The run id is kept beside the checkpoint, so a resumed run appends to the same W&B run.
Only the train stage's params blocks go into the W&B config: they are validated and hold no secrets (those stay
in the environment).

Each validation also logs a few fixed utterances' reference and hypothesis (`log_val_samples`: a W&B table and
`<dvclive>/val_samples.tsv`), and a validation WER markedly worse than the best so far (`markedly_worse`) is a
warning, which the pod's heartbeat carries (VALIDATION_STATUS).
"""

from __future__ import annotations

import csv
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from medasr.files import write_json_atomic
from medasr.log import get_logger
from medasr.paths import DVCLIVE_DIR, TRAIN_CURVES_DIR, VAL_SAMPLES_FILE, WANDB_ID_FILE

log = get_logger(__name__)


def truncate_history(live_dir: Path, step: int) -> None:
    """Drop DVCLive rows (and sample rows) logged after `step` (work lost in a crash), so a resumed run never repeats
    a step."""
    for tsv in [*live_dir.glob("plots/metrics/**/*.tsv"), *live_dir.glob(VAL_SAMPLES_FILE)]:
        with open(tsv, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
            fields = list(rows[0]) if rows else []
        kept = [r for r in rows if int(r["step"]) <= step]
        with open(tsv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t")
            writer.writeheader()
            writer.writerows(kept)


# --- what validation shows -------------------------------------------------------------------------------------------
# A handful of utterances, the first of the fixed validation slice, so the same ones appear at every validation and a
# reader follows each one change: enough to see different kinds of mistakes, few enough to read at a glance.
VAL_SAMPLES = 4
SAMPLE_COLUMNS = ["step", "id", "wer", "reference", "hypothesis"]
# "Markedly worse": more than 5 WER points above the best so far, or 20 % of it where that is more. On a validation
# slice of ~100 utterances greedy WER moves a point or two between validations from noise alone; a jump past both
# margins is a run going wrong (learning rate too high, a bad data shard, overfitting), worth a look before the next
# checkpoint, though not a reason to stop (early stopping is train.early_stop_*'s).
WORSE_ABS = 0.05
WORSE_REL = 0.20


def markedly_worse(wer: float, best: float | None) -> bool:
    """Whether validation WER `wer` is markedly worse than the best so far (None: this is the first)."""
    return best is not None and wer > best + max(WORSE_ABS, WORSE_REL * best)


def log_val_samples(trackers: list[Any], step: int, rows: list[list[Any]]) -> None:
    """Log one validation's sample rows (SAMPLE_COLUMNS, without the step) to each tracker: a W&B table `val_samples`
    at `step` (the UI's step slider walks the validations), and rows appended to DVCLive's `val_samples.tsv`, the
    file a reader opens beside the curves (text is no plot: `dvc plots` draws numbers, so it stays out of plots/)."""
    from dvclive.lightning import DVCLiveLogger
    from lightning.pytorch.loggers import WandbLogger

    stamped = [[step, *row] for row in rows]
    for tracker in trackers:
        if isinstance(tracker, WandbLogger):
            tracker.log_table("val_samples", columns=SAMPLE_COLUMNS, data=stamped, step=step)
        elif isinstance(tracker, DVCLiveLogger):
            tsv = Path(tracker.experiment.dir) / VAL_SAMPLES_FILE
            new = not tsv.is_file()
            with open(tsv, "a", newline="") as f:
                writer = csv.writer(f, delimiter="\t")
                if new:
                    writer.writerow(SAMPLE_COLUMNS)
                writer.writerows(stamped)


def report_validation(
    trackers: list[Any], status_file: Path, step: int, wer: float, best: float | None, samples: list[list[Any]]
) -> None:
    """What a validation shows besides its WER: its sample rows in each tracker, and `status_file` (the last
    validation: step, WER, warning), whose warning, when `wer` is markedly worse than `best` (the best so far), is
    also logged and shown in the pod's heartbeat."""
    log_val_samples(trackers, step, samples)
    warning = None
    if markedly_worse(wer, best):
        warning = f"step {step}: val WER {wer:.4f} is markedly worse than the best so far, {best:.4f}"
        log.warning(warning)
    write_json_atomic(status_file, {"step": step, "wer": wer, "warning": warning})


def wandb_info(run_dir: Path, preset: str, lora_rank: int, fp: str) -> dict[str, Any] | None:
    """The W&B run this training writes to (id stable across resumes), or None when W&B is disabled."""
    mode = wandb_mode()
    if mode == "disabled":
        return None
    id_file = run_dir / WANDB_ID_FILE
    if not id_file.is_file():
        id_file.write_text(secrets.token_hex(4) + "\n")  # W&B run ids: short, lowercase alphanumeric
    return {
        "id": id_file.read_text().strip(),
        "project": f"medical-asr-poc-{preset}",
        "name": f"lora-r{lora_rank}-{fp[:8]}",
        "offline": mode != "online",
    }


def wandb_mode() -> str:
    """online with a key, offline without one, unless WANDB_MODE says otherwise: the one rule training, `doctor`,
    `medasr wandb check` and runpod.sh (through that command) follow."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def verify_wandb(timeout_s: int = 20) -> str | None:
    """None when W&B is usable as configured (offline/disabled, or online with a key the server accepts), else one
    line saying why not. The key is sent only to W&B (or WANDB_BASE_URL) and never appears in the message."""
    mode = wandb_mode()
    if mode != "online":
        return None
    key = os.environ.get("WANDB_API_KEY", "")
    if not key:
        return "WANDB_MODE=online but WANDB_API_KEY is not set"
    import threading

    import wandb

    failure: list[BaseException] = []

    def ask() -> None:
        try:
            wandb.Api(api_key=key, timeout=timeout_s).viewer  # noqa: B018  (the property makes the authenticated call)
        except Exception as exc:
            failure.append(exc)

    # W&B's client retries connection errors far beyond its request timeout: a preflight must not hang on it
    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(timeout_s * 2)
    if asking.is_alive():
        return f"W&B rejected or could not check WANDB_API_KEY: no answer within {timeout_s * 2} s"
    if failure:
        exc = failure[0]
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"W&B rejected or could not check WANDB_API_KEY: {detail.replace(key, '<redacted>')[:300]}"
    return None


def loggers(
    preset: str, lora_rank: int, config: dict[str, Any], run_dir: Path, fp: str, resumed_step: int | None
) -> tuple[list[Any], dict[str, Any] | None]:
    """DVCLive (always) and W&B (unless disabled) loggers; `config` is what W&B records as the run's config."""
    from dvclive.lightning import DVCLiveLogger

    live_dir = run_dir / DVCLIVE_DIR
    if resumed_step is None:
        shutil.rmtree(live_dir, ignore_errors=True)
    else:
        truncate_history(live_dir, resumed_step)
    # dvcyaml/save_dvc_exp off: the pipeline's dvc.yaml declares the curves; DVC, not DVCLive, tracks the run
    out: list[Any] = [
        DVCLiveLogger(dir=str(live_dir), resume=resumed_step is not None, dvcyaml=None, save_dvc_exp=False)
    ]
    info = wandb_info(run_dir, preset, lora_rank, fp)
    if info is not None:
        from lightning.pytorch.loggers import WandbLogger

        # An inherited WANDB_SERVICE would attach this run to a parent's W&B service, which still holds the run id
        # of a training killed earlier ("run ID is in use"): each training process runs its own service.
        os.environ.pop("WANDB_SERVICE", None)
        import wandb

        # W&B reads WANDB_SILENT (medasr/log.py) at setup; Lightning's logger draws a notice before W&B's own setup.
        # The mode must be given here too: a setup without it is online, and then asks for a key even offline.
        wandb.setup(settings=wandb.Settings(mode="offline" if info["offline"] else "online"))

        logger = WandbLogger(
            project=info["project"],
            name=info["name"],
            id=info["id"],
            resume="allow",
            save_dir=str(run_dir),
            offline=info["offline"],
            config=config,
        )
        out.append(logger)
        if info["offline"]:
            log.info(
                "W&B offline run %s in %s/wandb (upload later: `wandb sync %s/wandb`)", info["id"], run_dir, run_dir
            )
        else:
            info["url"] = logger.experiment.url
            log.info("W&B run: %s", info["url"])
    return out, info


def publish_curves(run_dir: Path, out: Path = TRAIN_CURVES_DIR) -> None:
    """Copy the DVCLive files to the stage's declared plots output."""
    shutil.rmtree(out, ignore_errors=True)
    if (run_dir / DVCLIVE_DIR).is_dir():
        shutil.copytree(run_dir / DVCLIVE_DIR, out)
