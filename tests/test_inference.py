"""One device and precision rule: models run where medasr/device.py places them, in the training precision, and
audio reaches NeMo's preprocessor as fp32 in decoding and in training alike. Decode batches obey a token budget.

The refusals and the batch planner are fast; decoding with a model, and Lightning, are e2e. The same rule through
`dvc exp run`, training included: tests/test_eval.py.
"""

from __future__ import annotations

import json
import math

import pytest
import soundfile as sf
import torch
from helpers import committed_params_text, tiny_params
from typer.testing import CliRunner

from medasr import StageError, device
from medasr.device import accelerator, cpu_bf16_supported, place
from medasr.export import model_precision
from medasr.inference import FRAMES_PER_SECOND, plan_batches

needs_bf16 = pytest.mark.skipif(
    accelerator() == "cpu" and not cpu_bf16_supported(), reason="torch has no bf16 support on this CPU"
)


def test_batches_hold_similar_lengths_within_the_size_cap_and_the_token_budget():
    seconds = [4.0, 0.8, 2.0, 0.8, 1.0, 30.0]
    assert plan_batches(seconds, 2, None, 0) == [[1, 3], [4, 2], [0, 5]]  # shortest first, ties in input order
    # a clip costs its audio frames (12.5 per second) + the prompt and new-token allowance; a batch costs its longest
    # clip times its clips, as training's sampler counts
    cost = [math.ceil(s * FRAMES_PER_SECOND) + 20 for s in seconds]
    assert cost == [70, 30, 45, 30, 33, 395]
    assert plan_batches(seconds, 8, 3 * 33, 20) == [[1, 3, 4], [2], [0], [5]]  # 3 x 33 fits, 4 x 45 does not
    assert plan_batches(seconds, 8, 2 * 45, 20) == [[1, 3], [4, 2], [0], [5]]
    assert plan_batches(seconds, 2, 2 * 70, 20) == [[1, 3], [4, 2], [0], [5]]  # the size cap still holds
    assert plan_batches(seconds, 8, 2 * 70, 20) == [[1, 3, 4], [2, 0], [5]]
    assert plan_batches(seconds, 8, 10, 20) == [[1], [3], [4], [2], [0], [5]]  # over budget alone: decodes alone
    assert plan_batches([], 4, 100, 20) == []


def test_no_audio_longer_than_the_model_hears_is_ever_decoded_whole():
    from medasr.inference import generate_ids
    from medasr.params import MODEL_MAX_AUDIO_SECONDS

    class Model:  # stands in for SALM: only what generate_ids touches once it lets a batch through
        device = torch.device("cpu")

        def generate(self, **kwargs):
            return kwargs["audio_lens"]

    limit = int(MODEL_MAX_AUDIO_SECONDS * 16_000)
    audios = torch.zeros(2, limit + 1)
    with pytest.raises(ValueError, match=r"audio of 40\.0001 s in a decode batch: the model hears at most 40 s"):
        generate_ids(Model(), audios, torch.tensor([16_000, limit + 1]), 8)
    assert generate_ids(Model(), audios, torch.tensor([16_000, limit]), 8).tolist() == [16_000, limit]


def test_files_decode_in_groups_of_bounded_audio_each_whole_file_in_one_group():
    from medasr.inference import _groups

    assert _groups([1000, 3000, 500, 4000, 10], 3600) == [[0], [1, 2], [3], [4]]
    assert _groups([], 3600) == []


class ScriptedSalm:
    """Stands in for SALM in `transcribe_long`'s decode path: it "hears" each window as the text scripted for the
    window's length in samples (the id it generates), then the end token."""

    device = torch.device("cpu")
    training = False
    text_eos_id = -1

    def __init__(self, said: dict[int, str]):
        self.said, self.tokenizer = said, self

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, prompts, audios, audio_lens, **kwargs):
        return torch.stack([audio_lens, torch.full_like(audio_lens, self.text_eos_id)], dim=1)

    def ids_to_text(self, ids):
        return self.said[ids[0]]


