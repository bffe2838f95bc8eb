"""Benchmark: what DVC costs around the stages. No-op `dvc repro`, and a fresh clone restoring finished stages.

Run: `.venv/bin/python bench/pipeline_overhead.py [--repeats 5] [--out bench/results/pipeline_overhead.json]`

In a temporary clone of this repository's HEAD it runs `make demo` (all six stages, offline; the local-directory
DVC remote under a temporary MEDASR_WORKDIR), commits the demo's params and dvc.lock and pushes the outputs and
run-cache. Then it times:
  - `dvc repro` with nothing to do (median of --repeats; the target is under 3 s);
  - in a second, fresh clone with an empty DVC cache: `dvc repro --pull` (what runpod.sh runs on a new pod), and
    counts the stages it recomputed (the target is zero) and the ones it restored.
Prints a markdown table and writes the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def sh(cwd: Path, *cmd: str, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/pipeline_overhead.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medasr-bench-") as tmp:
        root = Path(tmp)
        env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", WANDB_MODE="offline")
        env["MEDASR_WORKDIR"] = str(root / "work")  # the local DVC remote lives here, shared by both clones
        env.pop("MEDASR_S3_URL", None)
        first, second = root / "first", root / "second"
        sh(root, "git", "clone", "-q", str(REPO), str(first), env=env)
        demo_s, _ = sh(first, "make", "-o", "install", "demo", f"VENV={VENV_BIN.parent}", env=env)
        sh(first, "git", "add", "params.yaml", "dvc.lock", env=env)
        sh(
            first,
            "git",
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@medasr.invalid",
            "commit",
            "-qm",
            "demo",
            env=env,
        )
        sh(first, "dvc", "push", "--run-cache", env=env)
        noop = []
        for _ in range(args.repeats):
            seconds, out = sh(first, "dvc", "repro", env=env)
            assert "Running stage" not in out, out
            noop.append(seconds)

        sh(root, "git", "clone", "-q", str(first), str(second), env=env)
        sh(second, "medasr", "remote", "setup", env=env)
        restore_s, out = sh(second, "dvc", "repro", "--pull", env=env)
        recomputed = re.findall(r"Running stage '(\w+)'", out)
        # with dvc.lock committed, DVC pulls each stage's outputs and finds every stage up to date
        restored = re.findall(r"Pulling data for stage: '(\w+)'", out)
        assert "Data and pipelines are up to date." in out, out
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "make_demo_seconds": round(demo_s, 1),
        "noop_repro_seconds": [round(s, 2) for s in noop],
        "noop_repro_median_seconds": round(statistics.median(noop), 2),
        "fresh_clone_restore_seconds": round(restore_s, 2),
        "fresh_clone_stages_recomputed": recomputed,
        "fresh_clone_stages_restored": restored,
        "fresh_clone_output": out.splitlines()[-40:],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']}; make demo took {demo_s:.0f} s\n")
    print("| measure | value | target |\n|---|---|---|")
    print(f"| no-op `dvc repro` (median of {args.repeats}) | {result['noop_repro_median_seconds']} s | < 3 s |")
    print(f"| fresh clone `dvc repro --pull` | {result['fresh_clone_restore_seconds']} s | - |")
    print(f"| stages recomputed there | {len(recomputed)} {recomputed or ''} | 0 |")
    print(f"| stages restored there | {len(restored)} | 6 |")


if __name__ == "__main__":
    main()
