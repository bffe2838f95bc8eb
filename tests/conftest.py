"""Fixtures shared by the tests; plain helpers live in helpers.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import DEMO_DATA, S3Server, committed_params_text, free_port


@pytest.fixture
def committed_params() -> dict[str, Any]:
    return yaml.safe_load(committed_params_text())


@pytest.fixture(scope="session")
def demo_manifests(tmp_path_factory) -> Path:
    """The bundled demo audio through fetch -> subset -> manifest, once per test session."""
    from medasr.params import FetchParams, ManifestParams, SubsetParams
    from stages import fetch, manifest, subset

    root = tmp_path_factory.mktemp("demo")
    fetch.run(
        FetchParams(
            dataset=str(DEMO_DATA), split="train", audio_column="audio", text_column="text", id_column="utterance_id"
        ),
        out_dir=root / "raw",
    )
    subset.run(
        SubsetParams(seed=1234, train_size=40, val_size=12, min_duration=0.5, max_duration=30.0),
        raw_dir=root / "raw",
        out_dir=root / "subset",
        metrics_file=root / "data.json",
    )
    style = ManifestParams(text_normalization="unicode", annotation_tags="strip", all_caps="sentence_case")
    manifest.run(style, root / "raw", root / "subset", root / "manifests")
    return root / "manifests"


@pytest.fixture
def s3():
    """A real S3-compatible server (moto) on 127.0.0.1, with an empty bucket, stopped after the test."""
    server = S3Server(free_port())
    server.start()
    yield server
    server.stop()
