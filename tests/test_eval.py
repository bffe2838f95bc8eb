"""eval: its refusals before any model loads, the training sample it also scores, and a bf16 run through DVC in
which training and eval compute in bf16 while the audio reaches NeMo's preprocessor as fp32."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import run, tiny_params

from medasr import StageError
from medasr.device import accelerator, cpu_bf16_supported
from stages import eval as eval_stage


def rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"utt{i:03d}", "audio_filepath": f"audio/{i}.flac", "duration": 1.0, "text": "x"}
        for i in range(start, start + n)
    ]


def test_the_training_sample_is_fixed_and_does_not_follow_the_manifest_order():
    sample = eval_stage.pick_sample(rows(40), 8)
    assert len(sample) == 8 and sample == eval_stage.pick_sample(rows(40)[::-1], 8)
    assert [r["id"] for r in sample] != [f"utt{i:03d}" for i in range(8)]  # not the manifest's head
    grown = eval_stage.pick_sample(rows(40) + rows(10, start=40), 8)
    assert len({r["id"] for r in grown} & {r["id"] for r in sample}) >= 4  # new rows only swap some in
    assert len(eval_stage.pick_sample(rows(3), 8)) == 3


def test_a_set_block_holds_intervals_terms_flags_and_windows_and_its_rows_say_where_they_come_from(
    tmp_path, monkeypatch
):
    """`compare` on a long-form set, the transcriber stood in for (each "model" a function of the file name): what
    eval writes per set and per prediction row."""
    from medasr.inference import Transcript

    refs = {
        "day1_consultation01_doctor": "the patient takes amoxicillin twice a day for the chest infection",
        "day1_consultation01_patient": "it started three days ago",
        "narration": "hello there",
    }
    hyps = {
        "finetuned": {
            "day1_consultation01_doctor": refs["day1_consultation01_doctor"].replace("amoxicillin", "amoxil")
        },
        "base": {"day1_consultation01_patient": "it started " + "aspirin " * 20, "narration": "hello"},
    }

    def transcribe_long(model, paths, batch_size, max_new_tokens, chunk_s, overlap_s):
        assert (chunk_s, overlap_s) == (10.0, 3.0)  # the eval params' windows
        return [Transcript(hyps[model.name].get(p.stem, refs[p.stem]), 1 + len(p.stem) // 20) for p in paths]

    monkeypatch.setattr(eval_stage, "transcribe_long", transcribe_long)
    (tmp_path / "audio").mkdir()
    rows = [{"id": k, "audio_filepath": f"audio/{k}.flac", "duration": 1.0, "text": v} for k, v in refs.items()]
    for r in rows:
        silence(tmp_path / r["audio_filepath"])
    ev = tiny_params(**{"eval.chunk_s": 10.0, "eval.chunk_overlap_s": 3.0}).eval
    block, predictions = eval_stage.compare(
        {name: SimpleNamespace(name=name, device=SimpleNamespace(type="cpu")) for name in hyps},
        "consults",
        rows,
        tmp_path,
        ev,
        "medical",
        long_form=True,
    )

    assert block["kind"] == "medical" and block["long_form"] is True
    tuned, base = block["finetuned"], block["base"]
    assert tuned["windows"] == base["windows"] == 2 + 2 + 1
    assert base["hallucinated"] == 1 and tuned["hallucinated"] == 0  # 20 "aspirin" in 1 s: a loop, too long
    assert tuned["term_categories"]["drugs"] == {
        "terms": 1,
        "term_error_rate": 1.0,
        "term_recall": 0.0,
        "insertions": 0,
    }
    assert base["term_categories"]["drugs"]["insertions"] == 20
    for model in (tuned, base):
        assert model["wer_ci"][0] <= model["wer"] <= model["wer_ci"][1]
    lo, hi = block["wer_reduction_ci"]
    assert lo <= block["wer_reduction"] <= hi and block["wer_reduction"] == pytest.approx(base["wer"] - tuned["wer"])

    doctor = next(p for p in predictions if p["model"] == "finetuned" and p["id"] == "day1_consultation01_doctor")
    assert doctor["set"] == "consults" and doctor["role"] == "doctor" and doctor["long_form"] is True
    assert doctor["windows"] == 2 and doctor["hallucination"] == []
    assert doctor["ref_terms"] == ["amoxicillin", "chest", "infection"]  # a drug, anatomy, a condition
    assert doctor["missed_terms"] == ["amoxicillin"] and doctor["inserted_terms"] == []
    looping = next(p for p in predictions if p["model"] == "base" and p["id"] == "day1_consultation01_patient")
    assert looping["role"] == "patient" and set(looping["hallucination"]) == {"repeated_ngram", "too_long"}
    assert next(p for p in predictions if p["id"] == "narration")["role"] is None


def silence(path: Path, seconds: float = 1.0) -> None:
    """A readable 16 kHz FLAC: eval decodes every file before the models see it."""
    import numpy as np

    from medasr.audio import write_flac

    path.parent.mkdir(parents=True, exist_ok=True)
    write_flac(path, np.zeros(int(16000 * seconds), dtype=np.float32), 16000)


class FakeModel:
    """What eval.run touches of a SALM besides decoding (stood in for): placement, and the two modules whose inputs
    `observed_dtypes` watches."""

    def __init__(self, name: str):
        import torch

        self.name, self.module = name, torch.nn.Linear(1, 1)
        self.perception = SimpleNamespace(preprocessor=torch.nn.Identity(), encoder=torch.nn.Identity())
        self.device = torch.device("cpu")

    def to(self, **kwargs):
        self.module.to(**kwargs)
        return self

    def eval(self):
        return self

    def parameters(self):
        return self.module.parameters()


def test_eval_run_pools_each_source_once_records_its_model_and_skips_corrupt_audio(tmp_path, monkeypatch, caplog):
    """`run` with both models stood in for (each "model" a function of the file name): a corrupt and a missing file
    among good ones are counted, not fatal; a source scored by utterance and long-form is pooled once; eval.json
    names the model folder it scored and each test set's source, and holds no headline sentence."""
    import medasr.export
    import medasr.model
    from medasr.export import eval_results
    from medasr.inference import Transcript

    decoded: list[str] = []
    events: list[str] = []
    planned = eval_stage.window_plans

    def window_plans(paths, chunk_s, overlap_s):
        events.append("plan")
        return planned(paths, chunk_s, overlap_s)

    def transcribe_long(model, paths, batch_size, max_new_tokens, chunk_s, overlap_s):
        events.append(model.name)
        decoded.extend(p.name for p in paths)
        return [Transcript("the patient is well" if model.name == "finetuned" else "the patient", 1) for p in paths]

    monkeypatch.setattr(eval_stage, "transcribe_long", transcribe_long)
    monkeypatch.setattr(eval_stage, "window_plans", window_plans)
    monkeypatch.setattr(medasr.export, "load_model", lambda folder: FakeModel("finetuned"))
    monkeypatch.setattr(medasr.model, "base_model", lambda *args: FakeModel("base"))
    manifests = _manifests(tmp_path, train=False)
    for r in rows(2):
        silence(manifests / r["audio_filepath"])
    source = {"dataset": "data/sources/consults", "kind": "textgrid", "config": None, "split": None, "revision": None}
    testsets = tmp_path / "testsets"
    for name, ids in (("consults", ["a", "b", "corrupt", "missing"]), ("consults_long", ["whole"])):
        folder = testsets / name
        clips = [{"id": i, "audio_filepath": f"audio/{i}.flac", "duration": 1.0, "text": "the patient is well"}
                 for i in ids]  # fmt: skip
        for clip in clips:
            if clip["id"] not in ("corrupt", "missing"):
                silence(folder / clip["audio_filepath"])
        (folder / "audio" / "corrupt.flac").write_bytes(b"fLaC" + bytes(200))  # a FLAC's magic, then nonsense
        (folder / "manifest.json").write_text("".join(json.dumps(c) + "\n" for c in clips))
        (folder / "source.json").write_text(json.dumps(source | {"long_form": name.endswith("long")}))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    meta = {"fingerprint": "f" * 16, "step": 8, "precision": "32", "base": {"id": "tiny"}}
    (model_dir / "medasr.json").write_text(json.dumps(meta))
    p = tiny_params(
        **{
            "eval.train_sample": 0,
            "eval.test_sets": [
                {"name": "consults", "dataset": "data/sources/consults"},
                {"name": "consults_long", "dataset": "data/sources/consults", "long_form": True},
            ],
        }
    )
    metrics_file = tmp_path / "eval.json"
    out = [metrics_file, tmp_path / "predictions.jsonl", tmp_path / "report.md", tmp_path / "plot.json"]
    metrics = eval_stage.run(p.eval, p.model, p.lora, p.train.seed, manifests, testsets, model_dir, *out)

    consults = metrics["test"]["consults"]
    assert consults["finetuned"]["skipped_audio"] == consults["base"]["skipped_audio"] == 2
    assert consults["finetuned"]["utterances"] == 2 and "corrupt.flac" not in decoded
    # per set (val, then the two test sets) the windows are planned once, before (outside) either model's timing
    assert events == ["plan", "finetuned", "base"] * 3
    assert "consults: 2 unreadable audio file(s) skipped: corrupt, missing" in caplog.text
    assert {k: consults[k] for k in ("dataset", "config", "split", "revision", "hub")} == {
        "dataset": "data/sources/consults", "config": None, "split": None, "revision": None, "hub": False
    }  # fmt: skip
    medical = metrics["summary"]["medical"]
    assert medical["sets"] == ["consults"] and medical["utterances"] == 2
    assert medical["left_out"] == {"consults_long": "same source as consults"}
    assert "headline" not in metrics["summary"] and json.loads(metrics_file.read_text()) == metrics
    assert "Medical WER (1 test set, 2 units)" in (tmp_path / "report.md").read_text()
    assert metrics["runtime"]["model"] == {"fingerprint": "f" * 16, "step": 8}
    assert eval_results(model_dir, metrics_file) == metrics  # export's card carries these results
    (model_dir / "medasr.json").write_text(json.dumps(meta | {"step": 12}))  # a later export of the same run
    assert eval_results(model_dir, metrics_file) is None and "the card has no results" in caplog.text


