"""Shared test helpers: synthetic audio, raw-row builders, and a scratch clone of the repo for DVC runs."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import yaml

from medasr.params import Params, parse_params, with_overrides
from medasr.secrets import SECRETS

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "sources" / "demo"
VENV_BIN = Path(sys.executable).parent
SESSION_WORKDIR = tempfile.mkdtemp(prefix="medasr-tests-workdir-")


BUCKET = "medasr-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on loopback. In-memory: a restart loses every object (and the bucket, re-created here)."""

    def __init__(self, port: int, bucket: str = BUCKET) -> None:
        self.port, self.proc, self.bucket = port, None, bucket
        self.endpoint = f"http://127.0.0.1:{port}"

    def start(self, auth: bool = False) -> dict[str, str] | None:
        """Start serving. With auth, every request after setup must be signed by the IAM user created here (moto's
        auth mode); returns that user's credentials."""
        moto = Path(sys.executable).parent / "moto_server"
        env = dict(os.environ) | ({"INITIAL_NO_AUTH_ACTION_COUNT": "4"} if auth else {})
        self.proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                assert time.time() < deadline, "moto server did not start"
                time.sleep(0.1)
        self.client().create_bucket(Bucket=self.bucket)  # action 1 of the 4 moto lets through unsigned in auth mode
        if not auth:
            return None
        iam = self.client("iam")
        iam.create_user(UserName="pod")
        iam.put_user_policy(
            UserName="pod",
            PolicyName="all-s3",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            ),
        )
        key = iam.create_access_key(UserName="pod")["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self, service: str = "s3"):
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            **{k.lower(): v for k, v in CREDENTIALS.items() if k != "AWS_DEFAULT_REGION"},
            region_name="us-east-1",
        )

    def keys(self) -> list[str]:
        try:
            return [o["Key"] for o in self.client().list_objects_v2(Bucket=self.bucket).get("Contents", [])]
        except Exception:
            return []

    def complete_steps(self) -> list[int]:
        # only a checkpoint's top-level meta.json marks it complete (best/meta.json inside it is data)
        return sorted(int(m.group(1)) for k in self.keys() if (m := re.search(r"/step-(\d{8})/meta\.json$", k)))


class S3Bucket(S3Server):
    """One test's own bucket on a server shared by the session: the same view of it as S3Server gives (keys,
    complete_steps, client), but it can be neither stopped nor restarted (a test that needs an outage starts its own
    S3Server)."""

    def __init__(self, server: S3Server, bucket: str) -> None:
        super().__init__(server.port, bucket)
        self.client().create_bucket(Bucket=bucket)

    def start(self, auth: bool = False) -> None:
        raise AssertionError("a shared S3 server is never restarted: start an S3Server of the test's own")

    def stop(self) -> None:
        pass  # the session's server outlives the test


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 server (`upstream`, e.g. S3Server.endpoint) that fails requests
    on purpose, the way a flaky network or an overloaded store does: each request whose method is in `methods` (and
    whose path contains `match`) gets a 503 "ServiceUnavailable" answer (or, with close=True, its connection closed
    without any answer) while `failing` is set, or while it is among the first `fail_first` such requests. Everything
    else is passed through unchanged. `seen` counts such requests, `failed` those it failed. botocore and s3fs retry
    such failures internally, so a fault that must reach our code outlasts their retries (a window, or a count)."""

    def __init__(
        self, upstream: str, fail_first: int = 0, methods: frozenset[str] = frozenset({"GET", "HEAD"}), close=False
    ) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.upstream, self.fail_first, self.methods, self.close = urlsplit(upstream), fail_first, methods, close
        self.failing, self.failed, self.seen, self.match = False, 0, 0, ""
        lock, proxy = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                import http.client

                body = self._body()
                with lock:
                    chosen = self.command in proxy.methods and proxy.match in self.path
                    fail = chosen and (proxy.failing or proxy.seen < proxy.fail_first)
                    proxy.seen += chosen
                    proxy.failed += fail
                if fail and proxy.close:
                    self.close_connection = True  # no answer at all: the client sees the connection drop
                    return
                if fail:
                    error = b"<Error><Code>ServiceUnavailable</Code><Message>injected fault</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(key, value)
                length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="faulty-proxy", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, what: str = "the condition") -> None:
    """Poll `predicate` while `proc` (with piped stdout) runs; fail with its output if it exits first."""
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"{proc.args} exited before {what}: {proc.stdout.read()[-4000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def tone(seconds: float, rate: int = 16_000, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    mono = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def audio_bytes(samples: np.ndarray, rate: int = 16_000, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype="PCM_16" if fmt in ("WAV", "FLAC") else None)
    return buf.getvalue()


def wav(seconds: float = 1.0, rate: int = 16_000, channels: int = 1, freq: float = 440.0) -> bytes:
    return audio_bytes(tone(seconds, rate, channels, freq), rate)


def write_audio_parquet(path: Path, rows: list[dict[str, Any]], audio_feature: bool = False) -> Path:
    """A parquet file of audio rows as found in the wild: `audio` is a {bytes, path} struct, optionally carrying the
    `datasets` Audio feature in its schema metadata (as hub exports do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if audio_feature:
        import datasets

        ds = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio(decode=False))
        ds.to_parquet(str(path))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def raw_row(i: int, audio: bytes | None, text: str | None, **extra: Any) -> dict[str, Any]:
    """A row of data/raw in the fetch stage's schema."""
    row = {"row": i, "source_id": None, "group": None, "audio": audio, "source_path": f"clip{i}.wav", "text": text}
    return row | extra


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


