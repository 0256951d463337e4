"""Source versions, the cache keys of dataset prep and the 4-bit model: they change when the content behind an
unchanged name changes. The hub is a small HTTP server in the test answering the two endpoints huggingface_hub
calls (model and dataset info by revision); nothing in kubetune or huggingface_hub is replaced."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import huggingface_hub.constants
import pytest

from kubetune import versions
from kubetune.steps import resolve


class FakeHub(ThreadingHTTPServer):
    """``/api/{models,datasets}/<repo>[/revision/<rev>]`` → {"id", "sha"} from ``refs``; unknown → 404."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.refs: dict[tuple[str, str], str] = {}  # (repo, revision) → commit sha
        self.paths: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.paths.append(self.path)
        path = self.path.split("?", 1)[0]
        for kind in ("/api/models/", "/api/datasets/"):
            if path.startswith(kind):
                repo, _, revision = path[len(kind):].partition("/revision/")
                sha = self.server.refs.get((repo, revision or "main"))
                if sha:
                    return self._reply(200, {"id": repo, "sha": sha, "private": False})
                return self._reply(404, {"error": f"Repository {repo} not found"},
                                   {"X-Error-Code": "RepoNotFound"})
        return self._reply(404, {"error": "no route"})

    def _reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    # The suite runs offline (conftest); this test is a pod with hub access. huggingface_hub reads the
    # variable once, at import.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield server
    server.shutdown()
    server.server_close()


SHA_A, SHA_B, SHA_TAG = "a" * 40, "b" * 40, "c" * 40


def test_a_moved_branch_is_a_new_version_and_the_pinned_revision_follows_it(hub):
    hub.refs[("org/model", "main")] = SHA_A
    hub.refs[("org/model", "v1.0")] = SHA_TAG
    before = versions.model_version("org/model")
    pinned = versions.model_version("org/model", "v1.0")
    hub.refs[("org/model", "main")] = SHA_B  # someone pushed to main
    after = versions.model_version("org/model")
    assert (before.version, before.revision) == (f"commit-{SHA_A}", SHA_A)
    assert (after.version, after.revision) == (f"commit-{SHA_B}", SHA_B)
    assert before.version != after.version != pinned.version
    assert pinned.revision == SHA_TAG and versions.model_version("org/model", "v1.0") == pinned
    assert "/api/models/org/model/revision/v1.0" in hub.paths


def test_the_resolve_step_pins_the_commit_for_the_later_steps(hub, tmp_path):
    hub.refs[("org/model", "main")] = SHA_A
    hub.refs[("org/data", "main")] = SHA_B
    found = resolve("org/data", "org/model", "")
    assert found == {"dataset_version": f"commit-{SHA_B}", "model_version": f"commit-{SHA_A}",
                     "pinned_revision": SHA_A}
    assert any(path.startswith("/api/datasets/org/data") for path in hub.paths)


def test_an_unreachable_hub_means_no_cache_not_a_failure(hub, caplog):
    unknown = versions.model_version("org/missing")
    again = versions.model_version("org/missing")
    assert not unknown.resolved and unknown.version != again.version  # unique: never a cache hit
    assert unknown.revision == "" and "org/missing@main" in unknown.how
    with caplog.at_level("WARNING", logger="kubetune"):
        found = resolve("kubetune://tcm-demo", "org/missing", "")
    assert found["pinned_revision"] == "" and "not served from a cache" in caplog.text


def test_offline_mode_is_said_plainly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    version = versions.model_version("org/model")
    assert not version.resolved and "HF_HUB_OFFLINE" in version.how


def test_a_local_file_rewritten_in_place_is_a_new_version(tmp_path):
    data = tmp_path / "tcm.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    first = versions.dataset_version(str(data))
    assert versions.dataset_version(str(data)) == first  # unchanged content: the same key
    data.write_text('{"instruction": "a", "output": "c"}\n', encoding="utf-8")  # same size, new bytes
    assert versions.dataset_version(str(data)).version != first.version
    assert first.version.startswith("sha256-")


def test_a_folder_changes_with_any_of_its_files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (folder / name).write_text('{"prompt": "p", "completion": "c"}\n', encoding="utf-8")
    first = versions.dataset_version(str(folder))
    (folder / "c.jsonl").write_text('{"prompt": "q", "completion": "d"}\n', encoding="utf-8")
    assert versions.dataset_version(str(folder)).version != first.version


def test_large_sources_use_names_sizes_and_times(tmp_path, monkeypatch):
    monkeypatch.setattr(versions, "FULL_HASH_BYTES", 8)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}', encoding="utf-8")
    (model / "model.safetensors").write_bytes(b"0" * 64)
    first = versions.model_version(str(model))
    assert first.version.startswith("stat-") and "modification times" in first.how
    assert versions.model_version(str(model)) == first
    stat = os.stat(model / "model.safetensors")
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert versions.model_version(str(model)).version != first.version


def test_a_folder_is_hashed_under_one_size_limit_for_all_its_files(tmp_path, monkeypatch):
    """Files each under the limit but over it together are not all read byte by byte."""
    monkeypatch.setattr(versions, "FULL_HASH_BYTES", 100)
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (folder / name).write_text('{"prompt": "p", "completion": "' + "c" * 50 + '"}\n', encoding="utf-8")
    (folder / "notes.txt").write_text("not data", encoding="utf-8")
    version = versions.dataset_version(str(folder))
    assert version.version.startswith("stat-") and version.how.startswith("2 file(s)")


def test_bundled_data_has_a_content_version():
    version = versions.dataset_version("kubetune://tcm-demo")
    assert version.resolved and version.version.startswith("sha256-")


def test_object_store_uris_use_the_identity_the_store_reports(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/tcm.jsonl", b'{"instruction": "a", "output": "b"}\n')
    first = versions.dataset_version("memory://bucket/tcm.jsonl")
    assert first.resolved and first.version.startswith("objects-")
    fs.pipe("/bucket/tcm.jsonl", b'{"instruction": "a", "output": "longer"}\n')
    assert versions.dataset_version("memory://bucket/tcm.jsonl").version != first.version
    fs.rm("/bucket", recursive=True)


def test_a_missing_local_source_is_the_clear_error_it_always_was(tmp_path):
    from kubetune.errors import KubetuneError

    with pytest.raises(KubetuneError, match="neither an existing file or folder"):
        resolve(str(tmp_path / "missing.jsonl"), "org/model", "")
    with pytest.raises(KubetuneError, match="base model path ./no-such-model does not exist"):
        resolve("kubetune://tcm-demo", "./no-such-model", "")