def _manifests(tmp_path: Path, train: bool) -> Path:
    out = tmp_path / "manifests"
    out.mkdir()
    (out / "val.json").write_text("".join(json.dumps(r) + "\n" for r in rows(2)))
    if train:
        (out / "train.json").write_text("".join(json.dumps(r) + "\n" for r in rows(5)))
    return out


@pytest.mark.parametrize(
    ("train_sample", "train_manifest", "error"),
    [
        (4, False, r"train.json is missing but eval.train_sample=4: set it to 0"),
        (0, False, r"no-model is not a medasr model folder \(no medasr.json\)"),
        (4, True, r"no-model is not a medasr model folder \(no medasr.json\)"),
    ],
)
def test_eval_refuses_in_one_line_before_loading_any_model(tmp_path, monkeypatch, train_sample, train_manifest, error):
    import medasr.export
    import medasr.model

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(medasr.export, "load_model", no_loading)
    monkeypatch.setattr(medasr.model, "base_model", no_loading)
    p = tiny_params(**{"eval.train_sample": train_sample, "eval.test_sets": []})
    with pytest.raises(StageError, match=error):
        eval_stage.run(
            p.eval,
            p.model,
            p.lora,
            p.train.seed,
            _manifests(tmp_path, train_manifest),
            tmp_path / "testsets",
            tmp_path / "no-model",
            tmp_path / "eval.json",
            tmp_path / "predictions.jsonl",
        )
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "predictions.jsonl").exists()


