"""`medasr doctor` and secrets: .env is loaded, the environment wins, and no secret value is ever printed.

e2e: each runs `medasr doctor` in a subprocess, which imports torch (its GPU check)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from helpers import committed_params_text


def doctor(cwd, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "COLUMNS": "200", **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "stages.cli", "doctor"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.e2e
def test_doctor_reads_dotenv_but_never_prints_secret_values(tmp_path):
    (tmp_path / "params.yaml").write_text(committed_params_text())
    (tmp_path / ".env").write_text(
        "AWS_SECRET_ACCESS_KEY=dotenv-secret-value-123\nWANDB_MODE=disabled\nHF_TOKEN=from-dotenv\n"
    )

    proc = doctor(tmp_path, {"HF_TOKEN": "env-token-456"})

    out = proc.stdout + proc.stderr
    assert "medasr doctor" in out and "nemo_toolkit" in out and "3.0.0" in out
    assert "disabled (WANDB_MODE)" in out  # taken from .env
    assert "dotenv-secret-value-123" not in out and "env-token-456" not in out and "from-dotenv" not in out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 3}
    assert "set" in lines["$AWS_SECRET_ACCESS_KEY"] and "not set" not in lines["$AWS_SECRET_ACCESS_KEY"]
    assert "not set" in lines["$RUNPOD_API_KEY"]
    assert "params.yaml valid" in out


@pytest.mark.e2e
def test_doctor_fails_on_invalid_params(tmp_path):
    data = yaml.safe_load(committed_params_text())
    data["subset"]["train_size"] = "lots"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    proc = doctor(tmp_path, {})
    assert proc.returncode == 1
    assert "subset.train_size" in proc.stdout


@pytest.mark.e2e
def test_environment_wins_over_dotenv(tmp_path):
    (tmp_path / "params.yaml").write_text(committed_params_text())
    (tmp_path / ".env").write_text("WANDB_MODE=disabled\n")
    proc = doctor(tmp_path, {"WANDB_MODE": "offline"})
    assert "offline (WANDB_MODE)" in proc.stdout and "disabled" not in proc.stdout