# Experiment state DVC writes into the workspace: `make demo` (`dvc exp run -S ...`) edits params.yaml and writes
# dvc.lock. Tests take both as committed, so running the demo before the tests changes nothing they see.
EXPERIMENT_STATE = ("params.yaml", "dvc.lock")


def committed(name: str) -> str | None:
    """A file's text as committed at HEAD (None when HEAD has no such file)."""
    out = subprocess.run(["git", "show", f"HEAD:{name}"], cwd=REPO, capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def committed_params_text() -> str:
    text = committed("params.yaml")
    assert text is not None, "params.yaml is not committed"
    return text


def scratch_clone(dest: Path) -> Path:
    """Copy what a fresh clone would hold (tracked and untracked-but-not-ignored files) into a new git repo, so the
    tests exercise the working tree as it is, uncommitted changes included, except the experiment state (above),
    which is taken as committed."""
    files = git(REPO, "ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and name not in EXPERIMENT_STATE:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for name in EXPERIMENT_STATE:
        if (text := committed(name)) is not None:
            (dest / name).write_text(text)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "config", "user.email", "tests@medasr.invalid")
    git(dest, "config", "user.name", "medasr tests")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "scratch clone")
    return dest


# What a developer's shell may hold that would point a test's `medasr remote setup`, training mirror or pod at real
# infrastructure (their S3 bucket, W&B or RunPod account).
DEVELOPER_SETTINGS = (
    *SECRETS,
    "MEDASR_S3_URL",
    "MEDASR_S3_ENDPOINT_URL",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def run_env() -> dict[str, str]:
    """Environment for CLI/DVC subprocesses: the venv first on PATH (DVC runs `medasr` through the shell)."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["WANDB_MODE"] = "offline"
    # where `medasr remote setup` puts a local-directory remote: never the developer's home, and new for each test
    # session, so no test resumes a checkpoint another run mirrored there
    # (set, not defaulted: a MEDASR_WORKDIR from the caller's shell would share its mirrored checkpoints)
    env["MEDASR_WORKDIR"] = SESSION_WORKDIR
    # never the developer's own remote, credentials or accounts: a test that needs S3 or a key passes its own
    for name in DEVELOPER_SETTINGS:
        env.pop(name, None)
    return env


def run(
    cwd: Path, *cmd: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command with run_env() (plus `env`); fails with its output unless it exits 0 (or check=False)."""
    proc = subprocess.run(cmd, cwd=cwd, env=run_env() | (env or {}), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_params(repo: Path, **overrides: Any) -> None:
    """Edit params.yaml in a scratch repo: set_params(repo, **{"fetch.dataset": "x"})."""
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(with_overrides(yaml.safe_load(path.read_text()), overrides), sort_keys=False))


def tiny_params(**overrides: Any) -> Params:
    """The committed params with the tiny preset and a short, fast training run; override with "train.lr"=..."""
    short = {"model.preset": "tiny", "train.max_steps": 12, "train.checkpoint_every": 4, "train.batch_size": 4}
    short |= {"train.lr": 3e-3, "train.warmup_steps": 2, "train.val_every": 0, "train.val_max_utts": 6}
    return parse_params(with_overrides(yaml.safe_load(committed_params_text()), short | overrides))


def hf_cache_repo(hub_cache: Path, repo: str, commit: str, files: dict[str, bytes], skipped: tuple[str, ...] = ()):
    """A model repo as huggingface_hub's `snapshot_download(repo, allow_patterns=...)` leaves it in its cache
    (HF_HUB_CACHE, $HF_HOME/hub; see huggingface_hub's file_download.py and _tree_cache.py): each file's content in
    `blobs/` named by its sha256 (LFS files: *.safetensors) or its git blob sha1, `snapshots/<commit>/<path>` as a
    relative symlink into blobs/, `refs/main` naming the commit, and `trees/<commit>.json`, the repo's file listing,
    which also names the files the download's patterns left out (`skipped`). Returns the snapshot folder."""
    import hashlib

    repo_dir = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    listing: dict[str, dict[str, Any]] = {}
    for name, data in files.items():
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        entry: dict[str, Any] = {"size": len(data), "blob_id": git_sha1}
        if name.endswith(".safetensors"):
            entry |= {"lfs_sha256": hashlib.sha256(data).hexdigest(), "lfs_size": len(data)}
        blob = repo_dir / "blobs" / entry.get("lfs_sha256", git_sha1)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        listing[name] = entry
    for name in skipped:
        listing[name] = {"size": 1, "blob_id": hashlib.sha1(name.encode()).hexdigest()}
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "trees").mkdir(exist_ok=True)
    (repo_dir / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}, indent=1))
    return snapshot


