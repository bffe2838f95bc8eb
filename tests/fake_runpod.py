"""RunPod's v2 pod API on 127.0.0.1, as its published OpenAPI document (medasr/resources/runpod-openapi-v2.json)
describes it: bearer auth, every request body checked against the document's schema (422 with the errors, and
recorded, when it does not match), and pods whose JSON matches the document's `Pod` schema. No traffic leaves the
machine; the tests drive the pod lifecycle (a pod dies, a stopped pod's machine has no GPU left, ...) and inject
faults (`fail`: the next k matching calls answer 502, with or without the server having acted).

The fake reads the document and validates with `jsonschema` on its own, never through the client's code
(medasr.ops.runpod.schema_errors): a bug there must not be able to hide a bad request from the server."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from datetime import UTC, datetime
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

API_DOCUMENT = Path(__file__).resolve().parents[1] / "medasr" / "resources" / "runpod-openapi-v2.json"


@cache
def _validator(schema_name: str):
    """A JSON Schema 2020-12 validator (OpenAPI 3.1's schema dialect) for `components.schemas.<schema_name>`, with
    the document as the root every `#/components/...` reference resolves against. Formats are checked too."""
    from jsonschema import Draft202012Validator

    document = json.loads(API_DOCUMENT.read_text())
    assert document["openapi"].startswith("3.1"), document["openapi"]
    assert schema_name in document["components"]["schemas"], schema_name
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_errors(instance: Any, schema_name: str) -> list[str]:
    """Where `instance` breaks the document's schema `schema_name` (empty: valid), one line per error."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
        for e in _validator(schema_name).iter_errors(instance)
    ]


