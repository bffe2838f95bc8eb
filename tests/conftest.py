"""Fixtures shared by the tests; plain helpers live in helpers.py."""

from __future__ import annotations

import itertools
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    CREDENTIALS,
    DEMO_DATA,
    VENV_BIN,
    S3Bucket,
    S3Server,
    committed_params_text,
    free_port,
    run,
    scratch_clone,
)


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


@pytest.fixture(scope="session")
def s3_server():
    """One real S3-compatible server (moto) on 127.0.0.1 for the session; tests use it through `s3`."""
    server = S3Server(free_port())
    server.start()
    yield server
    server.stop()


_buckets = itertools.count(1)


@pytest.fixture
def s3(s3_server) -> S3Bucket:
    """An empty bucket of the test's own (`s3.bucket`) on the session's S3 server: no test sees another's objects,
    whatever the order. A test that stops or restarts the server uses `own_s3` instead."""
    return S3Bucket(s3_server, f"medasr-test-{next(_buckets)}")


@pytest.fixture
def own_s3():
    """A real S3-compatible server (moto) of the test's own, with an empty bucket, stopped after the test."""
    server = S3Server(free_port())
    server.start()
    yield server
    server.stop()


@dataclass(frozen=True)
class DemoRun:
    clone: Path  # a scratch clone after `make demo`: tests read it, and copy it before changing anything
    demo: subprocess.CompletedProcess[str]  # what `make demo` printed
    env: dict[str, str]  # the S3 settings it ran with (its DVC remote is a bucket on the session's S3 server)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, s3_server) -> DemoRun:
    """`make demo` once per session, in a scratch clone whose DVC remote is a bucket of its own on the session's S3
    server (never the developer's remote): the whole pipeline, run the way a user runs it."""
    bucket = S3Bucket(s3_server, "medasr-demo-run")
    env = CREDENTIALS | {"MEDASR_S3_URL": f"s3://{bucket.bucket}/pipeline", "MEDASR_S3_ENDPOINT_URL": bucket.endpoint}
    clone = scratch_clone(tmp_path_factory.mktemp("demo-run"))
    # `make demo` starts with `medasr remote setup` (the bucket, from MEDASR_S3_URL); `-o install`: reuse the test
    # venv instead of creating one in the clone
    # --no-print-directory: under CI's `make test` this make is a sub-make, which would print its directory changes
    demo = run(clone, "make", "--no-print-directory", "-o", "install", "demo", f"VENV={VENV_BIN.parent}", env=env)
    return DemoRun(clone, demo, env)