def train_in(tmp: Path, manifests: Path, p: Params) -> dict[str, Any]:
    """The train stage in-process, writing everything under `tmp` and never into the developer's DVC remote."""
    from stages.train.run import run as train

    return train(
        p.model,
        p.lora,
        p.train,
        manifest_dir=manifests,
        ckpt_root=tmp / "ckpt",
        model_dir=tmp / "model",
        metrics_file=tmp / "train.json",
        curves_dir=tmp / "curves",
        mirror_checkpoints=False,  # never into whatever remote the developer's checkout has
    )


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two Lightning checkpoints hold exactly the same trained tensors and AdamW state."""
    import torch

    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for index in opt_a:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[index][key], opt_b[index][key]), (index, key)


SOURCE_KINDS = ("audiofolder", "nemo_manifest", "parquet", "segment_list", "textgrid")
GOOD_TEXT = "a brand new sentence"


def traversal_dataset(kind: str, tmp: Path, secret: str) -> Path:
    """A local dataset of `kind` in `tmp/corpus`: one good row (GOOD_TEXT, a 2 s tone) and three whose audio leads
    out of the folder: `/proc/self/environ` (the reading process's environment), `../secret.wav` (a WAV with
    `secret` appended, beside the folder) and `link.wav`, a symlink to it. A TextGrid folder names no paths, so
    there the three are links: audio to /proc/self/environ, audio to secret.wav, and a transcript outside holding
    `secret`. Returns what fetch.dataset names."""
    corpus = tmp / "corpus"
    corpus.mkdir(parents=True)
    (tmp / "secret.wav").write_bytes(wav(2.0, freq=330.0) + secret.encode())
    (corpus / "good.wav").write_bytes(wav(2.0, freq=550.0))
    (corpus / "link.wav").symlink_to(tmp / "secret.wav")
    rows = [("good.wav", GOOD_TEXT), ("/proc/self/environ", "a"), ("../secret.wav", "b"), ("link.wav", "c")]
    if kind == "audiofolder":
        (corpus / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in rows))
        return corpus
    if kind == "nemo_manifest":
        lines = [json.dumps({"audio_filepath": n, "text": t}) + "\n" for n, t in rows]
        (corpus / "manifest.json").write_text("".join(lines))
        return corpus / "manifest.json"
    if kind == "parquet":
        audio = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        schema = pa.schema([("audio", audio), ("text", pa.string())])
        table = pa.Table.from_pylist([{"audio": {"bytes": None, "path": n}, "text": t} for n, t in rows], schema=schema)
        pq.write_table(table, corpus / "rows.parquet")
        return corpus
    if kind == "segment_list":
        (corpus / "medical_train.info").write_text("".join(f"{n}[0.0,1.5]\t{t}\n" for n, t in rows))
        return corpus
    assert kind == "textgrid", kind
    from praatio import textgrid

    def grid(path: Path, text: str) -> None:
        tg = textgrid.Textgrid()
        tg.addTier(textgrid.IntervalTier("Speaker", [(0.25, 1.75, text)], 0, 2.0))
        tg.save(str(path), format="long_textgrid", includeBlankSpaces=True)

    (corpus / "environ.wav").symlink_to("/proc/self/environ")
    for name, text in (("good", GOOD_TEXT), ("environ", "a"), ("link", "b")):
        grid(corpus / f"{name}.TextGrid", text)
    grid(tmp / "outside.TextGrid", secret)
    (corpus / "away.TextGrid").symlink_to(tmp / "outside.TextGrid")
    return corpus


def files_holding(root: Path, secret: str) -> list[Path]:
    """Every file under `root` whose bytes contain `secret` (links not followed)."""
    return [f for f in root.rglob("*") if f.is_file() and not f.is_symlink() and secret.encode() in f.read_bytes()]