def test_windows_decode_in_time_order_and_merge_only_where_the_overlap_holds_speech(tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    from medasr import longform
    from medasr.inference import transcribe_long
    from medasr.longform import window_plans

    # the VAD's findings, by file: the patient's channel is silent from 6.5 s to 11 s, while the doctor talks
    speech = {16.5 * 16_000: [(0.5, 6.5), (11.0, 16.0)], 16.8 * 16_000: [(0.5, 16.3)]}
    heard: list[int] = []

    def regions(audio):
        heard.append(len(audio))
        return speech[len(audio)]

    monkeypatch.setattr(longform, "speech_regions", regions)
    patient, spoken, short = tmp_path / "patient.flac", tmp_path / "spoken.flac", tmp_path / "short.flac"
    for path, seconds in ((patient, 16.5), (spoken, 16.8), (short, 3.0)):
        sf.write(path, np.zeros(int(seconds * 16_000), dtype=np.float32), 16_000)
    plans = window_plans([patient, spoken, short], 10.0, 3.0)  # what eval does before its timed decode
    assert [len(p.windows) for p in plans] == [2, 2, 1]
    assert [s.speech for p in plans for s in p.seams] == [False, True]
    scripts = [
        ["yeah i have had a headache for about a week now and it is getting worse",
         "okay yeah it started after the flu i think"],
        ["i have had a headache for about a week now", "about a week now and it is getting worse"],
        ["thank you"],
    ]  # fmt: skip
    said = {
        round((end - start) * 16_000): text
        for p, s in zip(plans, scripts, strict=True)
        for (start, end), text in zip(p.windows, s, strict=True)
    }
    assert len(said) == 5  # the windows' lengths tell them apart
    done = transcribe_long(ScriptedSalm(said), [patient, spoken, short], 4, 8, 10.0, 3.0)
    assert [t.windows for t in done] == [2, 2, 1]
    # no speech in the overlap: the windows are joined as they are, though they share "yeah" and "it"
    assert done[0].text == " ".join(scripts[0])
    # speech in it: the common run "about a week now" is the seam
    assert done[1].text == "i have had a headache for about a week now and it is getting worse"
    assert done[2].text == "thank you"
    assert len(heard) == 2  # each long file went through the VAD once: the plans eval made first were reused


def _model_folder(tmp_path, meta: dict):
    (tmp_path / "medasr.json").write_text(json.dumps(meta))
    return tmp_path


def test_model_precision_is_the_training_precision_and_refuses_a_folder_that_is_not_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "gpu_available", lambda: False)
    with pytest.raises(StageError, match=r"no-model is not a medasr model folder \(no medasr.json\)"):
        model_precision(tmp_path / "no-model")
    assert model_precision(_model_folder(tmp_path, {"precision": "32"})) == "32"
    assert model_precision(_model_folder(tmp_path, {"preset": "tiny"})) == "32"  # older folder: this machine's default
    monkeypatch.setattr(device, "gpu_available", lambda: True)
    assert model_precision(_model_folder(tmp_path, {"preset": "tiny"})) == "bf16"
    assert model_precision(_model_folder(tmp_path, {"precision": "32"})) == "32"  # trained in fp32: runs in fp32


