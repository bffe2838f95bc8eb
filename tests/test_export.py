"""`medasr export`: the model card's Hugging Face metadata, `--push-to-hub` against a fake of the hub's HTTP API on
127.0.0.1 (tests/fake_hub.py), and a console free of the libraries' chatter (medasr/log.py).

The card and the refusals are fast; the upload as it runs (a `medasr export` process, which imports NeMo) is e2e."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub
from helpers import REPO, VENV_BIN, free_port, run_env, tiny_params
from typer.testing import CliRunner

from medasr.export import model_card
from stages.cli import app

SECRET = "hf_planted-secret-token-5c1d"
RESULTS = {
    "val": {"finetuned": {"wer": 0.5}, "base": {"wer": 0.6}},  # val is no test set: never in the model-index
    "test": {
        "primock57": {
            "finetuned": {"wer": 0.1234, "wer_ci": [0.11, 0.14], "utterances": 110},
            "base": {"wer": 0.1561, "wer_ci": [0.14, 0.17], "utterances": 110},
            "wer_reduction": 0.0327,
            "wer_reduction_ci": [0.012, 0.051],
            "kind": "medical",
            "dataset": "data/sources/primock57",  # a local source: hub-only keys null
            **{"config": None, "split": None, "revision": None, "hub": False},
        },
        "librispeech_clean": {
            "finetuned": {"wer": 0.021, "wer_ci": [0.015, 0.027], "utterances": 300},
            "base": {"wer": 0.016, "wer_ci": [0.011, 0.021], "utterances": 300},
            "wer_reduction": -0.005,
            "wer_reduction_ci": [-0.009, -0.001],
            "kind": "general",
            **{
                "dataset": "openslr/librispeech_asr",
                "config": "clean",
                "split": "test",
                "revision": "main",
                "hub": True,
            },
        },
    },
}
META = {"preset": "canary-qwen-2.5b", "base": {"id": "nvidia/canary-qwen-2.5b", "revision": "a" * 40}, "step": 800}


def test_card_metadata_is_what_the_hub_parses_back():
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    text = model_card(META, RESULTS)
    data = ModelCard(text).data  # huggingface_hub's own parser, offline
    assert (data.language, data.license, data.base_model) == ("en", "cc-by-4.0", "nvidia/canary-qwen-2.5b")
    assert data.pipeline_tag == "automatic-speech-recognition" and "medical" in data.tags
    wers = {r.dataset_name: (r.task_type, r.metric_type, r.metric_value) for r in data.eval_results}
    assert wers == {
        "primock57": ("automatic-speech-recognition", "wer", 12.34),
        "librispeech_clean": ("automatic-speech-recognition", "wer", 2.1),
    }
    # the dataset as the hub knows it: its id, config, split and revision; a local source by the set's name
    datasets = {r.dataset_name: (r.dataset_type, r.dataset_config, r.dataset_split, r.dataset_revision)
                for r in data.eval_results}  # fmt: skip
    assert datasets == {
        "primock57": ("primock57", None, None, None),
        "librispeech_clean": ("openslr/librispeech_asr", "clean", "test", "main"),
    }
    index = data.to_dict()["model-index"]
    name, results = model_index_to_eval_results(index)
    assert name == "canary-qwen-medical-lora" and eval_results_to_model_index(name, results) == index  # round trip
    # the body's table, with the intervals, base vs fine-tuned
    assert "| primock57 | medical | 110 | 15.61 [14.00, 17.00] | 12.34 [11.00, 14.00] | 3.27 [1.20, 5.10] |" in text
    assert "| librispeech_clean | general | 300 |" in text and "| val |" not in text

    # no results (a folder eval never scored) and a base that is no hub model: no model-index, no base_model
    bare = ModelCard(model_card({"preset": "tiny", "base": {"id": "tiny"}})).data
    assert bare.eval_results is None and bare.base_model is None and bare.license == "cc-by-4.0"


def _export(monkeypatch, tmp: Path, *args: str, env: dict[str, str | None]):
    """`medasr export` in-process, in `tmp` (no .env of the developer's), with `env` set (None: unset)."""
    monkeypatch.chdir(tmp)
    for name, value in env.items():
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    return CliRunner().invoke(app, ["export", *args])


def test_push_without_a_token_or_with_a_bad_repo_id_is_refused_before_any_work(tmp_path, monkeypatch):
    for repo, token, message in (
        ("org/medasr", None, "error: --push-to-hub needs HF_TOKEN (a token with write access) in the environment"),
        ("org/bad name", SECRET, "error: --push-to-hub 'org/bad name' is not a Hugging Face repo id"),
    ):
        args = ("--model", "nowhere", "--out", "out", "--push-to-hub", repo)
        result = _export(monkeypatch, tmp_path, *args, env={"HF_TOKEN": token})
        assert result.exit_code == 1, result.output
        assert result.output.startswith(message) and len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "out").exists() and SECRET not in result.output  # refused before the export


def test_upload_sends_the_token_only_to_the_hub_and_a_failure_is_one_line(tmp_path, monkeypatch):
    """push_to_hub itself (as the CLI calls it after the export): a wrong token, a 502 and no hub at all."""
    from huggingface_hub import constants

    from medasr import StageError
    from medasr.export import push_to_hub

    folder = tmp_path / "exported"
    (folder / "llm_backbone").mkdir(parents=True)
    (folder / "README.md").write_text(model_card(META, RESULTS))
    (folder / "llm_backbone" / "config.json").write_text('{"hidden_size": 64}\n')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    hub = FakeHub(SECRET)
    try:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        url = push_to_hub(folder, "org/medasr", SECRET)
        assert url.startswith(f"{hub.endpoint}/org/medasr/commit/")
        sent = {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}
        assert hub.repos["org/medasr"] == sent
        assert hub.private["org/medasr"]  # created private

        for failure, expected in ((None, "401 Unauthorized"), (502, "502 Bad Gateway")):
            hub.fail_with = failure
            with pytest.raises(StageError) as refused:
                push_to_hub(folder, "org/medasr", SECRET if failure else "hf_wrong")
            message = str(refused.value)
            assert expected in message and f"{folder} kept" in message and "\n" not in message
            assert SECRET not in message
    finally:
        hub.stop()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(StageError, match="ConnectError"):
        push_to_hub(folder, "org/medasr", SECRET)
    assert sorted(p.name for p in folder.rglob("*")) == [
        "README.md",
        "config.json",
        "llm_backbone",
        "model.safetensors",
    ]


