"""A tiny local stand-in for the Hugging Face Hub, for tests without network.

It answers the routes ``huggingface_hub`` really calls, with the headers it reads, so
the real client code (listing, HEAD for metadata, download into its cache) runs
against it when ``HF_ENDPOINT`` points here:

* ``GET /api/models/{owner}/{name}`` and ``.../revision/{rev}``: model info with
  ``sha`` and ``siblings`` (``HfApi.model_info``).
* ``GET /api/models/{owner}/{name}/tree/{rev}[/{path}]?recursive=...``: the file list
  (``HfApi.list_repo_files`` / ``list_repo_tree``), one page.
* ``HEAD|GET /{owner}/{name}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``,
  ``ETag`` (the sha256 of the content, quoted, as the Hub sends for LFS files),
  ``Content-Length`` and ``Accept-Ranges``; ``Range: bytes=N-`` is honoured (resume).

Errors carry the Hub's ``X-Error-Code`` (``RepoNotFound``, ``EntryNotFound``,
``RevisionNotFound``), which huggingface_hub turns into its typed exceptions.  A repo
added with ``token="..."`` answers 401 RepoNotFound unless ``Authorization: Bearer
<token>`` comes with the request, as a private repository does.  Every request is
recorded (method, path, headers with lower-case names) in ``server.requests``.

    with HubServer() as hub:
        hub.add_repo("user/tiny-GGUF", {"tiny-Q8_0.gguf": path_or_bytes})
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Union
from urllib.parse import unquote, urlsplit

Content = Union[bytes, str, "os.PathLike[str]"]


@dataclass
class _File:
    path: Path | None
    data: bytes | None
    size: int
    sha256: str
    git_oid: str

    def read(self, start: int = 0) -> bytes:
        if self.data is not None:
            return self.data[start:]
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read()


@dataclass
class _Repo:
    files: dict[str, _File]
    commit: str
    token: str | None = None


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)


def _file(content: Content) -> _File:
    if isinstance(content, bytes):
        data, path = content, None
        digest = hashlib.sha256(data).hexdigest()
        size = len(data)
    else:
        path, data = Path(content), None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest, size = h.hexdigest(), path.stat().st_size
    return _File(path=path, data=data, size=size, sha256=digest, git_oid=hashlib.sha1(digest.encode()).hexdigest())


class HubServer:
    """The fake Hub: a ThreadingHTTPServer on 127.0.0.1, a free port, in a thread."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub._handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                hub._handle(self, head=False)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-hf-hub", daemon=True)

    # ---- setup -----------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, Content], *, token: str | None = None) -> None:
        """Publish `files` (repo path -> bytes or a local file) as repository `repo_id`."""
        entries = {name: _file(content) for name, content in files.items()}
        commit = hashlib.sha1((repo_id + "".join(sorted(f.sha256 for f in entries.values()))).encode()).hexdigest()
        self.repos[repo_id] = _Repo(files=entries, commit=commit, token=token)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def downloads(self) -> list[str]:
        """Paths of the GET requests for file contents (resolve route) so far."""
        with self._lock:
            return [r.path for r in self.requests if r.method == "GET" and "/resolve/" in r.path]

    # ---- routing ---------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        with self._lock:
            # header names lower-cased: clients differ in case (httpx sends lower case)
            self.requests.append(Request(h.command, h.path, {k.lower(): v for k, v in h.headers.items()}))
        parts = [unquote(p) for p in urlsplit(h.path).path.split("/") if p]
        if len(parts) >= 3 and parts[0] == "api" and parts[1] == "models":
            return self._api(h, parts[2:], head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(h, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        self._error(h, 404, "", "not found")

    def _repo(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str) -> _Repo | None:
        repo = self.repos.get(repo_id)
        if repo is not None and repo.token is not None:
            if h.headers.get("Authorization") != f"Bearer {repo.token}":
                repo = None  # private: the Hub answers 401 RepoNotFound
        if repo is None:
            self._error(h, 401, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.commit):
            self._error(h, 404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo

    def _api(self, h: BaseHTTPRequestHandler, rest: list[str], head: bool) -> None:
        if len(rest) < 2:
            return self._error(h, 404, "", "not found")
        repo_id, tail = f"{rest[0]}/{rest[1]}", rest[2:]
        revision = "main"
        if len(tail) >= 2 and tail[0] in ("revision", "tree"):
            revision = tail[1]
        repo = self._repo(h, repo_id, revision)
        if repo is None:
            return None
        if not tail or tail[0] == "revision":
            body = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": repo.token is not None,
                    "tags": ["gguf"], "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
            return self._json(h, body, head)
        if tail[0] == "tree":
            prefix = "/".join(tail[2:])
            return self._json(h, self._tree(repo, prefix), head)
        return self._error(h, 404, "", "not found")

    @staticmethod
    def _tree(repo: _Repo, prefix: str) -> list[dict]:
        """Every file and folder under `prefix` (the Hub pages at 1000; one page here)."""
        out: list[dict] = []
        folders: set[str] = set()
        for name in sorted(repo.files):
            if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                continue
            f = repo.files[name]
            dirs = name.split("/")[:-1]
            for i in range(1, len(dirs) + 1):
                folder = "/".join(dirs[:i])
                if folder not in folders and (not prefix or folder.startswith(prefix + "/")):
                    folders.add(folder)
                    out.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                "size": 0, "path": folder})
            entry: dict = {"type": "file", "oid": f.git_oid, "size": f.size, "path": name}
            if name.endswith(".gguf"):
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            out.append(entry)
        return out

    def _resolve(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str, name: str, head: bool) -> None:
        repo = self._repo(h, repo_id, revision)
        if repo is None:
            return None
        f = repo.files.get(name)
        if f is None:
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("X-Error-Message", "Entry not found")
            h.send_header("X-Repo-Commit", repo.commit)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        start = 0
        rng = h.headers.get("Range", "")
        if rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
            start = min(int(rng[6:].split("-")[0]), f.size)
        h.send_response(206 if start else 200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(f.size - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{f.size - 1}/{f.size}")
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{f.sha256}"')
        h.send_header("X-Repo-Commit", repo.commit)
        h.end_headers()
        if not head:
            h.wfile.write(f.read(start))

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, body: object, head: bool) -> None:
        data = json.dumps(body).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if not head:
            h.wfile.write(data)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if not head_safe(h):
            h.wfile.write(data)


def head_safe(h: BaseHTTPRequestHandler) -> bool:
    """True for a HEAD request (no body may follow the headers)."""
    return h.command == "HEAD"
