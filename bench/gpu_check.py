"""gpu_check's Python half (bench/gpu_check.sh runs it): the environment description and the `stages` section.

    python bench/gpu_check.py env --size full --out OUT/env.json
    python bench/gpu_check.py stages --size full --out OUT/stages.json [--precision auto|bf16|32] [--require-cuda]

stages: the real stages with the tiny preset on this machine's accelerator. The bundled demo audio goes through
fetch, subset and manifest (and the bundled consultations through testsets); then the train stage
(`stages.train.run.run`: 4 steps with validation and a checkpoint every 2, then a second call that resumes from
step 4 to 6), the eval stage (`stages.eval.run`: val, one test set, both models) and `medasr transcribe` (the CLI
command, in this process). Meanwhile a forward pre-hook registered for every module checks each module call:
its own parameters and its positional tensor inputs are on the device `medasr.device` picks, its floating
parameters in the dtype it resolves `train.precision` to, and the audio entering NeMo's
AudioToMelSpectrogramPreprocessor is float32 on that device. The expectation comes from that one rule, so the same
code expects bf16 on CUDA and fp32 on the CPU (precision auto); `--require-cuda` (the GPU run) fails at once when
the rule picks the CPU. Writes `--out` after every step; exits 1 when any check or step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medasr.params import Params, parse_params, with_overrides  # noqa: E402

DEMO = REPO / "data" / "sources" / "demo"
CONSULTATIONS = REPO / "data" / "sources" / "demo-consultations"
PHASES = ("train", "validation", "eval", "transcribe")
FIRST_STEPS, RESUMED_STEPS = 4, 6


def stage_params(precision: str | None) -> Params:
    """params.yaml with the tiny preset and a short run: validation and a checkpoint every 2 steps, short decodes."""
    short: dict[str, Any] = {
        "model.preset": "tiny",
        "subset.train_size": 24,
        "subset.val_size": 6,
        "train.max_steps": FIRST_STEPS,
        "train.checkpoint_every": 2,
        "train.val_every": 2,
        "train.val_max_utts": 4,
        "train.batch_size": 4,
        "train.batch_tokens": None,
        "train.num_buckets": 1,
        "train.warmup_steps": 2,
        "train.devices": 1,
        "eval.batch_size": 8,
        "eval.max_new_tokens": 16,  # random weights rarely emit the end token: keep decoding short
        "eval.train_sample": 4,
        "eval.test_sets": [{"name": "consult", "dataset": str(CONSULTATIONS)}],
    }
    if precision:
        short["train.precision"] = precision
    return parse_params(with_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), short), "gpu_check")


# ---------------------------------------------------------------- the checks


def _name(tensor: Any) -> str:
    return f"{tensor.device.type}/{str(tensor.dtype).removeprefix('torch.')}"


class Observer:
    """Checks module calls against the expected device and dtype, per phase. `before` is the global forward
    pre-hook; it hooks every `audio_types` module it finds (with kwargs: the preprocessor is called by keyword)."""

    def __init__(self, device: str, dtype: Any, audio_types: tuple[type, ...]) -> None:
        self.device, self.dtype, self.audio_types = device, dtype, audio_types
        self.phase: str | None = None
        self.seen: weakref.WeakSet[Any] = weakref.WeakSet()
        self.hooked: weakref.WeakSet[Any] = weakref.WeakSet()
        self.record: dict[str, dict[str, Any]] = {}

    @contextmanager
    def watching(self, phase: str) -> Iterator[None]:
        self.phase = phase
        try:
            yield
        finally:
            self.phase = None

    def _current(self) -> dict[str, Any] | None:
        import torch

        if self.phase is None:
            return None
        name = "validation" if self.phase == "train" and not torch.is_grad_enabled() else self.phase
        empty = {"module_calls": 0, "preprocessor_calls": 0, "audio_seen": 0, "audio": set(), "parameters": set()}
        empty["inputs"] = set()
        return self.record.setdefault(name, empty | {"violations": set()})

    def _violation(self, rec: dict[str, Any], text: str) -> None:
        if len(rec["violations"]) < 20:
            rec["violations"].add(text)

    def before(self, module: Any, args: tuple[Any, ...]) -> None:
        import torch

        rec = self._current()
        if rec is None:
            return
        try:
            if module not in self.seen:
                self.seen.add(module)
                for sub in module.modules():
                    if isinstance(sub, self.audio_types) and sub not in self.hooked:
                        self.hooked.add(sub)
                        sub.register_forward_pre_hook(self.audio, with_kwargs=True)
            rec["module_calls"] += 1
            rec["preprocessor_calls"] += isinstance(module, self.audio_types)
            kind = type(module).__name__
            for param in module.parameters(recurse=False):
                rec["parameters"].add(_name(param))
                wrong_dtype = param.is_floating_point() and param.dtype != self.dtype
                if param.device.type != self.device or wrong_dtype:
                    self._violation(rec, f"{kind} parameter {_name(param)}")
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    rec["inputs"].add(arg.device.type)
                    if arg.device.type != self.device:
                        self._violation(rec, f"{kind} input on {arg.device.type}")
        except Exception as exc:  # a check must never break the run it watches: record it instead
            self._violation(rec, f"hook error: {type(exc).__name__}: {exc}")

    def audio(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        rec = self._current()
        if rec is None:
            return
        signal = kwargs.get("input_signal", args[0] if args else None)
        if not isinstance(signal, torch.Tensor):
            self._violation(rec, f"{type(module).__name__} called without an input_signal tensor")
            return
        rec["audio_seen"] += 1
        rec["audio"].add(_name(signal))
        if (signal.device.type, signal.dtype) != (self.device, torch.float32):
            self._violation(rec, f"audio into {type(module).__name__}: {_name(signal)}, expected {self.device}/float32")

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            phase: {k: sorted(v) if isinstance(v, set) else v for k, v in rec.items()}
            for phase, rec in self.record.items()
        }

    def failures(self, phases: tuple[str, ...]) -> list[str]:
        """Every violation, and every phase that should have run the model but never reached the preprocessor."""
        out = []
        for phase in phases:
            rec = self.record.get(phase)
            if rec is None or not rec["preprocessor_calls"]:
                out.append(f"{phase}: no call of the audio preprocessor was observed")
                continue
            if rec["audio_seen"] != rec["preprocessor_calls"]:
                out.append(
                    f"{phase}: audio seen in {rec['audio_seen']} of {rec['preprocessor_calls']} preprocessor calls"
                )
            out += [f"{phase}: {v}" for v in sorted(rec["violations"])]
        return out


# ---------------------------------------------------------------- the stages section


def _data(work: Path, p: Params) -> dict[str, Any]:
    """The demo audio as the data stages leave it (tests/conftest.py demo_manifests), plus one test set."""
    from medasr.params import FetchParams
    from stages import fetch, manifest, subset, testsets

    demo = FetchParams(
        dataset=str(DEMO), split="train", audio_column="audio", text_column="text", id_column="utterance_id"
    )
    fetch.run(demo, out_dir=work / "raw")
    subset.run(p.subset, raw_dir=work / "raw", out_dir=work / "subset", metrics_file=work / "data.json")
    manifest.run(p.manifest, work / "raw", work / "subset", work / "manifests")
    sets = testsets.run(p.eval.test_sets, p.subset, p.manifest, work / "subset", work / "testsets", work / "ts.json")
    return {"data": json.loads((work / "data.json").read_text()), "testsets": sets}


def _train(work: Path, p: Params, max_steps: int) -> dict[str, Any]:
    from stages.train.run import run

    return run(
        model_p=p.model,
        lora=p.lora,
        train=p.train.model_copy(update={"max_steps": max_steps}),
        manifest_dir=work / "manifests",
        ckpt_root=work / "ckpt",
        model_dir=work / "model",
        metrics_file=work / "train.json",
        curves_dir=work / "curves",
        mirror_checkpoints=False,  # never into a DVC remote
        val_max_new_tokens=p.eval.max_new_tokens,
    )


def _eval(work: Path, p: Params) -> dict[str, Any]:
    from stages import eval as eval_stage

    return eval_stage.run(
        ev=p.eval,
        model_p=p.model,
        lora=p.lora,
        seed=p.train.seed,
        manifest_dir=work / "manifests",
        testsets_dir=work / "testsets",
        model_dir=work / "model",
        metrics_file=work / "eval.json",
        predictions_file=work / "predictions.jsonl",
        report_file=work / "report.md",
        plot_file=work / "wer_by_set.json",
    )


def _transcribe(work: Path, p: Params) -> dict[str, Any]:
    from typer.testing import CliRunner

    from stages.cli import app

    clips = sorted((work / "testsets" / "consult" / "audio").glob("*.flac"))[:3]
    cmd = ["transcribe", str(work / "model"), *map(str, clips), "--max-new-tokens", str(p.eval.max_new_tokens)]
    res = CliRunner().invoke(app, cmd)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    lines = [line for line in res.stdout.splitlines() if "\t" in line]  # file<TAB>transcript
    if res.exit_code != 0 or len(lines) != len(clips):
        raise AssertionError(f"medasr transcribe exited {res.exit_code} with {len(lines)} lines: {res.output[-500:]}")
    return {"files": len(clips), "lines": len(lines)}


def stages_section(out: Path, precision: str | None, require_cuda: bool) -> bool:
    import torch
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor

    from medasr.device import accelerator, resolve_precision, torch_dtype

    p = stage_params(precision)
    device = accelerator()
    resolved = resolve_precision(p.train.precision, device == "cuda")
    dtype = torch_dtype(resolved)
    expected = {"device": device, "train.precision": p.train.precision, "resolved": resolved, "dtype": str(dtype)}
    result: dict[str, Any] = {"expected": expected, "steps": {}, "phases": {}, "failures": []}

    def save() -> None:
        result["ok"] = not result["failures"]
        out.write_text(json.dumps(result, indent=2) + "\n")

    if require_cuda and device != "cuda":
        result["failures"].append(f"a GPU run, but medasr.device.accelerator() is {device!r}: CUDA is not usable")
        save()
        return False
    observer = Observer(device, dtype, (AudioToMelSpectrogramPreprocessor,))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(observer.before)
    work = Path(tempfile.mkdtemp(prefix="medasr-gpu-check-"))
    os.chdir(work)  # DVCLive, W&B and git look around the working directory: not the repo

    def step(name: str, phase: str | None, fn: Callable[[], Any], check: Callable[[Any], str | None]) -> bool:
        started = time.perf_counter()
        try:
            with observer.watching(phase) if phase else nullcontext():
                value = fn()
            problem = check(value)
        except Exception as exc:
            traceback.print_exc()
            value, problem = None, f"{type(exc).__name__}: {exc}"[:1000]
        result["steps"][name] = {"seconds": round(time.perf_counter() - started, 1), "result": value}
        if problem:
            result["failures"].append(f"{name}: {problem}")
        result["phases"] = observer.summary()
        save()
        return not problem

    try:
        ok = step(
            "data",
            None,
            lambda: _data(work, p),
            lambda r: None if r["testsets"]["consult"]["kept"] else "no test clips",
        )
        ok = ok and step(
            "train",
            "train",
            lambda: _train(work, p, FIRST_STEPS),
            lambda m: None if m["global_step"] == FIRST_STEPS and m["resume_source"] == "none" else f"metrics {m}",
        )
        ok = ok and step(
            "train_resumed",
            "train",
            lambda: _train(work, p, RESUMED_STEPS),
            lambda m: (
                None
                if (m["resumed_from_step"], m["global_step"]) == (FIRST_STEPS, RESUMED_STEPS)
                else f"expected a resume from step {FIRST_STEPS} to {RESUMED_STEPS}, got {m}"
            ),
        )
        if ok:  # both need the trained model; a failing eval does not stop transcribe
            step("eval", "eval", lambda: _eval(work, p), lambda m: None if {"val", "test"} <= m.keys() else f"{m}")
            step("transcribe", "transcribe", lambda: _transcribe(work, p), lambda r: None)
            result["failures"] += observer.failures(PHASES)
    finally:
        handle.remove()
        result["phases"] = observer.summary()
        save()
        os.chdir(REPO)
        shutil.rmtree(work, ignore_errors=True)
    return not result["failures"]


# ---------------------------------------------------------------- environment


def environment(size: str, sections: str) -> dict[str, Any]:
    import torch

    gpu = torch.cuda.is_available()

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    def output(*cmd: str) -> str | None:
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "size": size,
        "sections": sections.split(","),
        "device": torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
        "nvidia_smi": output("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": {
            n: version(n) for n in ("nemo_toolkit", "lightning", "transformers", "peft", "dvc", "dvclive", "wandb")
        },
        # the device machine gets a copy of the working tree, usually without .git: the session records the commit
        "git_commit": output("git", "rev-parse", "HEAD"),
        "git_dirty_files": len(s.splitlines()) if (s := output("git", "status", "--porcelain")) is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("env", "stages"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--sections", default="", help="env: the sections this run was asked for")
    parser.add_argument("--precision", choices=("auto", "bf16", "32"), default=None, help="default: params.yaml's")
    parser.add_argument("--require-cuda", action="store_true", help="fail when the accelerator rule picks the CPU")
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.what == "env":
        args.out.write_text(json.dumps(environment(args.size, args.sections), indent=2) + "\n")
        return
    os.environ["WANDB_MODE"] = "offline"  # the train stage's W&B run stays on this machine
    os.environ.pop("WANDB_API_KEY", None)
    sys.exit(0 if stages_section(args.out, args.precision, args.require_cuda) else 1)


if __name__ == "__main__":
    main()
