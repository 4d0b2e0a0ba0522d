"""``zeroshot-ild models download``: the hub's own client against a hub on the loopback address.

No test reaches the internet: a small HTTP server on 127.0.0.1 answers the two requests
huggingface_hub makes for one file (HEAD for the commit, ETag and size; GET, with a Range header
when it resumes), and HF_ENDPOINT points the client at it.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading

import pytest

from ZeroShotILDLib import model_registry, weights_download
from ZeroShotILDLib.cli import EXIT_INPUT, main
from ZeroShotILDLib.errors import InputError
from ZeroShotILDLib.model_registry import ModelSpec

REVISION = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/tiny-weights"
FILE = "open_clip_model.safetensors"
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, not all one byte value
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves ``files[(repo, revision, filename)]`` like the hub's /resolve/ endpoint; logs every request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = {(REPO, REVISION, FILE): PAYLOAD}
        self.cut_after = None  # close the connection after this many bytes of a file (a dropped download)
        self.requests = []  # (method, path, Range header or None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def _lookup(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        # /{org}/{name}/resolve/{revision}/{filename}
        if len(parts) < 5 or parts[2] != "resolve":
            return None
        return self.server.files.get(("/".join(parts[:2]), parts[3], "/".join(parts[4:])))

    def _headers(self, body: bytes, status: int, extra=None):
        self.send_response(status)
        self.send_header("X-Repo-Commit", REVISION)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        for k, v in (extra or {}).items():
            self.send_header(k, v)

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path, self.headers.get("Range")))
        body = self._lookup()
        if body is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._headers(body, 200, {"Content-Length": str(len(body))})
        self.end_headers()

    def do_GET(self):
        rng = self.headers.get("Range")
        self.server.requests.append(("GET", self.path, rng))
        body = self._lookup()
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
        part = body[start:]
        if start:
            self._headers(body, 206, {"Content-Length": str(len(part)),
                                      "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
        else:
            self._headers(body, 200, {"Content-Length": str(len(part))})
        self.end_headers()
        if self.server.cut_after is not None:
            self.wfile.write(part[:max(0, self.server.cut_after - start)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def test_model(monkeypatch):
    """A registry with one downloadable model whose published SHA-256 is that of PAYLOAD."""
    spec = ModelSpec(name="tiny-download", architecture="ViT-B-32", quick_gelu=False, source="file",
                     files=(f"tiny-download/{FILE}",), sha256={FILE: SHA}, licence="MIT",
                     how_to_obtain="Download it by hand.",
                     download=[{"repo_id": REPO, "revision": REVISION, "files": [FILE]}])
    registry = dict(model_registry._registry())
    registry[spec.name] = spec
    monkeypatch.setattr(model_registry, "_registry", lambda: registry)
    return spec


def test_download_fetches_checks_and_is_then_found(hub, test_model, tmp_path, capsys):
    assert main(["models", "download", "tiny-download", "--weights-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    got = tmp_path / "tiny-download" / FILE
    assert got.read_bytes() == PAYLOAD
    assert "SHA-256 ok" in out and REVISION[:12] in out
    # The pinned revision, never a branch, is what the client asked for.
    files = [path for _, path, _ in hub.requests if "/resolve/" in path]
    assert files and all(f"/resolve/{REVISION}/" in path for path in files), hub.requests
    # `models` now reports it found and verified.
    assert main(["models", "--json", "--weights-dir", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["tiny-download"]["state"] == "found" and rows["tiny-download"]["checksum"] == "ok"
    assert rows["chexzero"]["state"] == "missing" and rows["tiny-random"]["state"] == "not needed"
    # A second download is answered from the folder: no file is transferred again.
    hub.requests.clear()
    assert main(["models", "download", "tiny-download", "--weights-dir", str(tmp_path)]) == 0
    assert "already present" in capsys.readouterr().out
    assert not [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]


def test_an_interrupted_download_resumes_where_it_stopped(hub, test_model, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    # The client writes what it receives in chunks of 10 MB; a 1 MiB test file needs smaller ones
    # for bytes to reach the disk before the connection drops (a real 600 MB file keeps all but <10 MB).
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    # First run: the connection drops half-way, every time (the client retries a few times, then
    # gives up); the bytes received are kept beside the target.
    half = len(PAYLOAD) // 2 + 123
    hub.cut_after = half
    assert main(["models", "download", "tiny-download", "--weights-dir", str(tmp_path)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    folder = tmp_path / "tiny-download"
    assert not (folder / FILE).exists()
    partial = next(folder.glob(f".{FILE}.*.part"))
    assert 0 < partial.stat().st_size <= half
    kept = partial.stat().st_size
    # Second run, connection fine: only the missing bytes are asked for.
    hub.cut_after = None
    hub.requests.clear()
    weights_download.download_model("tiny-download", tmp_path, log=lambda line: None, progress_bars=False)
    assert (folder / FILE).read_bytes() == PAYLOAD and not partial.exists()
    gets = [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]
    assert gets and gets[0][2] == f"bytes={kept}-", gets


def test_a_file_with_the_wrong_checksum_is_refused_and_removed(hub, test_model, tmp_path, capsys):
    hub.files[(REPO, REVISION, FILE)] = PAYLOAD[:-1] + b"\x00"  # a damaged or substituted file
    code = main(["models", "download", "tiny-download", "--weights-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "SHA-256" in err and SHA in err and "removed" in err
    assert not (tmp_path / "tiny-download" / FILE).exists()
    # The loader would never see it: the model is still missing.
    spec = model_registry.get_spec("tiny-download")
    assert model_registry.weights_status(spec, tmp_path)["state"] == "missing"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_is_one_line_that_says_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    code = main(["models", "download", "clip-vit-b-32-laion", "--weights-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT and err.count("\n") == 1 and "Traceback" not in err
    assert "not reachable" in err and "--weights-dir DIR" in err and str(tmp_path / "clip-vit-b-32-laion") in err


def test_hf_hub_offline_is_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        weights_download.download_model("openai-vit-b-32", tmp_path, log=lambda line: None)


def test_chexzero_prints_the_steps_and_its_licence(tmp_path, capsys):
    assert main(["models", "download", "chexzero", "--weights-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PhysioNet credentialed licence" in out and "rajpurkarlab/CheXzero" in out
    assert str(tmp_path / "chexzero") in out
    with pytest.raises(InputError, match="not downloadable"):
        weights_download.download_model("chexzero", tmp_path)


def test_unknown_or_non_downloadable_models_are_one_line(tmp_path, capsys):
    assert main(["models", "download", "gpt-clip", "--weights-dir", str(tmp_path)]) == EXIT_INPUT
    assert "unknown model 'gpt-clip'" in capsys.readouterr().err
    assert main(["models", "download", "tiny-random", "--weights-dir", str(tmp_path)]) == EXIT_INPUT
    assert "needs no download" in capsys.readouterr().err


def test_every_download_entry_pins_a_commit():
    for spec in model_registry.list_models():
        for part in spec.download or []:
            assert len(part["revision"]) == 40 and int(part["revision"], 16) >= 0, spec.name
            assert part["repo_id"].count("/") == 1
            assert part.get("files") or part.get("patterns"), spec.name


def test_the_slicer_worker_downloads_with_progress_and_reports_refusals(hub, tmp_path):
    """The panel's Apply offers a missing model's weights; the worker process fetches them (progress in MB)."""
    import os
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "ZeroShotILD"))
    from ZeroShotILDMRML.worker_client import FAILED, SUCCEEDED, WorkerClient

    b16 = model_registry.get_spec("clip-vit-b-16-laion")  # no published SHA-256: loaded unchecked
    b32 = model_registry.get_spec("clip-vit-b-32-laion")  # published SHA-256: our payload must be refused
    for spec in (b16, b32):
        part = spec.download[0]
        hub.files[(part["repo_id"], part["revision"], part["files"][0])] = PAYLOAD
    client = WorkerClient(env=dict(os.environ, HF_ENDPOINT=hub.url), temp_dir=str(tmp_path))
    try:
        job = client.download("clip-vit-b-16-laion", str(tmp_path / "w"))
        assert job.wait(timeout=120)
        progress = job.poll()
        assert job.state == SUCCEEDED, job.error
        assert (tmp_path / "w" / "clip-vit-b-16-laion" / FILE).read_bytes() == PAYLOAD
        assert job.result == str(tmp_path / "w" / "clip-vit-b-16-laion")
        job = client.download("clip-vit-b-32-laion", str(tmp_path / "w"))
        assert job.wait(timeout=120)
        assert job.state == FAILED and isinstance(job.error, InputError) and "SHA-256" in str(job.error)
        assert not (tmp_path / "w" / "clip-vit-b-32-laion" / FILE).exists()
        assert client.alive  # an input error does not cost the worker
    finally:
        client.shutdown()
    assert ("downloading " + FILE, 1, 1) in progress  # MB done / MB total, for the panel's bar
