"""A Hugging Face hub on localhost, written from the hub's HTTP API as ``huggingface_hub`` uses it
(point ``HF_ENDPOINT`` at it): repo info, the file tree, file downloads with the hub's headers and
HTTP ranges, and its error codes. It counts the bytes it serves of each file, so a test can tell
a header read from a download.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$")
_FILE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class FakeHub:
    """Repos served from local folders: ``hub.add("org/name", folder)``; ``gated`` ids answer as
    the hub does for a gated repo without an accepted token."""

    def __init__(self):
        self.repos: dict[str, Path] = {}
        self.gated: set[str] = set()
        self.served: Counter[str] = Counter()  # "repo/file" -> body bytes sent
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Authorization header)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo_id: str, folder: Path) -> None:
        self.repos[repo_id] = Path(folder)

    def sha(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str) -> list[str]:
        root = self.repos[repo_id]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _error(self, status: int, code: str) -> None:
                body = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _repo(self, repo_id: str, revision: str) -> bool:
                if repo_id not in hub.repos:
                    self._error(404, "RepoNotFound")
                    return False
                if repo_id in hub.gated:
                    self._error(403, "GatedRepo")
                    return False
                if revision not in ("main", hub.sha(repo_id)):
                    self._error(404, "RevisionNotFound")
                    return False
                return True

            def _answer(self, head: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Authorization", "")))
                if m := _INFO.match(path):
                    repo_id, rev = m.groups()
                    if self._repo(repo_id, rev or "main"):
                        self._json({"id": repo_id, "sha": hub.sha(repo_id),
                                    "siblings": [{"rfilename": f} for f in hub.files(repo_id)]})
                elif m := _TREE.match(path):
                    repo_id, rev, _ = m.groups()
                    if self._repo(repo_id, rev):
                        root = hub.repos[repo_id]
                        self._json([{"type": "file", "path": f, "size": (root / f).stat().st_size,
                                     "oid": hashlib.sha1((root / f).read_bytes()).hexdigest()}
                                    for f in hub.files(repo_id)])
                elif m := _FILE.match(path):
                    repo_id, rev, name = m.groups()
                    if self._repo(repo_id, rev):
                        self._file(repo_id, name, head)
                else:
                    self._error(404, "NotFound")

            def _file(self, repo_id: str, name: str, head: bool) -> None:
                file = hub.repos[repo_id] / name
                if not file.is_file():
                    self._error(404, "EntryNotFound")
                    return
                data = file.read_bytes()
                start, end, status = 0, len(data) - 1, 200
                if (r := self.headers.get("Range")) and (m := _RANGE.match(r)):
                    start = int(m.group(1))
                    end = min(int(m.group(2)) if m.group(2) else end, len(data) - 1)
                    status = 206
                body = data[start:end + 1]
                self.send_response(status)
                self.send_header("X-Repo-Commit", hub.sha(repo_id))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                    hub.served[f"{repo_id}/{name}"] += len(body)

        return Handler
