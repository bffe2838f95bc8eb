"""train: only the intended parameters learn, resume is exact, and the exported model reloads and transcribes.

All runs use the tiny preset (same SALM class and code path as canary-qwen-2.5b) on the bundled demo audio, CPU.
The refusals that come before any model is built are fast; the rest is e2e. Tests that only inspect what a plain
8-step run left behind share one (`trained`); a test that changes its checkpoints works on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from csv import DictReader
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_same_training_state, run_env, tiny_params, train_in

from medasr import StageError
from medasr.files import read_jsonl
from medasr.paths import CHECKPOINT_STATE as STATE
from medasr.tracking import SAMPLE_COLUMNS, VAL_SAMPLES, markedly_worse
from stages.train.checkpoints import data_hash, find_resumable, fingerprint


@pytest.fixture(scope="session")
def trained(tmp_path_factory, demo_manifests) -> Path:
    """One plain run of the tiny model, 8 steps with a checkpoint and a validation every 4 (all kept), W&B offline as
    on a machine without an account: tests only read it."""
    root = tmp_path_factory.mktemp("trained")
    p = tiny_params(**{"train.max_steps": 8, "train.keep_checkpoints": 3, "train.val_every": 4})
    with pytest.MonkeyPatch.context() as env:
        # neither variable set, as on a pod without an account: medasr's own rule must pick offline (a W&B setup
        # left online once asked for a key here and failed training on the pod)
        env.delenv("WANDB_MODE", raising=False)
        env.delenv("WANDB_API_KEY", raising=False)
        metrics = train_in(root, demo_manifests, p)
    assert metrics["global_step"] == 8 and metrics["resume_source"] == "none"
    return root


def teacher_forced_loss(model, manifests: Path) -> float:
    """SALM's own training loss on the first 8 training utterances, in eval mode (no dropout)."""
    from nemo.collections.speechlm2.data import DataModule, SALMDataset
    from omegaconf import OmegaConf

    from stages.train.config import data_config

    cfg = data_config(manifests, tiny_params(**{"train.batch_size": 8}).train)
    cfg["train_ds"]["shuffle"] = False
    dm = DataModule(OmegaConf.create(cfg), tokenizer=model.tokenizer, dataset=SALMDataset(model.tokenizer))
    batch = next(iter(dm.train_dataloader()))
    model.eval()
    with torch.no_grad():
        inputs = model.prepare_inputs(batch)
        logits = model(inputs["input_embeds"], attention_mask=inputs["attention_mask"])["logits"]
        return float(
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), inputs["target_ids"].flatten(0, 1), ignore_index=-100
            )
        )


@pytest.mark.e2e
def test_only_lora_encoder_and_projection_learn_and_loss_falls(tmp_path, demo_manifests):
    from medasr.export import load_model
    from medasr.model import base_model

    p = tiny_params(**{"train.max_steps": 20})
    before = base_model(p.model, p.lora, p.train.seed)
    metrics = train_in(tmp_path, demo_manifests, p)
    after = load_model(tmp_path / "model")

    assert metrics["global_step"] == 20 and metrics["resume_source"] == "none"
    initial, final = before.state_dict(), after.state_dict()
    assert initial.keys() == final.keys()
    changed = {k for k in initial if not torch.equal(initial[k], final[k])}
    trainable = {n for n, prm in after.named_parameters()}  # names, to classify every tensor
    lora = {k for k in initial if ".lora_" in k}
    assert lora and lora <= changed, "every LoRA tensor must learn"
    assert any(k.startswith("perception.encoder.") for k in changed)
    assert any(k.startswith("perception.proj") for k in changed)
    frozen = {k for k in trainable if (k.startswith("llm.") and ".lora_" not in k) or k.startswith("embed_tokens")}
    assert frozen and not frozen & changed, f"frozen LLM weights changed: {sorted(frozen & changed)[:3]}"
    assert not any(k.startswith("perception.preprocessor.") for k in changed)
    assert metrics["trainable_params"] == sum(
        prm.numel()
        for n, prm in after.named_parameters()
        if ".lora_" in n
        or n.startswith("perception.encoder.")
        or n.startswith("perception.proj")
        or n.startswith("perception.modality_adapter")
    )
    # deterministic (eval mode, fixed batch): the frozen random LLM limits how far LoRA + encoder move it
    assert teacher_forced_loss(after, demo_manifests) < 0.99 * teacher_forced_loss(before, demo_manifests)


def test_markedly_worse_wer_is_past_both_margins_over_the_best_so_far():
    assert not markedly_worse(0.90, None)  # the first validation has nothing to be worse than
    assert not markedly_worse(0.15, 0.10) and markedly_worse(0.1501, 0.10)  # low WER: 5 points absolute
    assert not markedly_worse(0.60, 0.50) and markedly_worse(0.6001, 0.50)  # high WER: 20 % of the best
    assert not markedly_worse(0.05, 0.10)  # better is never a warning