class Scenario:
    """Fake time for the controller (`watch(clock=..., sleep=...)`): each poll's sleep (`poll_s`) advances the clock
    and plays the next event; shorter sleeps (retries inside a poll) only advance the clock."""

    def __init__(self, events, poll_s: float) -> None:
        self.t, self.events, self.poll_s, self.polls = time.time(), list(events), poll_s, 0
        self.said: list[tuple[float, str]] = []  # (time, line) the controller said, through `say`

    def clock(self) -> float:
        return self.t

    def say(self, line: str) -> None:
        self.said.append((self.t, line))

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        if seconds != self.poll_s:
            return
        self.polls += 1
        if self.events:
            self.events.pop(0)()
        assert self.polls < 50, "the controller never finished"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeRunPod:
    def __init__(self, api_key: str, cost_per_hour: float = 1.5) -> None:
        self.api_key, self.cost_per_hour = api_key, cost_per_hour
        self.pods: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, body) as received
        self.schema_violations: list[str] = []
        self.unavailable_gpus: set[str] = set()
        self.no_gpu_left: set[str] = set()  # pods whose machine has no free GPU to start them again
        self.unlisted: set[str] = set()  # pods GET /v2/pods leaves out for now (its list lags behind a create)
        self.log_lines = ["[runpod.sh] attempt 1", "[runpod.sh] pipeline finished"]
        self.faults: list[dict[str, Any]] = []
        self.max_alive = 0  # the most pods not TERMINATED at once, after any call
        self._lock = threading.Lock()
        self._ids = (f"pod{n:04d}" for n in itertools.count(1))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def set_status(self, pod_id: str, status: str) -> None:
        self.pods[pod_id]["status"] = status
        if status == "RUNNING":
            self.pods[pod_id]["startedAt"] = _now()

    def bodies(self, method: str, path_pattern: str) -> list[Any]:
        return [b for m, p, b in self.requests if m == method and re.fullmatch(path_pattern, p)]

    def fail(
        self,
        method: str,
        path_pattern: str,
        times: int,
        status: int = 502,
        action: str | None = None,
        acted=False,
        text: str | None = None,
        hold: threading.Event | None = None,
    ) -> None:
        """The next `times` calls of `method` on a path matching `path_pattern` (and, for pod actions, `action`)
        answer `status`. `acted`: the server did the work first and only the answer was lost (a gateway timeout).
        `text`: the answer is that text/html page, not JSON (a proxy's). `hold`: the answer waits until it is set."""
        pattern = re.compile(path_pattern)
        self.faults.append({"method": method, "path": pattern, "times": times, "status": status, "action": action})
        self.faults[-1] |= {"acted": acted, "text": text, "hold": hold}

    def alive(self) -> list[str]:
        return [i for i, pod in self.pods.items() if pod["status"] != "TERMINATED"]

    def _fault(self, method: str, path: str, body: Any) -> dict[str, Any] | None:
        for fault in self.faults:
            if (
                fault["times"] > 0
                and fault["method"] == method
                and fault["path"].fullmatch(path)
                and fault["action"] in (None, (body or {}).get("action"))
            ):
                fault["times"] -= 1
                return fault
        return None

    # --- the API -------------------------------------------------------------------------------------------------
    def _pod(self, body: dict[str, Any]) -> dict[str, Any]:
        pod = {
            "id": next(self._ids),
            "name": body["name"],
            "status": "RUNNING",
            "actions": ["stop", "restart", "terminate"],
            "image": body.get("image", ""),
            "args": body.get("args", ""),
            "disk": body.get("disk", 20),
            "mounts": body.get("mounts", {}),
            "ports": body.get("ports", []),
            "env": body.get("env", {}),
            "registry": None,
            "cloud": body.get("cloud", "SECURE"),
            "dataCenterId": "US-TX-3",
            "cudaVersion": "12.8",
            "ssh": {"proxy": None, "direct": None},
            "template": None,
            "cost": self.cost_per_hour,
            "locked": False,
            "runtime": None,
            "createdAt": _now(),
            "startedAt": _now(),
            "globalNetworking": {"enabled": False},
            "gpu": body["gpu"],
        }
        assert not schema_errors(pod, "Pod"), schema_errors(pod, "Pod")  # the fake answers as documented
        return pod

    def handle(self, method: str, path: str, headers: Any, body: Any) -> tuple[int, Any]:
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, {"title": "Unauthorized", "status": 401, "detail": "invalid bearer token"}
        with self._lock:
            self.requests.append((method, path, body))
            fault = self._fault(method, path, body)
            answer = self._answer(method, path, body) if fault is None or fault["acted"] else None
            self.max_alive = max(self.max_alive, len(self.alive()))
        if fault is not None and fault["hold"] is not None:
            fault["hold"].wait(60)
        if fault is not None:
            if fault["text"] is not None:
                return fault["status"], fault["text"]
            return fault["status"], {"title": "Bad Gateway", "status": fault["status"], "detail": "upstream failed"}
        assert answer is not None
        return answer

    def _answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/v2/pods":
            return 200, {"pods": [self.pods[i] for i in self.alive() if i not in self.unlisted]}
        if method == "POST" and path == "/v2/pods":
            if errors := schema_errors(body, "CreatePodRequest"):
                self.schema_violations += errors
                return 422, {"title": "Unprocessable Entity", "status": 422, "detail": "invalid body", "errors": errors}
            if body["gpu"]["id"] in self.unavailable_gpus:
                return 400, {"title": "Bad Request", "status": 400, "detail": "no instances of this GPU available"}
            pod = self._pod(body)
            self.pods[pod["id"]] = pod
            return 201, pod
        m = re.fullmatch(r"/v2/pods/([^/]+)(/action)?", path)
        if not m or m.group(1) not in self.pods or self.pods[m.group(1)]["status"] == "TERMINATED":
            return 404, {"title": "Not Found", "status": 404, "detail": "pod not found"}
        pod = self.pods[m.group(1)]
        if method == "GET" and not m.group(2):
            return 200, pod | {"cost": pod["cost"] if pod["status"] == "RUNNING" else 0.0}
        if method == "POST" and m.group(2):
            if errors := schema_errors(body, "PodActionRequest"):
                self.schema_violations += errors
                return 422, {"title": "Unprocessable Entity", "status": 422, "detail": "invalid body", "errors": errors}
            action = body["action"]
            if action in ("start", "restart") and pod["id"] in self.no_gpu_left:
                return 400, {"title": "Bad Request", "status": 400, "detail": "not enough free GPUs on the host"}
            if action == "terminate":
                pod["status"] = "TERMINATED"
                return 204, None
            self.set_status(pod["id"], "EXITED" if action == "stop" else "RUNNING")
            return 200, pod
        return 405, {"title": "Method Not Allowed", "status": 405, "detail": path}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, payload: Any) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                ctype = "application/json" if code < 400 else "application/problem+json"
                if isinstance(payload, str):
                    data, ctype = payload.encode(), "text/html"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _dispatch(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                path = self.path.split("?")[0]
                if method == "GET" and path.endswith("/logs"):
                    return self._logs(path)
                self._send(*fake.handle(method, path, self.headers, body))

            def _logs(self, path: str) -> None:  # Server-Sent Events, held open like the real stream
                if self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    return self._send(401, {"title": "Unauthorized", "status": 401, "detail": "invalid bearer token"})
                fake.requests.append(("GET", path, None))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for n, line in enumerate(fake.log_lines):
                    event = {"ts": _now(), "source": "container", "line": line}
                    self.wfile.write(f"id: {_now()}/{n:012d}\ndata: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                time.sleep(3)  # no more lines: a client that does not follow must stop on its own

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_POST(self) -> None:
                self._dispatch("POST")

            def do_DELETE(self) -> None:
                self._dispatch("DELETE")

        return Handler
