"""Benchmark: SALM training and decoding speed and memory, at canary-qwen-2.5b's full size (GPU) or tiny (CPU).

Run: `python bench/train_speed.py --size full` on a GPU (`--size tiny` anywhere: the same code at toy scale, which
`tests/test_bench.py` runs). Writes the raw figures as JSON (`--out`) and prints the same JSON.

The model is canary-qwen-2.5b's architecture with random weights (`medasr.model.build_random`: the released
FastConformer perception + Qwen3-1.7B shapes, LoRA, built offline through the same SALM class the train stage
uses), in bf16 on GPU, with the committed params' freeze policy and LoRA. Training runs through the train stage's
own pieces (`prepare_model`, `make_datamodule`, `make_trainer`: NeMo's DataModule + SALMDataset, Lightning) on
synthetic 16 kHz FLAC clips whose transcripts hold ~3.5 tokens per audio second. Sections:
  - grid: fixed-length clips (5, 15, 30 s) x fixed batch sizes: throughput and peak memory;
  - ours vs baseline on mixed lengths (log-normal, median 6 s, 0.5-30 s): the committed params (token budget,
    length buckets, fused AdamW, workers; with and without activation checkpointing; 8-bit AdamW) against
    NeMo's example config (`examples/speechlm2/conf/salm.yaml`: batch_size 4, no bucketing, AdamW with
    foreach, 1 worker). Throughput is audio seconds per wall second including data loading, after warm-up;
  - the committed defaults on each fixed length: their peak memory, against an A100 40 GB budget (36 GiB);
  - decoding: batched greedy `medasr.inference.transcribe` (files -> text, as `medasr eval`) with the end token
    suppressed for 3.5 tokens per audio second (random weights never emit it): RTFx = audio s / wall s;
  - restart: `medasr train` in a fresh process, first from scratch, then resuming from its checkpoint: seconds
    from process start to the first training step (the train stage logs it).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medasr.params import Params, parse_params, with_overrides  # noqa: E402

SAMPLE_RATE = 16_000
TOKENS_PER_SECOND = 3.5  # transcript tokens per audio second: English speech is ~2.5-3 words/s, ~1.3 tokens/word
A100_40GB_BUDGET_GIB = 36.0
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "lengths": (5, 15, 30),
        "batch_sizes": (4, 8, 16, 32),
        "clips_per_length": 64,
        "mixed_clips": 512,
        "warmup": 3,
        "steps": 12,
        "decode_batch_sizes": (16, 64, 256),
        "decode_clips": 256,
    },
    "tiny": {
        "lengths": (5, 30),
        "batch_sizes": (2, 4),
        "clips_per_length": 8,
        "mixed_clips": 24,
        "warmup": 1,
        "steps": 2,
        "decode_batch_sizes": (4,),
        "decode_clips": 4,
    },
}


def committed_params(**overrides: Any) -> Params:
    """params.yaml with `block.key` overrides (the values a user would pass to `dvc exp run -S`)."""
    return parse_params(with_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), overrides), "bench params")


# ---------------------------------------------------------------- data


def transcript(tokenizer: Any, n_tokens: int, rng: np.random.Generator, words: list[str]) -> str:
    """Text of about `n_tokens` tokens under the model's tokenizer."""
    picked: list[str] = []
    while len(tokenizer.text_to_ids(" ".join(picked))) < n_tokens:
        picked.append(words[int(rng.integers(len(words)))])
    return " ".join(picked)