def test_a_resume_drops_the_curves_and_samples_logged_after_its_checkpoint(tmp_path):
    from medasr.tracking import truncate_history

    (tmp_path / "plots" / "metrics").mkdir(parents=True)
    (tmp_path / "plots" / "metrics" / "loss.tsv").write_text("step\tloss\n3\t2.0\n7\t1.0\n")
    samples = 'step\tid\twer\treference\thypothesis\n4\ta\t0.5\t"Say ""ah"", please."\tsay ah\n8\ta\t0.0\tx\tx\n'
    (tmp_path / "val_samples.tsv").write_text(samples)
    truncate_history(tmp_path, 4)  # the crash lost everything after step 4
    assert (tmp_path / "plots" / "metrics" / "loss.tsv").read_text() == "step\tloss\n3\t2.0\n"
    with open(tmp_path / "val_samples.tsv", newline="") as f:
        kept = list(DictReader(f, delimiter="\t"))
    assert [(r["step"], r["reference"]) for r in kept] == [("4", 'Say "ah", please.')]


@pytest.mark.e2e
def test_each_validation_logs_the_same_sample_utterances_to_dvclive_and_wandb(trained, demo_manifests):
    from medasr.scoring import score

    val = read_jsonl(demo_manifests / "val.json")[:VAL_SAMPLES]
    (run_dir,) = (trained / "ckpt").glob("*/")
    with open(trained / "curves" / "val_samples.tsv", newline="") as f:  # the stage's declared copy of DVCLive's
        tsv = [
            [int(r["step"]), r["id"], float(r["wer"]), r["reference"], r["hypothesis"]]
            for r in DictReader(f, delimiter="\t")
        ]
    assert [(r[0], r[1], r[3]) for r in tsv] == [(step, u["id"], u["text"]) for step in (4, 8) for u in val]
    assert all(r[2] == round(score([r[3]], [r[4]])["wer"], 4) for r in tsv)  # its own hypothesis's WER

    # W&B (offline): one `val_samples` table per validation, with the same rows
    tables = sorted(run_dir.glob("wandb/offline-run-*/files/media/table/val_samples_*.table.json"))
    assert len(tables) == 2
    logged = [json.loads(t.read_text()) for t in tables]
    assert all(t["columns"] == SAMPLE_COLUMNS for t in logged)
    assert sorted(row for t in logged for row in t["data"]) == sorted(tsv)

    # what the pod's heartbeat reads: the last validation, warned about only when markedly worse than the first
    with open(run_dir / "dvclive" / "plots" / "metrics" / "val" / "wer.tsv", newline="") as f:
        first, last = (float(r["wer"]) for r in DictReader(f, delimiter="\t"))
    status = json.loads((trained / "ckpt" / "validation.json").read_text())
    assert status["step"] == 8 and status["wer"] == pytest.approx(last)
    assert (status["warning"] is not None) == markedly_worse(last, first)


@pytest.mark.e2e
def test_changed_lora_rank_starts_fresh_and_raised_max_steps_continues(tmp_path, demo_manifests, trained):
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")  # an 8-step run's checkpoints (a copy: this test adds more)

    longer = train_in(tmp_path, demo_manifests, tiny_params(**{"train.max_steps": 12}))
    assert (longer["resume_source"], longer["resumed_from_step"], longer["global_step"]) == ("local", 8, 12)

    # another rank is another run: nothing of the rank-8 run's (now at step 12) is resumed, so 4 steps tell
    rank16 = train_in(tmp_path, demo_manifests, tiny_params(**{"train.max_steps": 4, "lora.rank": 16}))
    assert (rank16["resume_source"], rank16["resumed_from_step"], rank16["global_step"]) == ("none", 0, 4)


@pytest.mark.e2e
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, demo_manifests, trained, caplog):
    p = tiny_params(**{"train.max_steps": 8, "train.keep_checkpoints": 3})
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")  # that run's checkpoints, on a copy this test damages
    fp = fingerprint(p.model, p.lora, p.train, data_hash(demo_manifests), world_size=1, precision="32")
    run_dir = tmp_path / "ckpt" / fp
    assert find_resumable(run_dir, fp).step == 8

    state = run_dir / "step-00000008" / STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a write cut short
    found = find_resumable(run_dir, fp)
    assert found is not None and found.step == 4
    assert "ignoring checkpoint" in caplog.text and "sha256" in caplog.text

    shutil.rmtree(run_dir / "step-00000004")
    (run_dir / "step-00000008" / "meta.json").unlink()  # an upload or save that never finished
    assert find_resumable(run_dir, fp) is None
    assert find_resumable(run_dir, "another-fingerprint") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_8bit_optimizer_without_a_gpu_is_refused_before_any_work(tmp_path, demo_manifests):
    with pytest.raises(StageError, match="adamw8bit needs a CUDA GPU"):
        train_in(tmp_path, demo_manifests, tiny_params(**{"train.optimizer": "adamw8bit"}))
    assert not (tmp_path / "ckpt").exists()