def test_a_bf16_model_runs_in_fp32_on_a_cpu_without_bf16(tmp_path, monkeypatch, caplog):
    """A model trained in bf16 on a GPU, then used on a CPU where torch has no bf16: fp32 (upcasting loses nothing),
    said once, not a refusal naming a train param the user of `transcribe` cannot set."""
    monkeypatch.setattr(device, "gpu_available", lambda: False)
    monkeypatch.setattr(device, "cpu_bf16_supported", lambda: False)
    assert model_precision(_model_folder(tmp_path, {"precision": "bf16"})) == "32"
    assert "running it in fp32" in caplog.text
    monkeypatch.setattr(device, "cpu_bf16_supported", lambda: True)
    assert model_precision(_model_folder(tmp_path, {"precision": "bf16"})) == "bf16"  # the dtype path, tested on CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_train_refuses_bf16_on_a_cpu_without_it_in_one_line_touching_nothing(tmp_path, monkeypatch):
    from stages.cli import app

    monkeypatch.setattr(device, "cpu_bf16_supported", lambda: False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(committed_params_text().replace("precision: auto", "precision: bf16", 1))
    assert "precision: bf16" in (tmp_path / "params.yaml").read_text()
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines() == [
        "error: train.precision=bf16: torch has no bf16 support on this CPU; use 32 (or auto) here"
    ]
    # nothing of the pipeline's: only the command's own log may appear
    assert {p.name for p in tmp_path.iterdir()} - {"logs"} == {"params.yaml"}


@pytest.mark.e2e  # imports Lightning
@needs_bf16
def test_bf16_training_casts_the_model_and_the_batch_but_not_its_audio():
    from lightning.pytorch.plugins.precision import HalfPrecision

    from stages.train.config import precision_plugin

    plugin = precision_plugin(tiny_params(**{"train.precision": "bf16"}).train, gpu=False)
    assert isinstance(plugin, HalfPrecision)
    assert plugin.convert_module(torch.nn.Linear(2, 2)).weight.dtype == torch.bfloat16
    batch = {  # SALMDataset's batch, plus a float tensor standing for any other
        "audios": torch.rand(2, 1600) - 0.5,
        "audio_lens": torch.tensor([1600, 1200]),
        "input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]),
        "loss_mask": torch.tensor([[False, True, True], [False, False, True]]),
        "other": torch.rand(3),
    }
    # a training batch, and a validation batch: NeMo's DataModule keys those by dataset name
    for out in (plugin.convert_input(batch), plugin.convert_input({"val": batch})["val"]):
        assert out.keys() == batch.keys()
        assert out["audios"].dtype == torch.float32 and torch.equal(out["audios"], batch["audios"])
        assert out["other"].dtype == torch.bfloat16
        assert all(torch.equal(out[k], batch[k]) for k in ("audio_lens", "input_ids", "loss_mask"))
    assert type(precision_plugin(tiny_params(**{"train.precision": "32"}).train, gpu=False)).__name__ == "Precision"


@pytest.mark.e2e
@needs_bf16
def test_a_bf16_model_decodes_fp32_audio_into_bf16_features_in_budgeted_batches(demo_manifests):
    from medasr.inference import observed_dtypes, prompt_tokens, transcribe
    from medasr.model import base_model

    p = tiny_params()
    model = place(base_model(p.model, p.lora, p.train.seed), "bf16")
    calls: list[tuple[str, torch.dtype, int]] = []

    def watch(name: str, argument: str):  # the test's own hooks, independent of observed_dtypes'
        def hook(_module, args, kwargs):
            tensor = kwargs[argument]
            calls.append((name, tensor.dtype, tensor.shape[0]))

        return hook

    model.perception.preprocessor.register_forward_pre_hook(watch("preprocessor", "input_signal"), with_kwargs=True)
    model.perception.encoder.register_forward_pre_hook(watch("encoder", "audio_signal"), with_kwargs=True)
    clips = sorted((demo_manifests / "audio").glob("*.flac"))[:4]

    with observed_dtypes(model) as record:
        texts = transcribe(model, clips, batch_size=4, max_new_tokens=4)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert [c for c in calls if c[0] == "preprocessor"] == [("preprocessor", torch.float32, 4)]
    assert [c for c in calls if c[0] == "encoder"] == [("encoder", torch.bfloat16, 4)]
    assert record == {
        "device": str(model.device),
        "parameters": "bfloat16",
        "preprocessor_input": "float32",
        "encoder_input": "bfloat16",
    }

    # a budget of the longest clip's positions: transcribe decodes in exactly the batches plan_batches plans
    seconds = [sf.info(str(c)).duration for c in clips]
    fixed = prompt_tokens(model) + 4
    budget = max(math.ceil(s * FRAMES_PER_SECOND) for s in seconds) + fixed
    planned = plan_batches(seconds, 4, budget, fixed)
    assert len(planned) > 1  # the budget bites
    calls.clear()
    assert len(transcribe(model, clips, batch_size=4, max_new_tokens=4, batch_tokens=budget)) == 4
    assert [n for name, _, n in calls if name == "preprocessor"] == [len(b) for b in planned]
