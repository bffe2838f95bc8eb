"""bench/: the benchmark scripts keep running (their figures are recorded in bench/RESULTS.md, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO


def test_data_stage_benchmark_runs_and_reports_every_run(tmp_path):
    out = tmp_path / "data_stages.json"
    cmd = [sys.executable, "bench/data_stages.py", "--clips", "6", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["clips"] == 6 and result["audio_hours"] > 0
    names = list(result["runs"])
    assert names[0].startswith("baseline") and names[1].startswith("ours (subset + manifest")
    assert all(r["seconds"] > 0 and r["speedup_vs_baseline"] > 0 for r in result["runs"].values())
    assert "| run | seconds |" in proc.stdout