def test_an_empty_term_category_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    import medasr.export
    from medasr import terms

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    shipped = terms.resources.files("medasr.resources").joinpath("terms")
    for category in terms.CATEGORIES:
        (tmp_path / "terms" / f"{category}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "terms" / f"{category}.txt").write_text(shipped.joinpath(f"{category}.txt").read_text())
    (tmp_path / "terms" / "anatomy.txt").write_text("# every word deleted\n")
    monkeypatch.setattr(terms.resources, "files", lambda package: tmp_path)
    monkeypatch.setattr(medasr.export, "load_model", no_loading)
    terms.term_categories.cache_clear()
    try:
        p = tiny_params(**{"eval.test_sets": []})
        with pytest.raises(StageError, match=r"medasr/resources/terms/anatomy\.txt lists no words"):
            eval_stage.run(p.eval, p.model, p.lora, p.train.seed, tmp_path / "none", model_dir=tmp_path / "none")
    finally:
        terms.term_categories.cache_clear()


def safetensors_dtypes(path: Path) -> set[str]:
    """The dtypes a safetensors file stores, from its JSON header."""
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


@pytest.mark.e2e
@pytest.mark.skipif(accelerator() == "cpu" and not cpu_bf16_supported(), reason="torch has no bf16 support on this CPU")
def test_bf16_experiment_trains_and_evaluates_in_bf16_with_fp32_audio(tmp_path, demo_run):
    # the session's `make demo` (conftest.py), copied: its data stages stay cached, train and eval re-run in bf16
    clone = Path(shutil.copytree(demo_run.clone, tmp_path / "bf16", symlinks=True))
    run(clone, "git", "add", "-A")
    run(clone, "git", "commit", "-qm", "demo baseline")
    overrides = {
        "train.precision": "bf16",
        "train.max_steps": 4,
        "train.checkpoint_every": 2,
        "train.val_every": 2,  # validation decodes in bf16 during training too
        "eval.max_new_tokens": 8,
        "eval.train_sample": 5,
    }
    settings = [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]
    exp = run(clone, "dvc", "exp", "run", *settings, env=demo_run.env)
    assert set(re.findall(r"Running stage '(\w+)'", exp.stdout)) == {"train", "eval"}, exp.stdout
    output = exp.stdout + exp.stderr

    # training: Lightning's bf16-true, so the exported weights are bf16 (int64 only for counters such as batch
    # norm's); its audio stayed fp32: NeMo's preprocessor warns once per process when it gets anything else
    trained = json.loads((clone / "metrics" / "train.json").read_text())
    assert trained["precision"] == "bf16" and trained["global_step"] == 4
    model_dir = clone / "models" / "canary-qwen-medical-lora"
    assert json.loads((model_dir / "medasr.json").read_text())["precision"] == "bf16"
    for weights in ("trained.safetensors", "model.safetensors"):
        assert safetensors_dtypes(model_dir / weights) - {"I64"} == {"BF16"}, weights
    # NeMo's warnings go to the stages' log files now, not the console: the warning must be absent from both
    logs = "".join(f.read_text() for f in sorted((clone / "logs").glob("*.log")))
    assert "WARNING nemo_logger:" in logs
    assert "AudioPreprocessor received an input signal" not in output + logs

    # eval: both models placed in the recorded precision; the dtypes are what its hooks saw during decoding
    evaluated = json.loads((clone / "metrics" / "eval.json").read_text())
    observed = {
        "device": "cuda:0" if accelerator() == "cuda" else "cpu",
        "parameters": "bfloat16",
        "preprocessor_input": "float32",
        "encoder_input": "bfloat16",
    }
    meta = json.loads((model_dir / "medasr.json").read_text())  # the exported step: the best validation's
    scored = {"fingerprint": meta["fingerprint"], "step": meta["step"]}
    assert evaluated["runtime"] == {"precision": "bf16", "model": scored, "finetuned": observed, "base": observed}

    # the training sample: the same block as val's, on the clips pick_sample names, tagged in the predictions
    sample = evaluated["train_sample"]
    assert (
        sample.keys() == evaluated["val"].keys() and sample["finetuned"].keys() == evaluated["val"]["finetuned"].keys()
    )
    assert sample["finetuned"]["utterances"] == sample["base"]["utterances"] == 5
    predictions = [json.loads(line) for line in (clone / "metrics" / "predictions.jsonl").read_text().splitlines()]
    train_rows = [json.loads(line) for line in (clone / "data" / "manifests" / "train.json").read_text().splitlines()]
    expected = sorted(r["id"] for r in eval_stage.pick_sample(train_rows, 5))
    for name in ("finetuned", "base"):
        assert sorted(r["id"] for r in predictions if r["set"] == "train_sample" and r["model"] == name) == expected
