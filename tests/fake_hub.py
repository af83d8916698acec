"""A loopback stand-in for the Hugging Face Hub: the HTTP routes huggingface_hub uses to upload a folder.

Routes: ``GET /api/whoami-v2``, ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{name}``,
``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{rev}`` (every file "regular", so
contents travel inline, base64, in the commit) and ``POST /api/models/{repo}/commit/{rev}`` (NDJSON).
Tokens are checked on every request; a user writes only to their own namespace. What the server
holds (repos, their privacy and files per branch, commits) is public for assertions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    private: bool | None
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


class FakeHub:
    """``with FakeHub(tokens={"tok": ("alice", "write")}) as hub: ...``; ``hub.url`` is the endpoint."""

    def __init__(self, tokens: dict[str, tuple[str, str]]):
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _user(self) -> tuple[str, str] | None:
            auth = self.headers.get("Authorization", "")
            return hub.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = urlparse(self.path).path
            hub.requests.append(("GET", path))
            user = self._user()
            if path == "/api/whoami-v2":
                if user is None:
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                name, role = user
                return self._reply(
                    200, {"type": "user", "name": name, "orgs": [], "auth": {"accessToken": {"role": role}}}
                )
            self._reply(404, {"error": f"no route {path}"})

        def do_POST(self) -> None:  # noqa: N802
            path = unquote(urlparse(self.path).path)
            hub.requests.append(("POST", path))
            body = self._body()
            user = self._user()
            if user is None:
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            name, role = user
            if path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload.get('organization') or name}/{payload['name']}"
                if repo_id.split("/")[0] != name or role == "read":
                    return self._reply(403, {"error": f"You don't have the rights to create a model under {repo_id}"})
                if repo_id in hub.repos:
                    return self._reply(409, {"error": "You already created this model repo", "url": hub.url})
                visibility = payload.get("visibility")
                hub.repos[repo_id] = Repo(private=None if visibility is None else visibility == "private")
                return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            parts = path.removeprefix("/api/models/").split("/")
            repo_id, action, rev = "/".join(parts[:2]), parts[2] if len(parts) > 2 else "", "/".join(parts[3:])
            repo = hub.repos.get(repo_id)
            if not path.startswith("/api/models/") or repo is None:
                return self._reply(404, {"error": f"Repository not found: {path}"})
            if repo_id.split("/")[0] != name or role == "read":
                return self._reply(403, {"error": "You don't have the rights to write to this repo"})
            if action == "branch":
                if rev in repo.branches:
                    return self._reply(409, {"error": "Reference already exists"})
                repo.branches[rev] = dict(repo.branches["main"])
                return self._reply(200, {})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._reply(
                    200,
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                )
            if action == "commit":
                if rev not in repo.branches:
                    return self._reply(404, {"error": f"Invalid rev id: {rev}"})
                return self._commit(repo, repo_id, rev, body)
            self._reply(404, {"error": f"no route {path}"})

        def _commit(self, repo: Repo, repo_id: str, rev: str, body: bytes) -> None:
            files = repo.branches[rev]
            header, changed = {}, []
            for line in body.splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    header = value
                elif item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    changed.append(value["path"])
                else:
                    return self._reply(400, {"error": f"unsupported commit operation {item['key']}"})
            oid = hashlib.sha1(body).hexdigest()
            repo.commits.append({"summary": header.get("summary"), "branch": rev, "files": changed, "oid": oid})
            self._reply(
                200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
            )

    return Handler
