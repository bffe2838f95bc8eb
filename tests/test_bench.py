"""bench/: the benchmark scripts keep running and measure what they say (their figures are recorded in
bench/RESULTS.md, not asserted here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, committed_params_text, run_env, tiny_params

SECTIONS = ("stages", "train_speed", "decode", "restart")


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


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_hooks_catch_the_wrong_device_dtype_and_audio():
    """The stages section's checks can fail: bf16 audio into the preprocessor, parameters in another dtype, and a
    phase whose model never reached the preprocessor are each reported (toy modules stand in for NeMo's)."""
    import torch

    class Pre(torch.nn.Module):  # called by keyword, as NeMo's perception calls its preprocessor
        def forward(self, input_signal, length):
            return input_signal.float()

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.proj = Pre(), torch.nn.Linear(4, 4)

        def forward(self, audio):
            return self.proj(self.pre(input_signal=audio, length=None).to(self.proj.weight.dtype))

    gpu_check = load_bench("gpu_check")
    observer = gpu_check.Observer("cpu", torch.float32, (Pre,))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(observer.before)
    try:
        model = Model()
        with observer.watching("train"):
            model(torch.zeros(2, 4))
            with torch.no_grad():  # validation inside the train stage
                model(torch.zeros(2, 4, dtype=torch.bfloat16))
        with observer.watching("eval"):
            model.to(torch.bfloat16)(torch.zeros(2, 4))
        model(torch.zeros(2, 4, dtype=torch.bfloat16))  # outside any phase: not checked
    finally:
        handle.remove()
    record = observer.summary()
    assert record["train"]["audio"] == ["cpu/float32"] and record["train"]["violations"] == []
    assert record["train"]["preprocessor_calls"] == record["train"]["audio_seen"] == 1
    assert record["validation"]["violations"] == ["audio into Pre: cpu/bfloat16, expected cpu/float32"]
    assert record["eval"]["parameters"] == ["cpu/bfloat16"]
    assert record["eval"]["violations"] == ["Linear parameter cpu/bfloat16"]  # fp32 audio, bf16 weights
    failures = observer.failures(("train", "validation", "eval", "transcribe"))
    assert failures == [
        "validation: audio into Pre: cpu/bfloat16, expected cpu/float32",
        "eval: Linear parameter cpu/bfloat16",
        "transcribe: no call of the audio preprocessor was observed",
    ]


@pytest.mark.e2e
def test_gpu_check_runs_every_section_at_tiny_size(tmp_path):
    """The GPU session's one command, at toy scale on the CPU: every section runs and reports what it measured.
    The stages ran on the device and in the precision medasr.device picks here, audio fp32 into the preprocessor."""
    from medasr.device import accelerator, resolve_precision

    out = tmp_path / "out"
    proc = subprocess.run(
        ["bench/gpu_check.sh", "--size", "tiny", str(out)],
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    status = {line.split("\t")[0]: line.split("\t")[1] for line in (out / "status.tsv").read_text().splitlines()}
    assert proc.returncode == 0 and status == dict.fromkeys(SECTIONS, "ok"), proc.stdout[-4000:]
    files = sorted(f.name for f in out.iterdir())
    assert files == sorted(["env.json", "gpu_check.log", "status.tsv", *(f"{s}.json" for s in SECTIONS)])
    assert len(files) <= 8  # what comes back from the device machine
    assert "=== restart: ok" in (out / "gpu_check.log").read_text()
    env = json.loads((out / "env.json").read_text())
    assert env["size"] == "tiny" and env["packages"]["nemo_toolkit"] and env["packages"]["dvclive"]

    # stages: the real train (and its resume), eval and transcribe, every module call checked
    stages = json.loads((out / "stages.json").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    device, precision = accelerator(), resolve_precision(params["train"]["precision"], accelerator() == "cuda")
    dtype = {"bf16": "bfloat16", "32": "float32"}[precision]
    assert stages["ok"] and stages["failures"] == []
    assert stages["expected"] | {"device": device, "resolved": precision} == stages["expected"]
    assert stages["steps"]["train_resumed"]["result"]["resumed_from_step"] == 4
    assert stages["steps"]["transcribe"]["result"] == {"files": 3, "lines": 3}
    assert set(stages["phases"]) == {"train", "validation", "eval", "transcribe"}
    for phase in stages["phases"].values():
        assert phase["preprocessor_calls"] == phase["audio_seen"] > 0 and phase["violations"] == []
        assert phase["audio"] == [f"{device}/float32"] and phase["parameters"] == [f"{device}/{dtype}"]
        assert phase["inputs"] == [device]

    # ours vs NeMo's example settings, on the same mixed-length clips
    result = json.loads((out / "train_speed.json").read_text())
    assert result["environment"]["torch"] and result["environment"]["nemo_toolkit"]
    prof = result["profile"]
    base, ours = result["compare"][0], result["compare"][1]
    assert base["batch_size"] == 4 and base["batch_tokens"] is None and base["num_buckets"] == 1
    assert base["mean_batch_utts"] == 4 and base["speedup_vs_baseline"] == 1.0
    committed = result["committed_train_params"]  # the committed params.yaml's batching (non-empty: the check bites)
    train_block = yaml.safe_load(committed_params_text())["train"]
    assert {"batch_size", "batch_tokens", "num_buckets"} <= committed.keys()
    assert committed == {k: train_block[k] for k in committed}
    assert ours == ours | committed and ours["speedup_vs_baseline"] > 0
    # the committed defaults on each fixed length
    assert [row["clip_s"] for row in result["defaults"]] == list(prof["lengths"])
    assert all(row["steps_timed"] == prof["steps"] and row["tokens_per_s"] > 0 for row in result["defaults"])

    # decoding: the end token is suppressed until 3.5 tokens per audio second
    decode = json.loads((out / "decode.json").read_text())
    assert [row["clip_s"] for row in decode["decode"]] == list(prof["lengths"])
    for row in decode["decode"]:
        assert row["output_tokens"] == row["tokens_per_clip"] == round(3.5 * row["clip_s"])
        assert row["rtfx"] > 0

    # restart: `medasr train` from scratch, then resumed from its checkpoint at step 2
    restart = json.loads((out / "restart.json").read_text())["restart"]
    assert restart["fresh_start"]["first_step"] == 1 and restart["resume"]["first_step"] == 3, restart
    assert 0 < restart["resume"]["seconds_from_process_start"] < 600

    # the README's cost table, from these files as if they were a GPU's (bench/gpu_prices.yaml `measured_as`)
    cost_table = load_bench("cost_table")
    merged = result | decode | {"restart": restart}
    p = tiny_params(**{"train.max_steps": 1000, "train.val_every": 100, "train.val_max_utts": 100})
    phases = cost_table.poc_runtime(merged, p)
    assert phases["train_s"] == pytest.approx(1000 * ours["seconds"] / ours["steps_timed"])
    assert phases["start_s"] == restart["fresh_start"]["seconds_from_process_start"]
    assert phases["validation_s"] > 0 and phases["eval_s"] > 0
    files = [str(out / f"{s}.json") for s in ("train_speed", "decode", "restart")]
    prices = [
        {"name": "Measured", "usd_per_hour": 2.0, "source": "test", "measured_as": files},
        {"name": "Other", "usd_per_hour": 1.0, "source": "test", "measured_as": None},
    ]
    rows = cost_table.table(prices, p, root=tmp_path).splitlines()
    total_min = (phases["start_s"] + phases["train_s"] + phases["validation_s"] + phases["eval_s"]) / 60
    assert f"| {total_min:.0f} min | ${total_min / 60 * 2.0:.2f} |" in rows[2]
    assert rows[3].startswith("| Other |") and "not measured" in rows[3]
    # until every named file exists (a section cut off, not yet rerun) there is no runtime
    prices[0]["measured_as"] = [*files, str(tmp_path / "decode_rerun.json")]
    assert "not measured" in cost_table.table(prices, p, root=tmp_path).splitlines()[2]
