"""The Hugging Face Hub's HTTP API on 127.0.0.1: just what `HfApi.create_repo` and `HfApi.upload_folder` call, as
huggingface_hub 2.4 sends it (hf_api.py, _commit_api.py): repo creation (409 when it exists), README metadata
validation, preupload (every file "regular": its bytes go inline in the commit, no LFS or Xet transfer) and the NDJSON
commit. Point a client at it with HF_ENDPOINT. Like the hub, it answers 401 to a request without the right bearer
token. `fail_with = 502` answers every request with that status (an outage behind the hub's proxy).

What arrived: `repos[repo_id]` (path -> bytes of the last commit's files), `private[repo_id]`, and `requests`
((method, path) of every request, answered or not)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

USER = "medasr-tests"  # the token's owner: a repo id without a namespace lands here


class FakeHub:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: dict[str, bool] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_with: int | None = None
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(*hub.handle(self.command, self.path, self.headers, b""))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(*hub.handle(self.command, self.path, self.headers, body))

            def _answer(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        path = path.split("?", 1)[0]
        with self.lock:
            self.requests.append((method, path))
            if self.fail_with is not None:
                return self.fail_with, {"error": "Bad Gateway"}
            if headers.get("Authorization") != f"Bearer {self.token}":
                return 401, {"error": "Invalid credentials in Authorization header"}
            if (method, path) == ("POST", "/api/repos/create"):
                return self._create(json.loads(body))
            if (method, path) == ("POST", "/api/validate-yaml"):
                return self._validate(json.loads(body)["content"])
            parts = path.split("/")  # /api/models/<namespace>/<name>/<preupload|commit>/<revision>
            if method == "POST" and len(parts) == 7 and parts[:3] == ["", "api", "models"]:
                repo_id, action = f"{parts[3]}/{parts[4]}", parts[5]
                if repo_id not in self.repos:
                    return 404, {"error": f"Repository not found: {repo_id}"}
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return 200, {
                        "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    }
                if action == "commit":
                    return self._commit(repo_id, body)
            return 404, {"error": f"the fake hub does not serve {method} {path}"}

    def _create(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        self.repos[repo_id] = {}
        self.private[repo_id] = payload.get("visibility") == "private" or bool(payload.get("private"))
        return 200, {"url": url, "name": repo_id}

    @staticmethod
    def _validate(readme: str) -> tuple[int, dict[str, Any]]:
        """The card's front matter must be a YAML mapping (the hub checks much more: huggingface_hub's own parsing
        is tested beside this)."""
        _, sep, rest = readme.partition("---\n")
        meta = yaml.safe_load(rest.partition("\n---\n")[0]) if sep and readme.startswith("---\n") else None
        if not isinstance(meta, dict):
            return 400, {"errors": [{"message": "README.md has no YAML metadata block"}]}
        return 200, {"errors": [], "warnings": []}

    def _commit(self, repo_id: str, body: bytes) -> tuple[int, dict[str, Any]]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "the commit payload must start with its header"}
        files = dict(self.repos[repo_id])
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return 400, {"error": f"unexpected commit line {line['key']} (every file was announced regular)"}
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        self.repos[repo_id] = files
        oid = hashlib.sha1(body).hexdigest()
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}