def test_empty_train_split_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train.json").write_text("")
    with pytest.raises(StageError, match="nothing to train on"):
        train_in(tmp_path, tmp_path / "m", tiny_params())


@pytest.mark.e2e
def test_exported_model_reloads_and_transcribes(tmp_path, demo_manifests, trained):
    from medasr.export import load_model
    from medasr.inference import transcribe

    exported = trained / "model"  # read only: what this test writes goes under tmp_path
    meta = json.loads((exported / "medasr.json").read_text())
    assert meta["preset"] == "tiny" and meta["lora"]["rank"] == 8
    assert meta["step"] == json.loads((trained / "train.json").read_text())["exported_step"]  # the best validated

    model = load_model(exported)
    again = load_model(exported)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    clips = sorted((demo_manifests / "audio").glob("*.flac"))[:3]
    texts = transcribe(model, clips, batch_size=2, max_new_tokens=8)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert texts == transcribe(again, clips, batch_size=3, max_new_tokens=8)  # greedy and batch-independent

    # `medasr export`: a plain SALM, the LoRA merged in, whose logits match the adapter model's
    from typer.testing import CliRunner

    from stages.cli import app

    result = CliRunner().invoke(app, ["export", "--model", str(exported), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = load_model(tmp_path / "merged")
    assert not any(".lora_" in name for name, _ in merged.named_parameters())
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "merged: True" in card and meta["fingerprint"] in card and meta["data_sha256"] in card
    embeds = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert torch.allclose(model(embeds)["logits"], merged(embeds)["logits"], atol=1e-5)

    # `medasr transcribe`: one line per readable file; an unreadable one is reported and makes the exit code 1
    bogus = tmp_path / "notes.wav"
    bogus.write_text("not audio")
    result = CliRunner().invoke(app, ["transcribe", str(exported), *map(str, clips[:2]), str(bogus)])
    assert result.exit_code == 1
    assert f"skipped {bogus}: not readable audio" in result.output
    assert [line.split("\t")[0] for line in result.output.splitlines() if "\t" in line] == list(map(str, clips[:2]))


SECRET = "planted-secret-value-7f3a"


def _train_cli(cwd: Path, params: Path, log: Path | None = None) -> subprocess.Popen:
    """`medasr train` in `cwd`; its output piped, or written to `log` (a run nobody reads until it ends)."""
    return subprocess.Popen(
        [sys.executable, "-m", "stages.cli", "train", "--params", str(params)],
        cwd=cwd,
        env=run_env() | {"AWS_SECRET_ACCESS_KEY": SECRET, "WANDB_API_KEY": "", "WANDB_MODE": "offline"},
        stdout=subprocess.PIPE if log is None else log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


def _workspace(root: Path, manifests: Path, p) -> Path:
    root.mkdir()
    shutil.copytree(manifests, root / "data" / "manifests")
    (root / "params.yaml").write_text(yaml.safe_dump(p.model_dump()))
    return root


def _final_state(ws: Path) -> dict:
    run_dir = next(d for d in (ws / "checkpoints" / "train").iterdir() if d.is_dir())
    return torch.load(run_dir / "step-00000030" / STATE, weights_only=False, map_location="cpu")


@pytest.mark.e2e
def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, demo_manifests):
    # LoRA dropout on and shuffling on: a resume that skipped the RNG or the data position would diverge.
    p = tiny_params(**{"train.max_steps": 30, "train.checkpoint_every": 3, "lora.dropout": 0.1})
    straight = _workspace(tmp_path / "straight", demo_manifests, p)
    killed = _workspace(tmp_path / "killed", demo_manifests, p)

    # the uninterrupted run goes alongside from the start (it depends on nothing here): two processes, two cores
    uninterrupted = _train_cli(straight, Path("params.yaml"), log=tmp_path / "straight.log")
    proc = _train_cli(killed, Path("params.yaml"))
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("train/*/step-*/meta.json")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics" / "train.json").exists()  # the stage never claimed success
    (wandb_id_file,) = killed.glob("checkpoints/train/*/wandb_run_id")
    wandb_id = wandb_id_file.read_text()

    resumed = _train_cli(killed, Path("params.yaml"))
    out = resumed.communicate(timeout=600)[0]
    uninterrupted.wait(timeout=600)
    for proc, text in ((resumed, out), (uninterrupted, (tmp_path / "straight.log").read_text())):
        assert proc.returncode == 0, text[-4000:]  # the traceback is at the end
        assert SECRET not in text

    metrics = json.loads((killed / "metrics" / "train.json").read_text())
    assert metrics["resume_source"] == "local" and 0 < metrics["resumed_from_step"] < 30, metrics
    assert metrics["global_step"] == 30
    # the resumed run appends to the same W&B run and continues the DVCLive curves without repeating a step
    assert wandb_id_file.read_text() == wandb_id
    assert json.loads((killed / "models" / "canary-qwen-medical-lora" / "medasr.json").read_text())["wandb"]["id"] == (
        wandb_id.strip()
    )
    steps = [
        int(line.split("\t")[0])
        for line in (killed / "metrics/train_curves/plots/metrics/loss.tsv").read_text().splitlines()[1:]
    ]
    assert steps == sorted(set(steps)) and steps[-1] >= 25
    # no secret in anything the run wrote (W&B config and logs, DVCLive, checkpoints' metadata, model card)
    for path in killed.rglob("*"):
        if path.is_file() and path.suffix not in {".ckpt", ".safetensors", ".flac"}:
            assert SECRET.encode() not in path.read_bytes(), path

    a, b = _final_state(straight), _final_state(killed)
    assert_same_training_state(a, b)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 30


def _mixed_length_manifests(folder: Path) -> Path:
    """16 clips of 1 s and 16 of 12 s, interleaved, in the manifest stage's layout."""
    import numpy as np
    import soundfile as sf

    (folder / "audio").mkdir(parents=True)
    rows = []
    for i in range(32):
        seconds = 1.0 if i % 2 else 12.0
        name = f"audio/c{i:02d}.flac"
        sf.write(folder / name, np.zeros(int(seconds * 16000), dtype=np.float32), 16000, subtype="PCM_16")
        rows.append({"audio_filepath": name, "duration": seconds, "text": "the patient has a cough", "id": str(i)})
    (folder / "train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "val.json").write_text("")
    return folder


def _epoch_batches(manifests: Path, p) -> list[list[float]]:
    """The clip lengths (s) of every batch of one training epoch, as the train stage's data module draws them."""
    from medasr.model import build_random
    from stages.train.data import make_datamodule

    with tempfile.TemporaryDirectory() as tmp:
        model = build_random("tiny", p.lora, p.model.trainable, 0, Path(tmp))
    loader = make_datamodule(model, manifests, p.train).train_dataloader()
    return [sorted((batch["audio_lens"] / 16000).round().tolist()) for batch in loader]


@pytest.mark.e2e  # builds the tiny model for its tokenizer
def test_token_budget_and_buckets_batch_clips_of_similar_length(tmp_path):
    manifests = _mixed_length_manifests(tmp_path / "manifests")
    fixed = _epoch_batches(manifests, tiny_params(**{"train.batch_tokens": None, "train.num_buckets": 1}))
    # NeMo's example batching: always 4 clips, short and long mixed in one padded batch
    assert all(len(b) == 4 for b in fixed) and any(b[0] != b[-1] for b in fixed)

    # 1 s = 13 audio frames + ~20 prompt/transcript tokens; 12 s = 150 + ~20: a budget of 700 holds ~4 long or
    # ~20 short clips. The committed buckets (lhotse sets their bounds so each holds the same total length) keep
    # lengths apart; every clip is still drawn once per epoch.
    budget = _epoch_batches(manifests, tiny_params(**{"train.batch_size": 32, "train.batch_tokens": 700}))
    assert sorted(x for b in budget for x in b) == sorted(x for b in fixed for x in b)
    assert all(b[0] == b[-1] for b in budget), budget
    short = [len(b) for b in budget if b[0] == 1.0]
    long = [len(b) for b in budget if b[0] == 12.0]
    assert max(long) <= 4 < max(short), budget


def test_the_mirror_gets_what_is_left_of_the_stop_grace_after_the_save(monkeypatch):
    # runpod.sh kills the stage train.stop_grace_s (+ a margin) after the signal: a slow save must shorten the drain
    from stages.train import callback

    now = [1000.0]
    monkeypatch.setattr(callback.time, "monotonic", lambda: now[0])
    stop = callback.StopRequest()
    assert stop.grace_left(120) == 120  # stopping on another rank's signal: the whole grace
    stop.handle(signal.SIGTERM, None)
    now[0] += 45  # the step and the save took 45 s
    assert stop.grace_left(120) == 75
    now[0] += 300
    assert stop.grace_left(120) == 1.0  # never zero: one last try
