"""The pod's start command, run for real (`bash -c '<START_SCRIPT>'` exactly as the pod request carries it) against
local git repos: a bare origin with commits A and B whose runpod.sh prints the commit it runs at and exits. Each case
leaves the volume's checkout at the launched ref before runpod.sh starts, or ends in one line, a stopped pod and a
sleep (never an exit into RunPod's container-restart loop). The git token is served by a local smart-HTTP server that
demands it, and is looked for in every process's arguments while the clone and the fetch run."""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fake_runpod import FakeRunPod
from helpers import git

from medasr.ops.pod_start import START_SCRIPT, split_repo_url
from medasr.ops.runpod import API_URL, PodSpec, RunPodAPI, create_payload, redacted
from medasr.secrets import redact_url

TOKEN = "planted-git-token-5f3a"
SLEEP = b"sleep\0infinity\0"  # /proc/<pid>/cmdline of the script once it has exec'd into its final sleep
RUNPOD_SH = 'echo "ran $(git rev-parse HEAD) url=$MEDASR_REPO_URL token=${MEDASR_GIT_TOKEN:+set}"\n'


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> dict[str, str]:
    """A bare repo with commits A and B (dvc.lock differs; B adds b.txt); returns its path and both shas."""
    root = tmp_path_factory.mktemp("origin")
    work = root / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    git(work, "config", "user.email", "t@medasr.invalid")
    git(work, "config", "user.name", "t")
    (work / "runpod.sh").write_text(RUNPOD_SH)
    (work / ".gitignore").write_text("data/\n")
    (work / "dvc.lock").write_text("lock at A\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "A")
    a = git(work, "rev-parse", "HEAD").strip()
    (work / "dvc.lock").write_text("lock at B\n")
    (work / "b.txt").write_text("b\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "B")
    b = git(work, "rev-parse", "HEAD").strip()
    git(root, "clone", "-q", "--bare", str(work), "origin.git")
    return {"path": str(root / "origin.git"), "url": f"file://{root / 'origin.git'}", "A": a, "B": b}


def start_command() -> list[str]:
    """The container's start command as the pod request sends it."""
    spec = PodSpec(name="t", repo_url="https://example.invalid/r.git", git_ref="0" * 40, run_id="r")
    return shlex.split(create_payload(spec, "NVIDIA A100-SXM4-40GB", {})["args"])


@pytest.fixture
def pod(tmp_path, origin):
    """Runs the start script on a volume (tmp_path/ws, inside an unrelated git repo so that a broken checkout could
    be mistaken for it) with a fake `runpodctl` that records its calls, a HOME whose git config would `store`
    credentials, and no retry pauses."""
    git(tmp_path, "init", "-q")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "runpodctl").write_text(
        f'#!/bin/sh\necho "$*" >> {tmp_path}/runpodctl.calls\n[ -z "${{RUNPODCTL_FAILS:-}}" ]\n'
    )
    # a git that kills the start script's whole process group when asked to check out, if KILL_AT_CHECKOUT is set,
    # and fails (as a network blip would) when its arguments hold FAIL_GIT
    (bin_dir / "git").write_text(
        f'#!/bin/sh\ncase " $* " in *" checkout "*) [ -n "${{KILL_AT_CHECKOUT:-}}" ] && kill -9 0;; esac\n'
        f'[ -n "${{FAIL_GIT:-}}" ] && case " $* " in *" $FAIL_GIT "*) exit 1;; esac\n'
        f'exec {shutil.which("git")} "$@"\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[credential]\n\thelper = store\n")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "MEDASR_WORKSPACE": str(tmp_path / "ws"),
        "MEDASR_REPO_URL": origin["url"],
        "MEDASR_START_RETRY_S": "0",
        "RUNPOD_POD_ID": "pod-test",
    }

    class Pod:
        ws = tmp_path / "ws"
        checkout = ws / "medasr"
        calls = tmp_path / "runpodctl.calls"

        def start(self, ref: str, timeout_s: float = 60, **extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                start_command(),
                env=env | {"MEDASR_GIT_REF": ref} | extra,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                start_new_session=True,  # KILL_AT_CHECKOUT kills its process group, not pytest's
            )

        def popen(self, ref: str, **extra: str) -> subprocess.Popen:
            return subprocess.Popen(
                start_command(),
                env=env | {"MEDASR_GIT_REF": ref} | extra,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )

        def head(self) -> str:
            return git(self.checkout, "rev-parse", "HEAD").strip()

    return Pod()


def ran_at(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[1]


def test_start_command_reaches_bash_intact():
    assert start_command() == ["bash", "-c", START_SCRIPT]
    assert "'" not in START_SCRIPT and "\n" not in START_SCRIPT


def test_checkout_at_another_ref_moves_to_the_launched_one(pod, origin):
    assert ran_at(pod.start(origin["A"])) == origin["A"]  # an empty volume: cloned, at A
    assert not (pod.ws / ".medasr.clone").exists()
    # what a run leaves on the volume: an edited tracked file, outputs, and an old script's token in the remote URL
    (pod.checkout / "dvc.lock").write_text("edited by a run\n")
    (pod.checkout / "data").mkdir()
    (pod.checkout / "data" / "raw.parquet").write_text("output")
    (pod.checkout / "notes.txt").write_text("untracked")
    git(pod.checkout, "remote", "set-url", "origin", f"https://x:{TOKEN}@example.invalid/r.git")

    result = pod.start(origin["B"])

    assert ran_at(result) == origin["B"] == pod.head()
    assert (pod.checkout / "dvc.lock").read_text() == "lock at B\n" and (pod.checkout / "b.txt").exists()
    assert (pod.checkout / "data" / "raw.parquet").read_text() == "output"
    assert (pod.checkout / "notes.txt").read_text() == "untracked"
    assert TOKEN not in (pod.checkout / ".git" / "config").read_text()
    assert ran_at(pod.start(origin["A"])) == origin["A"]  # and back: a ref older than the checkout


def test_checkout_follows_a_branch_name_to_its_current_tip(pod, origin):
    assert ran_at(pod.start(origin["A"])) == origin["A"]
    assert ran_at(pod.start("main")) == origin["B"]
    (pod.checkout / "dvc.lock").write_text("stages finished by the run\n")
    assert ran_at(pod.start("main")) == origin["B"]  # the tip is where the checkout is: the run's dvc.lock stays
    assert (pod.checkout / "dvc.lock").read_text() == "stages finished by the run\n"


def test_a_restart_at_the_launched_commit_needs_no_origin_and_keeps_the_runs_dvc_lock(pod, origin):
    assert ran_at(pod.start(origin["B"])) == origin["B"]
    (pod.checkout / "dvc.lock").write_text("stages finished by the run\n")
    assert ran_at(pod.start(origin["B"])) == origin["B"]
    assert (pod.checkout / "dvc.lock").read_text() == "stages finished by the run\n"

    result = pod.start(origin["B"], timeout_s=20, MEDASR_REPO_URL=f"file://{pod.ws}/missing.git")  # a GitHub blip

    assert ran_at(result) == origin["B"] == pod.head() and result.stderr == ""
    assert (pod.checkout / "dvc.lock").read_text() == "stages finished by the run\n"


def test_a_branch_launch_goes_on_with_the_checkout_when_origin_cannot_be_reached(pod, origin):
    assert ran_at(pod.start(origin["A"])) == origin["A"]
    missing = f"file://{pod.ws}/missing.git"
    result = pod.start("main", timeout_s=20, MEDASR_REPO_URL=missing)
    assert ran_at(result) == origin["A"]
    ours = [line for line in result.stderr.splitlines() if line.startswith("medasr start:")]
    assert ours == [f"medasr start: cannot fetch main from {missing}: going on with the checkout at {origin['A']}"]


@pytest.mark.parametrize("ref", ["main", "B"])
def test_a_ref_resolves_to_what_origin_has_never_a_stale_local_branch(pod, origin, ref):
    ref = origin.get(ref, ref)
    assert ran_at(pod.start(origin["A"])) == origin["A"]
    git(pod.checkout, "branch", "-f", "main", origin["A"])  # what a clone made while main was at A left behind
    # the fetch of the ref itself fails (a blip right after the fetch of every branch succeeded)
    assert ran_at(pod.start(ref, FAIL_GIT=f"fetch -q origin {ref}")) == origin["B"] == pod.head()


@pytest.mark.parametrize(
    "lock", ["refs/remotes/origin/main.lock", "index.lock", "HEAD.lock", "config.lock", "packed-refs.lock"]
)
def test_git_locks_left_by_a_killed_git_are_removed(pod, origin, lock):
    assert ran_at(pod.start(origin["A"])) == origin["A"]
    (pod.checkout / "data").mkdir()
    (pod.checkout / "data" / "keep").write_text("kept")
    git(pod.checkout, "update-ref", "refs/remotes/origin/main", origin["A"])  # origin moved on: the fetch updates it
    (pod.checkout / ".git" / lock).parent.mkdir(parents=True, exist_ok=True)
    (pod.checkout / ".git" / lock).write_text("")

    result = pod.start(origin["B"], timeout_s=20)

    assert ran_at(result) == origin["B"] == pod.head()
    assert not list(pod.ws.glob("medasr.aside.*")) and (pod.checkout / "data" / "keep").read_text() == "kept"
    assert not (pod.checkout / ".git" / lock).exists()


def _no_head(pod, origin) -> None:
    pod.start(origin["A"])
    (pod.checkout / ".git" / "HEAD").unlink()


def _no_objects(pod, origin) -> None:
    pod.start(origin["A"])
    shutil.rmtree(pod.checkout / ".git" / "objects")
    (pod.checkout / ".git" / "objects").mkdir()


def _plain_folder(pod, origin) -> None:
    pod.checkout.mkdir(parents=True)


@pytest.mark.parametrize("breakage", [_no_head, _no_objects, _plain_folder])
def test_an_unusable_checkout_is_moved_aside_never_deleted(pod, origin, breakage):
    breakage(pod, origin)
    (pod.checkout / "data").mkdir(exist_ok=True)
    (pod.checkout / "data" / "keep").write_text("kept")

    result = pod.start(origin["B"])

    assert ran_at(result) == origin["B"] == pod.head()
    aside = list(pod.ws.glob("medasr.aside.*"))
    assert len(aside) == 1 and (aside[0] / "data" / "keep").read_text() == "kept"
    assert f"moved {pod.checkout} aside" in result.stderr


def test_a_clone_killed_midway_leaves_no_checkout_and_the_next_start_clones_again(pod, origin):
    killed = pod.start(origin["B"], KILL_AT_CHECKOUT="1")  # killed after the clone, before its checkout
    assert killed.returncode == -signal.SIGKILL and "ran" not in killed.stdout
    assert (pod.ws / ".medasr.clone" / ".git").is_dir() and not pod.checkout.exists()

    assert ran_at(pod.start(origin["B"])) == origin["B"] == pod.head()


def test_a_checkout_without_its_work_tree_is_completed(pod, origin):
    # what the old in-place clone left when killed between clone and checkout: a HEAD, no index, no files
    pod.ws.mkdir()
    git(pod.ws, "clone", "-q", "--no-checkout", origin["url"], "medasr")
    assert ran_at(pod.start(origin["B"])) == origin["B"]
    assert git(pod.checkout, "status", "--porcelain") == ""


def sleeps_after_stopping(proc: subprocess.Popen, calls: Path, stops: int) -> str:
    """Waits until the start script has called `runpodctl stop pod` `stops` times and become `sleep infinity` (no exit
    into the container-restart loop), then kills it; returns its stderr."""
    cmdline = Path(f"/proc/{proc.pid}/cmdline")

    def sleeping() -> bool:
        return calls.exists() and len(calls.read_text().splitlines()) >= stops and cmdline.read_bytes() == SLEEP

    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and not sleeping() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        assert cmdline.read_bytes() == SLEEP and calls.read_text() == "stop pod pod-test\n" * stops
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[1]


def _fresh(pod, origin) -> str:
    return origin["url"]


def _at_a(pod, origin) -> str:
    pod.start(origin["A"])
    return origin["url"]


def _unreachable(pod, origin) -> str:
    return f"file://{pod.ws}/missing.git"


def _at_a_unreachable(pod, origin) -> str:
    pod.start(origin["A"])
    return _unreachable(pod, origin)


@pytest.mark.parametrize(
    ("volume", "ref", "line"),
    [
        (_fresh, "no-such-ref", "git ref no-such-ref does not exist in "),
        (_at_a, "no-such-ref", "git ref no-such-ref does not exist in "),
        (_unreachable, "main", "cannot clone file://"),
        (_at_a_unreachable, "B", "cannot fetch from file://"),
    ],
    ids=["unknown ref, empty volume", "unknown ref, checkout at A", "unreachable repo", "another commit, unreachable"],
)
def test_a_start_that_cannot_succeed_says_why_stops_the_pod_and_sleeps(pod, origin, volume, ref, line):
    url, ref = volume(pod, origin), origin.get(ref, ref)
    stderr = sleeps_after_stopping(pod.popen(ref, MEDASR_REPO_URL=url), pod.calls, stops=1).splitlines()
    ours = [text for text in stderr if text.startswith("medasr start:")]
    assert len(ours) == 1 and ours[0].startswith(f"medasr start: {line}"), stderr
    if volume not in (_unreachable, _at_a_unreachable):
        assert ours == stderr  # nothing else: one clear line
    if volume in (_at_a, _at_a_unreachable):
        assert pod.head() == origin["A"]  # a good checkout stays where it was


def test_a_failing_stop_is_retried_then_the_script_sleeps(pod, origin):
    stderr = sleeps_after_stopping(pod.popen("no-such-ref", RUNPODCTL_FAILS="1"), pod.calls, stops=3)
    assert stderr.splitlines()[-1].startswith("medasr start: cannot stop the pod (runpodctl, RunPod API): sleeping")


@pytest.mark.parametrize("runpodctl", ["fails", "missing"])
def test_a_pod_runpodctl_cannot_stop_is_stopped_through_the_api_the_key_never_in_argv(pod, tmp_path, runpodctl):
    # the same call as RunPodAPI.action(pod, "stop"): its base URL, path and body (the fake checks the body against
    # RunPod's schema and the bearer key)
    assert f"${{MEDASR_RUNPOD_API_URL:-{API_URL}}}" in START_SCRIPT
    key = "planted-runpod-key-9c1e"
    fake = FakeRunPod(key)
    snapshots: list[str] = []
    served = fake.handle

    def handle(*args):
        snapshots.append(ps())  # while curl waits for the answer
        return served(*args)

    fake.handle = handle  # type: ignore[method-assign]
    running = True

    def poll() -> None:
        while running:
            snapshots.append(ps())

    poller = threading.Thread(target=poll)
    try:
        spec = PodSpec(name="t", repo_url="https://example.invalid/r.git", git_ref="0" * 40, run_id="r")
        pod_id = RunPodAPI(key, fake.url).create(create_payload(spec, "NVIDIA A100-SXM4-40GB", {}))["id"]
        fake.fail("POST", r"/v2/pods/[^/]+/action", times=1)  # the first call is lost: retried
        if runpodctl == "missing":
            (tmp_path / "bin" / "runpodctl").unlink()
        env = {"RUNPOD_POD_ID": pod_id, "RUNPOD_API_KEY": key, "MEDASR_RUNPOD_API_URL": fake.url}
        poller.start()
        proc = pod.popen("no-such-ref", RUNPODCTL_FAILS="1", **env)
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        deadline = time.monotonic() + 30
        while proc.poll() is None and cmdline.read_bytes() != SLEEP and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and cmdline.read_bytes() == SLEEP, proc.communicate() if proc.poll() else ""
        os.killpg(proc.pid, signal.SIGKILL)
        stderr = proc.communicate()[1]
    finally:
        running = False
        if poller.is_alive():
            poller.join()
        fake.close()

    assert fake.pods[pod_id]["status"] == "EXITED", stderr
    assert fake.bodies("POST", rf"/v2/pods/{pod_id}/action") == [{"action": "stop"}] * 2 and not fake.schema_violations
    assert "bills" not in stderr
    assert any(line.startswith("curl ") for snap in snapshots for line in snap.splitlines())  # saw curl at work
    assert not [line for snap in snapshots for line in snap.splitlines() if key in line]


# --- the token ----------------------------------------------------------------------------------------------------
def ps() -> str:
    # -ww: whole command lines (ps may cut them to a terminal's width, and did under pytest)
    return subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout


class GitServer(ThreadingHTTPServer):
    """Smart HTTP (`git http-backend` as CGI) that answers 401 until the request carries x-access-token:TOKEN, and
    takes a `ps` snapshot while each authorised request is served (git's transport is alive then)."""

    def __init__(self, root: str) -> None:
        super().__init__(("127.0.0.1", 0), GitHandler)
        self.root, self.denied = root, 0
        self.snapshots: list[str] = []


class GitHandler(BaseHTTPRequestHandler):
    server: GitServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.serve()

    def do_POST(self) -> None:
        self.serve()

    def serve(self) -> None:
        expected = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.server.denied += 1
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.snapshots.append(ps())
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # small repo: never chunked
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": self.server.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            "HTTP_GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "REMOTE_USER": "x-access-token",
            "REMOTE_ADDR": "127.0.0.1",
        }
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode().splitlines():
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.split()[0])
            else:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.mark.parametrize("token_in", ["url", "env"])
