"""bench/: the benchmark scripts keep running and measure what they say (their figures are recorded in
bench/RESULTS.md, not asserted here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, committed_params_text, tiny_params


def run_bench(script: str, out, *args: str, timeout: int) -> tuple[dict, str]:
    """Run a bench script writing its JSON to `out`; returns the result and what it printed."""
    cmd = [sys.executable, f"bench/{script}", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_data_stage_benchmark_runs_and_reports_every_run(tmp_path):
    result, stdout = run_bench("data_stages.py", tmp_path / "data_stages.json", "--clips", "6", timeout=300)
    assert result["clips"] == 6 and result["audio_hours"] > 0
    names = list(result["runs"])
    assert names[0].startswith("baseline") and names[1].startswith("ours (subset + manifest")
    assert all(r["seconds"] > 0 and r["speedup_vs_baseline"] > 0 for r in result["runs"].values())
    assert "| run | seconds |" in stdout


@pytest.mark.e2e
def test_training_benchmark_runs_every_section_at_tiny_size(tmp_path):
    """The full-size GPU benchmark's code at toy scale on CPU: every section runs and reports what it measured."""
    out = tmp_path / "train_speed.json"
    result, _ = run_bench("train_speed.py", out, "--size", "tiny", timeout=900)
    assert result["environment"]["torch"] and result["environment"]["nemo_toolkit"]
    prof = result["profile"]

    # fixed-length grid: every batch holds exactly batch_size clips of that length
    assert [(r["clip_s"], r["batch_size"]) for r in result["grid"]] == [
        (n, b) for n in prof["lengths"] for b in prof["batch_sizes"]
    ]
    for row in result["grid"]:
        assert row["steps_timed"] == prof["steps"] and row["mean_batch_utts"] == row["batch_size"]
        assert row["audio_s_per_s"] == pytest.approx(row["utts_per_s"] * row["clip_s"], rel=0.01)
        assert row["tokens_per_s"] > row["audio_s_per_s"] * 12.5  # audio frames plus transcript tokens

    # ours vs NeMo's example settings, on the same mixed-length clips
    base, ours = result["compare"][0], result["compare"][1]
    assert base["batch_size"] == 4 and base["batch_tokens"] is None and base["num_buckets"] == 1
    assert base["mean_batch_utts"] == 4 and base["speedup_vs_baseline"] == 1.0
    committed = result["committed_train_params"]  # the committed params.yaml's batching (non-empty: the check bites)
    train_block = yaml.safe_load(committed_params_text())["train"]
    assert {"batch_size", "batch_tokens", "num_buckets"} <= committed.keys()
    assert committed == {k: train_block[k] for k in committed}
    assert ours == ours | committed and ours["speedup_vs_baseline"] > 0

    # decoding: the end token is suppressed until 3.5 tokens per audio second
    for row in result["decode"]:
        assert row["output_tokens"] == row["tokens_per_clip"] == round(3.5 * row["clip_s"])
        assert row["rtfx"] > 0

    # restart: `medasr train` from scratch, then resumed from its checkpoint at step 2
    restart = result["restart"]
    assert restart["fresh_start"]["first_step"] == 1 and restart["resume"]["first_step"] == 3, restart
    assert 0 < restart["resume"]["seconds_from_process_start"] < 600

    # the README's cost table, from this result as if it were a GPU's
    spec = importlib.util.spec_from_file_location("cost_table", REPO / "bench" / "cost_table.py")
    cost_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost_table)
    p = tiny_params(**{"train.max_steps": 1000, "train.val_every": 100, "train.val_max_utts": 100})
    phases = cost_table.poc_runtime(result, p)
    assert phases["train_s"] == pytest.approx(1000 * ours["seconds"] / ours["steps_timed"])
    assert phases["start_s"] == restart["fresh_start"]["seconds_from_process_start"]
    assert phases["validation_s"] > 0 and phases["eval_s"] > 0
    prices = [
        {"name": "Measured", "usd_per_hour": 2.0, "source": "test", "measured_as": str(out)},
        {"name": "Other", "usd_per_hour": 1.0, "source": "test", "measured_as": None},
    ]
    rows = cost_table.table(prices, p, root=tmp_path).splitlines()
    total_min = (phases["start_s"] + phases["train_s"] + phases["validation_s"] + phases["eval_s"]) / 60
    assert f"| {total_min:.0f} min | ${total_min / 60 * 2.0:.2f} |" in rows[2]
    assert rows[3].startswith("| Other |") and "not measured" in rows[3]
    # a GPU's sections written by two device calls are merged; until both files exist there is no runtime
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({k: v for k, v in result.items() if k not in ("compare", "decode", "restart")}))
    prices[0]["measured_as"] = [str(first), str(second)]
    assert "not measured" in cost_table.table(prices, p, root=tmp_path).splitlines()[2]
    second.write_text(json.dumps({k: result[k] for k in ("compare", "decode", "restart")}))
    assert cost_table.table(prices, p, root=tmp_path).splitlines()[2] == rows[2]
