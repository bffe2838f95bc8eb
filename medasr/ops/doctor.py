"""`medasr doctor`: what this machine offers the pipeline, as one table. Reads, never writes."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medasr import sources
from medasr.ops.mirror import remote_asides
from medasr.params import FetchParams, ParamsError, TestSetParams, load_params
from medasr.paths import CHECKPOINT_ROOT, aside_of
from medasr.secrets import SECRETS, one_line, redact_url
from medasr.tracking import wandb_mode

Status = Literal["ok", "warn", "fail"]

PACKAGES = ("torch", "nemo_toolkit", "transformers", "lightning", "lhotse", "peft", "dvc", "dvc-s3", "datasets")
# The released checkpoint (~5 GB), HF/NeMo caches, DVC cache and checkpoints; MEDASR_MIN_FREE_GB overrides it
# (runpod.sh's preflight asks this same check through `medasr doctor --disk`).
MIN_FREE_DISK_GIB = 20


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    status: Status = "ok"


def _version(package: str) -> Check:
    try:
        return Check(package, metadata.version(package))
    except metadata.PackageNotFoundError:
        return Check(package, "not installed", "fail")


def _gpu() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("gpu", f"none (CPU only; torch {torch.__version__})", "warn")
    names = [
        f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
        for i in range(torch.cuda.device_count())
    ]
    return Check("gpu", ", ".join(names))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _listing(asides: dict[str, int]) -> str:
    return ", ".join(f"{name} ({_size(size)})" for name, size in asides.items())


def local_asides(root: Path = CHECKPOINT_ROOT) -> dict[str, int]:
    """The checkpoint folders `medasr train --fresh` moved aside here, with the bytes each holds."""
    folders = sorted(d for d in root.iterdir() if d.is_dir() and aside_of(d.name)) if root.is_dir() else []
    return {str(d): sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in folders}


def disk(path: Path) -> Check:
    """Free space at `path` against the floor (warn below it), naming the checkpoints moved aside here, which a
    user may delete to free space (one line: runpod.sh's preflight logs it)."""
    setting = os.environ.get("MEDASR_MIN_FREE_GB") or str(MIN_FREE_DISK_GIB)
    try:
        floor = float(setting)
    except ValueError:
        return Check("disk free", f"MEDASR_MIN_FREE_GB={setting!r} is not a number of GiB", "fail")
    free = shutil.disk_usage(path).free / 2**30
    status: Status = "ok" if free >= floor else "warn"
    asides = local_asides()
    held = f"; checkpoints moved aside by --fresh: {_listing(asides)}" if asides else ""
    return Check("disk free", f"{free:.0f} GiB at {path} (need {floor:g}){held}", status)


def _remote_asides() -> Check:
    from dvc.exceptions import NotDvcRepoError

    name = "aside checkpoints (remote)"
    try:
        found = remote_asides()
    except NotDvcRepoError:
        return Check(name, "no DVC repo here")
    except Exception as exc:  # unreachable, refused: the dvc remote row says more
        return Check(name, f"could not list: {one_line(exc)}", "warn")
    if found is None:
        return Check(name, "no default DVC remote")
    return Check(f"aside checkpoints ({found[0]})", _listing(found[1]) or "none")


def _dvc_remote() -> Check:
    try:
        # this interpreter's DVC, not whichever `dvc` is first on PATH
        out = subprocess.run(
            [sys.executable, "-m", "dvc", "remote", "list"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("dvc remote", f"dvc not runnable: {exc}", "fail")
    if out.returncode != 0:
        return Check("dvc remote", out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "dvc failed", "warn")
    remotes = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if not remotes:
        return Check("dvc remote", "none configured (`dvc push` has nowhere to go)", "warn")
    default = [r for r in remotes if len(r) > 2 and "(default)" in r]
    shown = default or remotes
    return Check(
        "dvc remote", "; ".join(f"{r[0]} {redact_url(r[1])}" for r in shown) + (" (default)" if default else "")
    )


def _wandb() -> Check:
    mode = wandb_mode()  # the rule training itself uses
    if mode == "online":
        if os.environ.get("WANDB_API_KEY"):
            return Check("wandb", "online (WANDB_API_KEY set)")
        return Check("wandb", "WANDB_MODE=online but WANDB_API_KEY is not set", "warn")
    if os.environ.get("WANDB_MODE"):
        return Check("wandb", f"{mode} (WANDB_MODE)")
    return Check("wandb", "offline: no WANDB_API_KEY (runs sync later with `wandb sync`)", "warn")


def _params(path: Path) -> list[Check]:
    try:
        p = load_params(path)
    except ParamsError as exc:
        return [Check("params", f"{path}: " + "; ".join(exc.problems), "fail")]
    test_sets = ", ".join(t.name for t in p.eval.test_sets) or "none (val only)"
    checks = [Check("params", f"{path} valid (model {p.model.preset}, dataset {p.fetch.dataset})")]
    checks.append(Check("test sets", test_sets))
    return checks + [Check("dataset", problem, "fail") for problem in dataset_problems(p.fetch, p.eval.test_sets)]


def dataset_problems(fetch: FetchParams, test_sets: list[TestSetParams]) -> list[str]:
    """Every configured dataset (fetch.dataset, each eval.test_sets entry) that is neither a hub id nor an existing
    local source: local paths must exist; hub ids are not looked up."""
    named = [("fetch.dataset", fetch.dataset)] + [(f"eval.test_sets[{t.name}]", t.dataset) for t in test_sets]
    return sources.problems(named)


def run_checks(params: Path) -> list[Check]:
    checks = [Check("python", platform.python_version())]
    checks += [_version(p) for p in PACKAGES]
    checks += [_gpu(), disk(Path.cwd()), _dvc_remote(), _remote_asides(), _wandb()]
    checks += [Check(f"${name}", "set" if os.environ.get(name) else "not set") for name in SECRETS]
    checks += _params(params)
    return checks


def print_table(checks: list[Check]) -> None:
    table = Table(title="medasr doctor")
    table.add_column("check")
    table.add_column("value")
    table.add_column("status")
    colour = {"ok": "green", "warn": "yellow", "fail": "red"}
    for c in checks:
        table.add_row(escape(c.name), escape(c.value), f"[{colour[c.status]}]{c.status}[/]")
    Console().print(table)