LOGGING_PROBE = """
import logging, sys, warnings
from pathlib import Path
from medasr import log
log.setup(verbose=sys.argv[1] == "-v", log_file=Path(sys.argv[2]))
# a library that prints through a console handler of its own, attached after setup, not propagating (NeMo's way)
lib = logging.getLogger("chatty_lib")
lib.addHandler(logging.StreamHandler(sys.stdout))
lib.propagate = False
lib.info("LIB-INFO config dump")
logging.getLogger("other.lib").warning("LIB-WARNING telemetry notice")
logging.getLogger("other.lib").error("LIB-ERROR it broke")
warnings.warn("PY-WARNING deprecated")
log.get_logger("medasr.stage").info("OUR-INFO wrote 3 rows")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_libraries_chatter_goes_to_the_log_file_unless_verbose(tmp_path, verbose):
    log_file = tmp_path / "logs" / "probe.log"
    argv = [sys.executable, "-c", LOGGING_PROBE, "-v" if verbose else "-", str(log_file)]
    out = subprocess.run(argv, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    chatter = ("LIB-INFO", "LIB-WARNING", "PY-WARNING")
    assert "OUR-INFO" in out.stderr and "LIB-ERROR" in out.stderr and out.stdout == ""
    assert all((c in out.stderr) == verbose for c in chatter), out.stderr
    logged = log_file.read_text()
    assert all(c in logged for c in (*chatter, "LIB-ERROR", "OUR-INFO")), logged


@pytest.mark.e2e
def test_export_pushes_to_the_hub_with_a_quiet_console(tmp_path, monkeypatch):
    """`medasr export --push-to-hub` as a user runs it: the merged folder with its card arrives on the hub byte for
    byte; the console shows medasr's lines only (NeMo's, transformers' and the telemetry notices are in
    logs/export.log); the token appears nowhere. Then, with the hub answering 502, one line and the folder kept."""
    import torch
    from huggingface_hub import ModelCard

    from medasr.export import export
    from medasr.model import base_model
    from medasr.paths import EVAL_METRICS, MODEL_DIR

    p = tiny_params()
    model = base_model(p.model, p.lora, p.train.seed)
    with torch.no_grad():  # a trained adapter (an all-zero lora_B is refused as untrained)
        for name, prm in model.named_parameters():
            if ".lora_B." in name:
                prm.normal_(0, 0.02)
    meta = {"preset": "tiny", "base": {"id": "tiny", "revision": None}, "lora": p.lora.model_dump()}
    meta |= {"trainable": list(p.model.trainable), "precision": "32", "step": 8, "fingerprint": "f" * 16}
    export(model, tmp_path / MODEL_DIR, meta, self_contained=True)
    (tmp_path / EVAL_METRICS).parent.mkdir(parents=True)
    (tmp_path / EVAL_METRICS).write_text(
        json.dumps(RESULTS | {"runtime": {"model": {"fingerprint": "f" * 16, "step": 8}}})
    )

    hub = FakeHub(SECRET)
    try:
        env = run_env() | {"HF_TOKEN": SECRET, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf")}
        env.pop("HF_HUB_OFFLINE", None)
        argv = [str(VENV_BIN / "medasr"), "export", "--out", "exported", "--push-to-hub", "org/medasr"]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        exported = tmp_path / "exported"
        files = {str(f.relative_to(exported)): f.read_bytes() for f in exported.rglob("*") if f.is_file()}
        assert hub.repos["org/medasr"] == files and "model.safetensors" in files
        card = ModelCard(files["README.md"].decode()).data
        assert {r.dataset_name: r.metric_value for r in card.eval_results} == {
            "primock57": 12.34,
            "librispeech_clean": 2.1,
        }
        url = f"{hub.endpoint}/org/medasr/commit/"
        assert done.stdout.startswith(f"wrote exported\nuploaded to org/medasr: {url}"), done.stdout
        assert len(done.stdout.splitlines()) == 2

        logged = (tmp_path / "logs" / "export.log").read_text()
        assert "nemo_logger: LoRA adapter installed" in logged  # NeMo's INFO went to stdout before
        for chatter in ("LoRA adapter installed", "OneLogger:", "No exporters were provided", "torch_dtype"):
            assert chatter in logged and chatter not in done.stderr + done.stdout, chatter
        assert "NeMo" not in done.stderr and "uploading exported" in done.stderr, done.stderr
        assert SECRET not in done.stdout + done.stderr + logged

        # the hub fails after the export: one line, exit 1, the folder written and kept
        hub.fail_with = 502
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        failed = _export(
            monkeypatch, tmp_path, "--out", "again", "--push-to-hub", "org/medasr", env={"HF_TOKEN": SECRET}
        )
        assert failed.exit_code == 1 and (tmp_path / "again" / "README.md").is_file()
        errors = [line for line in failed.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "502 Bad Gateway" in errors[0] and "again kept" in errors[0], failed.output
        assert SECRET not in failed.output
    finally:
        hub.stop()