def write_set(folder: Path, durations: list[float], tokenizer: Any, seed: int) -> float:
    """A manifest folder as the manifest stage writes it (train.json + audio/*.flac; val.json empty). Returns audio
    seconds. Noise-modulated tones: compute depends on length, not on content."""
    from importlib import resources

    corpus = resources.files("medasr.resources").joinpath("tokenizer_corpus.txt").read_text(encoding="utf-8")
    words = [w for line in corpus.splitlines() if not line.startswith("#") for w in line.split()]
    rng = np.random.default_rng(seed)
    (folder / "audio").mkdir(parents=True)
    rows = []
    for i, seconds in enumerate(durations):
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
        wave += 0.02 * rng.standard_normal(len(t))
        name = f"audio/clip{i:05d}.flac"
        sf.write(folder / name, wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        text = transcript(tokenizer, max(1, round(TOKENS_PER_SECOND * seconds)), rng, words)
        rows.append({"audio_filepath": name, "duration": round(len(t) / SAMPLE_RATE, 6), "text": text, "id": str(i)})
    (folder / "train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "val.json").write_text("")
    return float(sum(r["duration"] for r in rows))


def mixed_durations(n: int, seed: int) -> list[float]:
    """Segment lengths of conversational speech: log-normal, median 6 s, clipped to the subset stage's 0.5-30 s."""
    rng = np.random.default_rng(seed)
    return [float(x) for x in np.clip(rng.lognormal(math.log(6.0), 0.8, n), 0.5, 30.0)]


# ---------------------------------------------------------------- training


def step_timer(warmup: int, pad_id: int) -> Any:
    """A Lightning callback timing each step from the previous step's end (so data loading counts) once `warmup`
    steps are done, with what each batch held."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.last: float | None = None
            self.seen = 0
            self.steps: list[dict[str, float]] = []
            self.batch: dict[str, float] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            lens = batch["audio_lens"].double() / SAMPLE_RATE
            frames = torch.ceil(lens / 0.08).sum()
            text = (batch["input_ids"] != pad_id).sum() - len(lens)  # minus one audio placeholder per utterance
            self.batch = {"utts": len(lens), "audio_s": float(lens.sum()), "tokens": float(frames + text)}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.seen += 1
            if self.last is not None and self.seen > warmup:
                self.steps.append(self.batch | {"seconds": now - self.last})
            self.last = now

        def summary(self) -> dict[str, Any]:
            seconds = sum(s["seconds"] for s in self.steps)
            total = {k: sum(s[k] for s in self.steps) for k in ("utts", "audio_s", "tokens")}
            return {
                "steps_timed": len(self.steps),
                "seconds": round(seconds, 3),
                "mean_batch_utts": round(total["utts"] / max(1, len(self.steps)), 2),
                "utts_per_s": round(total["utts"] / seconds, 3),
                "audio_s_per_s": round(total["audio_s"] / seconds, 2),
                "tokens_per_s": round(total["tokens"] / seconds, 1),
            }

    return StepTimer()


def train_once(model: Any, set_dir: Path, p: Params, gpu: bool, warmup: int, steps: int, baseline: bool) -> dict:
    """Train `warmup + steps` steps of `p` on the manifest folder; throughput after warm-up and peak GPU memory."""
    import torch
    from omegaconf import open_dict

    from stages.train.config import make_trainer, optimizer_config, prepare_model
    from stages.train.data import make_datamodule

    p = p.model_copy(update={"train": p.train.model_copy(update={"max_steps": warmup + steps, "val_every": 0})})
    prepare_model(model, p.train, gpu)
    if baseline:  # NeMo's example optimizer: AdamW looping over tensors (`foreach`), no fused kernel
        with open_dict(model.cfg):
            model.cfg.optimizer = optimizer_config(p.train, gpu=False)[0] | {"foreach": True}
    if not p.train.grad_checkpointing:
        model.llm.gradient_checkpointing_disable()
    timer = step_timer(warmup, model.text_pad_id)
    trainer = make_trainer(p.train, gpu, 1, [timer], False)  # one device: per-GPU figures
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result: dict[str, Any]
    try:
        trainer.fit(model, make_datamodule(model, set_dir, p.train))
        result = timer.summary()
    except torch.OutOfMemoryError:
        result = {"oom": True}
    except Exception as exc:  # e.g. bitsandbytes missing for the 8-bit variant: record it, measure the rest
        result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    if gpu:
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    del trainer
    model.zero_grad(set_to_none=True)
    gc.collect()
    return result


def batching(p: Params) -> dict[str, Any]:
    t = p.train
    return {
        "batch_size": t.batch_size,
        "batch_tokens": t.batch_tokens,
        "num_buckets": t.num_buckets,
        "grad_checkpointing": t.grad_checkpointing,
        "optimizer": t.optimizer,
        "num_workers": t.num_workers,
    }


# ---------------------------------------------------------------- decoding and restart


def decode_once(model: Any, set_dir: Path, batch_size: int, clips: int) -> dict[str, Any]:
    import torch

    from medasr.inference import generate_ids, load_batch, transcribe

    rows = [json.loads(line) for line in (set_dir / "train.json").read_text().splitlines()][:clips]
    paths = [set_dir / r["audio_filepath"] for r in rows]
    forced = round(TOKENS_PER_SECOND * rows[0]["duration"])
    transcribe(model, paths[:batch_size], batch_size, forced, forced)  # warm-up (kernels, allocator)
    # check that the end token was suppressed: every output is `forced` long
    ids = generate_ids(model, *load_batch(paths[:2]), forced, forced)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    texts = transcribe(model, paths, batch_size, forced, forced)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    audio = sum(r["duration"] for r in rows)
    return {
        "batch_size": batch_size,
        "clips": len(rows),
        "tokens_per_clip": forced,
        "output_tokens": int(ids.shape[1]),
        "empty_transcripts": sum(not t for t in texts),
        "seconds": round(seconds, 3),
        "rtfx": round(audio / seconds, 1),
    }


def restart_times(model: Any, set_dir: Path, work: Path) -> dict[str, Any]:
    """`medasr train` in fresh processes on the model saved as a release-like folder (the canary-qwen-2.5b
    preset's loader): a first run to step 2, then a resume to step 3. Seconds from process start to first step."""
    from medasr.export import save_tokenizer_and_llm_config

    release = work / "release"
    model.save_pretrained(release)
    save_tokenizer_and_llm_config(model, release)
    ws = work / "restart"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "manifests").symlink_to(set_dir)
    out: dict[str, Any] = {}
    for label, max_steps in (("fresh_start", 2), ("resume", 3)):
        p = committed_params(
            **{
                "model.preset": "canary-qwen-2.5b",
                "model.pretrained": str(release),
                "model.revision": None,
                "train.max_steps": max_steps,
                "train.checkpoint_every": 1,
                "train.val_every": 0,
            }
        )
        (ws / "params.yaml").write_text(yaml.safe_dump(p.model_dump(), sort_keys=False))
        env = dict(
            os.environ, WANDB_MODE="disabled", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        )
        metrics = ws / "metrics" / "train.json"  # what the train stage records about its own start
        metrics.unlink(missing_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "stages.cli", "train"], cwd=ws, env=env, capture_output=True, text=True
        )
        if proc.returncode != 0 or not metrics.is_file():
            out[label] = {"error": (proc.stdout + proc.stderr)[-2000:]}
            break
        recorded = json.loads(metrics.read_text())
        out[label] = {"first_step": recorded["first_step"], "seconds_from_process_start": recorded["first_step_s"]}
    return out


# ---------------------------------------------------------------- main


def environment() -> dict[str, Any]:
    import lightning
    import nemo
    import torch
    import transformers

    gpu = torch.cuda.is_available()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nemo_toolkit": nemo.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(PROFILES), default="full")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/train_speed_<size>.json")
    parser.add_argument("--sections", default="grid,compare,defaults,decode,restart")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    out_file = args.out or REPO / "bench" / "results" / f"train_speed_{args.size}.json"
    prof = PROFILES[args.size]

    import torch

    from medasr.model import build_random

    gpu = torch.cuda.is_available()
    if args.size == "full" and not gpu:
        sys.exit("--size full needs a CUDA GPU (use --size tiny on CPU)")
    result: dict[str, Any] = {"environment": environment(), "size": args.size, "profile": prof}
    defaults = committed_params()
    result["committed_train_params"] = batching(defaults)

    def save() -> None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="medasr-train-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        with torch.device("cuda" if gpu else "cpu"):
            model = build_random(args.size, defaults.lora, defaults.model.trainable, 0, work / "llm")
        if gpu:
            model = model.to(torch.bfloat16)
        result["build_seconds"] = round(time.perf_counter() - started, 1)
        result["parameters"] = {
            "total": sum(x.numel() for x in model.parameters()),
            "lora_rank": defaults.lora.rank,
            "trainable_parts": list(defaults.model.trainable),
        }
        sets = {f"fixed_{n}s": [float(n)] * prof["clips_per_length"] for n in prof["lengths"]}
        sets["mixed"] = mixed_durations(prof["mixed_clips"], seed=1)
        set_dirs = {name: work / "sets" / name for name in sets}
        result["sets"] = {
            name: {"clips": len(d), "audio_s": round(write_set(set_dirs[name], d, model.tokenizer, i), 1)}
            for i, (name, d) in enumerate(sets.items())
        }
        steps = {"gpu": gpu, "warmup": prof["warmup"], "steps": prof["steps"]}

        if "grid" in sections:
            result["grid"] = []
            for length in prof["lengths"]:
                for batch_size in prof["batch_sizes"]:
                    p = committed_params(
                        **{"train.batch_size": batch_size, "train.batch_tokens": None, "train.num_buckets": 1}
                    )
                    row = {"clip_s": length, "batch_size": batch_size}
                    row |= train_once(model, set_dirs[f"fixed_{length}s"], p, baseline=False, **steps)
                    result["grid"].append(row)
                    save()
        if "compare" in sections:
            example = committed_params(
                **{
                    "train.batch_size": 4,
                    "train.batch_tokens": None,
                    "train.num_buckets": 1,
                    "train.grad_checkpointing": False,
                    "train.optimizer": "adamw",
                    "train.num_workers": 1,
                }
            )
            variants = {
                "baseline: NeMo example config": (example, True),
                "ours: committed params": (defaults, False),
                "ours + activation checkpointing": (committed_params(**{"train.grad_checkpointing": True}), False),
            }
            if gpu:
                variants["ours + 8-bit AdamW"] = (committed_params(**{"train.optimizer": "adamw8bit"}), False)
            result["compare"] = []
            for name, (p, is_baseline) in variants.items():
                row = {"run": name, **batching(p)}
                row |= train_once(model, set_dirs["mixed"], p, baseline=is_baseline, **steps)
                result["compare"].append(row)
                save()
            base = result["compare"][0].get("audio_s_per_s")
            for row in result["compare"]:
                if base and row.get("audio_s_per_s"):
                    row["speedup_vs_baseline"] = round(row["audio_s_per_s"] / base, 2)
        if "defaults" in sections:
            result["defaults"] = []
            for length in prof["lengths"]:
                row = {"clip_s": length} | train_once(
                    model, set_dirs[f"fixed_{length}s"], defaults, baseline=False, **steps
                )
                if gpu:
                    row["fits_a100_40gb"] = not row.get("oom") and row["peak_gib"] <= A100_40GB_BUDGET_GIB
                result["defaults"].append(row)
                save()
        if "decode" in sections:
            result["decode"] = []
            for length in prof["lengths"]:  # one length per set: every clip gets the same forced output length
                for batch_size in prof["decode_batch_sizes"]:
                    row = {"clip_s": length} | decode_once(
                        model, set_dirs[f"fixed_{length}s"], batch_size, prof["decode_clips"]
                    )
                    result["decode"].append(row)
                    save()
        if "restart" in sections:
            result["restart"] = restart_times(model, set_dirs["mixed"], work)
            save()
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
