"""`medasr loop ...`: what runpod.sh asks between and during attempts on the pod (hidden: not for people). Each prints
one line and exits 0 ok, 1 transient (retry later: the remote or the API could not be reached), 2 final (retrying
cannot help: the lease is another pod's, the deadline or budget is reached). They run every few seconds, so none
imports torch, NeMo or a stage.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import NoReturn

import typer

from medasr.paths import CHECKPOINT_ROOT

EXIT_TRANSIENT = 1
EXIT_FINAL = 2
SWEPT_ROOTS = (Path("data"), Path("models"), Path("metrics"), CHECKPOINT_ROOT.parent)

loop_app = typer.Typer(help="Pod-side helpers for runpod.sh.", no_args_is_help=True)
lease_app = typer.Typer(help="The DVC remote's lease: one pod runs the pipeline.", no_args_is_help=True)
loop_app.add_typer(lease_app, name="lease")


def _fail(code: int, line: str) -> NoReturn:
    typer.echo(line, err=True)
    raise typer.Exit(code)


def _one_line(exc: BaseException) -> str:
    from medasr.ops.podside import error_line

    return error_line(exc)


class _Stopped(Exception):
    """SIGTERM while `beat --every` waits between beats."""


@loop_app.command()
def beat(
    heartbeat: Path = typer.Option(..., help="runpod.sh's heartbeat file (one JSON object)."),
    lease: bool = typer.Option(False, "--lease", help="Also renew this loop's lease (exit 2 when it is lost)."),
    every: float = typer.Option(
        0.0, "--every", help="Beat every S seconds until SIGTERM, in this one process (0: once, then exit)."
    ),
    run_id: str = typer.Option("default", envvar="MEDASR_RUN_ID"),
) -> None:
    """Publish the heartbeat, with the last complete checkpoint step and the last validation's warning (a WER markedly
    worse than the best so far; null when none) added, as the run status on the DVC remote. With --every, a failed
    publish or renewal is a warning line and the beats go on (the lease's TTL covers a few); SIGTERM lets the beat in
    flight land, then exits 0, so no beat lands after what the loop publishes next."""
    from medasr.ops.lease import LeaseHeld
    from medasr.ops.podside import Beater

    beater = Beater(heartbeat, run_id, lease)
    state = {"busy": False, "stopping": False}

    def on_term(signum: int, frame: object) -> None:
        state["stopping"] = True
        if not state["busy"]:
            raise _Stopped

    if every > 0:
        signal.signal(signal.SIGTERM, on_term)
    next_at = time.monotonic()
    try:
        while True:
            state["busy"] = True
            try:
                problems = beater.beat()
            except LeaseHeld as held:  # the other pod owns the run status now: publish nothing over it
                who = held.lease
                _fail(EXIT_FINAL, f"lease lost: held by pod {who.get('pod') or '?'} (host {who.get('host')})")
            if every <= 0:
                if problems:  # the publish's problem over the renewal's: one line
                    _fail(EXIT_TRANSIENT, problems[-1])
                return
            state["busy"] = False
            for line in problems:
                typer.echo(f"warning: {line}", err=True)
            if state["stopping"]:
                return
            next_at = max(next_at + every, time.monotonic())
            time.sleep(max(0.0, next_at - time.monotonic()))
    except _Stopped:
        return


@lease_app.command("check")
def lease_check() -> None:
    """Read only: exit 0 when this loop may take the lease (free, its own, reclaimable), 2 when another live holder
    has it, 1 when it cannot be read."""
    from medasr.ops.lease import check_lease

    try:
        state, line = check_lease()
    except Exception as exc:  # unreadable is not free
        _fail(EXIT_TRANSIENT, f"lease unreadable: {_one_line(exc)}")
    if state == "held":
        _fail(EXIT_FINAL, line)
    typer.echo(line)


@lease_app.command("take")
def lease_take() -> None:
    """Take or renew the lease for this loop (MEDASR_LEASE_PID, runpod.sh's pid; RUNPOD_POD_ID). Exit 2 when another
    live holder has it; an expired one, a former container's of this pod, or a gone process's here is reclaimed."""
    from medasr.ops.lease import LeaseHeld, take_lease

    try:
        typer.echo(take_lease())
    except LeaseHeld as held:
        _fail(EXIT_FINAL, str(held))
    except Exception as exc:  # unreadable is not free
        _fail(EXIT_TRANSIENT, f"lease not taken: {_one_line(exc)}")


@lease_app.command("release")
def lease_release() -> None:
    """Remove the lease when this loop holds it (another holder's is left alone)."""
    from medasr.ops.lease import release_lease

    try:
        released = release_lease()
    except Exception as exc:
        _fail(EXIT_TRANSIENT, f"lease not released: {_one_line(exc)}")
    typer.echo("lease released" if released else "lease not held by this loop: left as it is")


@loop_app.command("stop-pod")
def stop_pod() -> None:
    """Stop this pod (RUNPOD_POD_ID): `runpodctl stop pod` with retries (MEDASR_STOP_RETRIES, MEDASR_STOP_BACKOFF_S),
    then RunPod's REST API with retries. Exit 0 stopped (or not on a pod), 1 failed."""
    from medasr.ops.podside import stop_pod as stop

    stopped, line = stop(dict(os.environ))
    if not stopped:
        _fail(EXIT_TRANSIENT, line)
    typer.echo(line)


@loop_app.command()
def budget() -> None:
    """Exit 2 when this pod's deadline (MEDASR_DEADLINE_H) or budget (MEDASR_MAX_USD), counted from the pod's start,
    is reached; off without RUNPOD_POD_ID or either setting."""
    from medasr.ops.podside import check_budget

    try:
        code, line = check_budget(dict(os.environ))
    except ValueError as exc:  # a limit that cannot be read must not let the pod run unbounded
        _fail(EXIT_FINAL, str(exc))
    if code:
        _fail(code, line or "")
    if line:
        typer.echo(line)


@loop_app.command()
def progress() -> None:
    """Print a token that changes whenever the run progressed (a newer checkpoint step, a finished stage)."""
    from medasr.ops.podside import progress_token

    try:
        typer.echo(progress_token())
    except OSError as exc:  # an unreadable dvc.lock: no token, so runpod.sh counts no progress
        _fail(EXIT_TRANSIENT, f"progress unknown: {_one_line(exc)}")


@loop_app.command()
def sweep() -> None:
    """Delete the temp files and folders killed atomic writes left under data/, models/, metrics/ and checkpoints/
    (`.<name>.<random>.tmp`, nothing else). Refused (exit 1) while the stage in $MEDASR_STAGE_PIDFILE runs."""
    from medasr.files import sweep_temps
    from medasr.ops.podside import stage_running

    if (pid := stage_running()) is not None:
        _fail(EXIT_TRANSIENT, f"not sweeping: a stage runs (pid {pid})")
    try:
        removed, freed = sweep_temps(SWEPT_ROOTS)
    except OSError as exc:  # an entry gone meanwhile, or one this user may not remove: the next attempt sweeps again
        _fail(EXIT_TRANSIENT, f"sweep stopped: {_one_line(exc)}")
    typer.echo(f"swept {removed} temp entries of killed writes, {freed / 1e9:.2f} GB freed" if removed else "no temps")
