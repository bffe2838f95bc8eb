"""train: which checkpoint a run resumes, on checkpoint folders written by hand (fast: no torch, no model).

The same fallbacks on checkpoints written by real training runs are in test_train.py (e2e)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from helpers import tiny_params

from medasr.paths import CHECKPOINT_META, CHECKPOINT_STATE, LATEST, step_dir_name
from stages.train.checkpoints import find_resumable, fingerprint, resume_point

FP = "0123456789abcdef"


def checkpoint(run_dir: Path, step: int, fp: str = FP, *, sha256: str | None = None, meta: bool = True) -> Path:
    """A checkpoint folder as the training callback leaves it: the state file, then meta.json (written last)."""
    folder = run_dir / step_dir_name(step)
    folder.mkdir(parents=True)
    state = f"weights at step {step}".encode()
    (folder / CHECKPOINT_STATE).write_bytes(state)
    if meta:
        record = {
            "fingerprint": fp,
            "step": step,
            "sha256": sha256 or hashlib.sha256(state).hexdigest(),
            "epoch": step // 10,
            "epoch_batches": step % 10,
        }
        (folder / CHECKPOINT_META).write_text(json.dumps(record))
    return folder


def test_the_newest_valid_checkpoint_wins(tmp_path):
    run_dir = tmp_path / "run"
    for step in (4, 8, 12):
        checkpoint(run_dir, step)
    found = find_resumable(run_dir, FP)
    assert found is not None and (found.step, found.path.name) == (12, "step-00000012")
    assert found.meta["epoch"] == 1 and found.meta["epoch_batches"] == 2
    assert find_resumable(tmp_path / "missing", FP) is None


def test_the_latest_pointer_is_preferred_over_a_newer_folder(tmp_path):
    run_dir = tmp_path / "run"
    for step in (4, 8, 12):
        checkpoint(run_dir, step)
    (run_dir / LATEST).write_text("step-00000008\n")
    assert find_resumable(run_dir, FP).step == 8
    (run_dir / LATEST).write_text("step-00000099\n")  # names a folder that is gone: ignored, newest wins
    assert find_resumable(run_dir, FP).step == 12


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    run_dir = tmp_path / "run"
    checkpoint(run_dir, 4)
    checkpoint(run_dir, 8)
    newest = checkpoint(run_dir, 12)
    (run_dir / LATEST).write_text("step-00000012\n")

    state = newest / CHECKPOINT_STATE
    state.write_bytes(state.read_bytes()[:5])  # a write cut short: the sha256 no longer matches
    with caplog.at_level(logging.WARNING):
        found = find_resumable(run_dir, FP)
    assert found is not None and found.step == 8
    assert "ignoring checkpoint" in caplog.text and "sha256" in caplog.text and "step-00000012" in caplog.text


def test_a_checkpoint_of_another_fingerprint_or_without_meta_is_skipped(tmp_path, caplog):
    run_dir = tmp_path / "run"
    checkpoint(run_dir, 4)
    checkpoint(run_dir, 8, fp="another-fingerprint")
    checkpoint(run_dir, 12, meta=False)  # an upload or save that never finished
    checkpoint(run_dir, 16, sha256="0" * 64)
    with caplog.at_level(logging.WARNING):
        found = find_resumable(run_dir, FP)
    assert found is not None and found.step == 4
    assert "fingerprint another-fingerprint" in caplog.text
    for step in (8, 12, 16):
        assert f"ignoring checkpoint {run_dir / step_dir_name(step)}" in caplog.text

    (run_dir / step_dir_name(4) / CHECKPOINT_META).unlink()
    assert find_resumable(run_dir, FP) is None
    assert find_resumable(run_dir, "another-fingerprint").step == 8


def test_resume_point_without_a_mirror(tmp_path):
    run_dir = tmp_path / "run"
    assert resume_point(run_dir, FP, None) == (None, "none")

    checkpoint(run_dir, 4)
    checkpoint(run_dir, 8)
    found, source = resume_point(run_dir, FP, None)
    assert source == "local" and found.step == 8

    # nothing usable: the run folder is cleared so the fresh run does not mix with corrupt leftovers
    other = tmp_path / "other"
    checkpoint(other, 4, sha256="0" * 64)
    assert resume_point(other, FP, None) == (None, "none")
    assert not other.exists()


def test_the_fingerprint_covers_what_decides_the_weights_only():
    def fp(world_size: int = 1, precision: str = "32", **overrides) -> str:
        p = tiny_params(**overrides)
        return fingerprint(p.model, p.lora, p.train, "data-sha", world_size=world_size, precision=precision)

    base = fp()
    assert len(base) == 16 and base == fp()
    # resuming with a longer run, other checkpoint spacing or validation settings continues the same run
    assert base == fp(**{"train.max_steps": 500, "train.checkpoint_every": 7, "train.val_every": 3})
    # the resolved world size and precision count, not how params spell them (devices null or 1, precision auto)
    assert base == fp(**{"train.devices": 1, "train.precision": "32"}) == fp(**{"train.precision": "auto"})
    assert fp(world_size=2) != base and fp(precision="bf16") != base
    # anything that changes the weights at a given step is a different run
    for changed in ({"lora.rank": 16}, {"train.lr": 1e-4}, {"train.seed": 7}, {"train.batch_size": 2}):
        assert fp(**changed) != base, changed
    p = tiny_params()
    assert fingerprint(p.model, p.lora, p.train, "other-data", world_size=1, precision="32") != base