def test_the_git_token_reaches_git_through_the_helper_only(pod, origin, tmp_path, token_in):
    server = GitServer(str(Path(origin["path"]).parent))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    clean = f"http://127.0.0.1:{server.server_address[1]}/origin.git"
    given = {
        "url": {"MEDASR_REPO_URL": f"http://x-access-token:{TOKEN}@{clean[7:]}"},
        "env": {"MEDASR_GIT_TOKEN": TOKEN},
    }
    snapshots: list[str] = []
    running = True

    def poll() -> None:
        while running:
            snapshots.append(ps())

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        env = {"MEDASR_REPO_URL": clean} | given[token_in] | {"GIT_TRACE": str(tmp_path / "trace")}
        first, second = pod.start(origin["A"], **env), pod.start(origin["B"], **env)  # a clone, then a fetch
    finally:
        running = False
        poller.join()
        server.shutdown()
        server.server_close()

    assert ran_at(first) == origin["A"] and ran_at(second) == origin["B"]
    # runpod.sh gets the clean URL and the token (for MEDASR_GIT_PUSH), as variables
    assert f"url={clean} token=set" in second.stdout
    assert server.denied and server.snapshots, "the server did not demand the token, or git never sent it"
    seen = server.snapshots + snapshots
    assert any("git-remote-http origin http" in snap for snap in seen)  # the polls saw the transport at work
    assert not [line for snap in seen for line in snap.splitlines() if TOKEN in line]
    assert "MEDASR_GIT_TOKEN" in (tmp_path / "trace").read_text()  # the helper ran, naming the variable
    for path in [*pod.ws.rglob("*"), *(tmp_path / "home").rglob("*"), tmp_path / "trace"]:
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_split_repo_url():
    assert split_repo_url(f"https://user:{TOKEN}@github.com/o/r.git") == ("https://github.com/o/r.git", TOKEN)
    assert split_repo_url(f"https://{TOKEN}@git.example.org:8443/o/r") == ("https://git.example.org:8443/o/r", TOKEN)
    assert split_repo_url("https://x:a%40b@h/r") == ("https://h/r", "a@b")
    for url in ("https://github.com/o/r.git", "git@github.com:o/r.git", "ssh://git@github.com/o/r.git"):
        assert split_repo_url(url) == (url, None)
    assert redact_url(f"https://{TOKEN}@git.example.org:8443/o/r") == "https://git.example.org:8443/o/r"


def test_the_git_token_travels_to_the_pod_as_a_secret():
    spec = PodSpec(name="t", repo_url="https://github.com/o/r.git", git_ref="0" * 40, run_id="r")
    body = create_payload(spec, "NVIDIA A100-SXM4-40GB", {"MEDASR_GIT_TOKEN": TOKEN})
    assert body["env"]["MEDASR_GIT_TOKEN"] == TOKEN and TOKEN not in json.dumps(redacted(body))
