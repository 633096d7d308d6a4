"""Resolving weight sources: short names, download cache, checksum, offline failure."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial
from types import SimpleNamespace

import pytest

import detr
from detr.download import WeightsUnavailableError, local_path, resolve_url
from detr.weights import REGISTRY


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on loopback serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A loopback stand-in for the hub, reached as ``hf://org/repo`` through ``HF_ENDPOINT``: the
    resolve path answers 302 (with ``X-Linked-Etag`` when ``hub.sha256`` is set, as the hub does
    for LFS files) to a blob path that serves ``hub.data`` with a git-sha1-like ETag."""
    hub = SimpleNamespace(data=b"", sha256=None, requests=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body):
            hub.requests.append((self.command, self.path))
            if self.path == "/org/repo/resolve/main/model.safetensors":
                self.send_response(302)
                self.send_header("Location", "/blobs/model.safetensors")
                if hub.sha256:
                    self.send_header("X-Linked-Etag", f'"{hub.sha256}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/blobs/model.safetensors":
                self.send_response(200)
                self.send_header("ETag", f'"{hashlib.sha1(hub.data).hexdigest()}"')  # 40 hex: not a sha256
                self.send_header("Content-Length", str(len(hub.data)))
                self.end_headers()
                if body:
                    self.wfile.write(hub.data)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("DETR_RAY_CACHE", str(tmp_path / "cache"))
    yield hub
    server.shutdown()


def _cached_files(tmp_path):
    return [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_short_names_resolve_to_the_official_files():
    assert resolve_url("detr-r50") == "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth"
    assert REGISTRY["detr-r50-dc5"].config.dilation and not REGISTRY["detr-r101"].config.dilation
    assert REGISTRY["detr-r101"].config.backbone == "resnet101" and REGISTRY["detr-r50"].file_name.endswith(
        "e632da11.pth"
    )
    assert resolve_url("hf://facebook/detr-resnet-50").endswith(
        "facebook/detr-resnet-50/resolve/main/model.safetensors"
    )


def test_unknown_short_name_lists_the_known_ones():
    with pytest.raises(WeightsUnavailableError, match=r"unknown weights name 'detr-r34'.*detr-r50"):
        detr.from_pretrained("detr-r34")


def test_download_is_verified_and_cached(http_folder, tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("DETR_RAY_CACHE", str(tmp_path / "cache"))
    root, base = http_folder
    data = open(tiny_checkpoint, "rb").read()
    prefix = hashlib.sha256(data).hexdigest()[:8]
    (root / f"tiny-{prefix}.pth").write_bytes(data)
    first = local_path(f"{base}/tiny-{prefix}.pth")
    assert first.read_bytes() == data
    (root / f"tiny-{prefix}.pth").unlink()  # the second call must not need the server
    assert local_path(f"{base}/tiny-{prefix}.pth") == first
    assert detr.from_pretrained(f"{base}/tiny-{prefix}.pth").config.backbone == "resnet18"


def test_checksum_mismatch_is_rejected_and_not_cached(http_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DETR_RAY_CACHE", str(tmp_path / "cache"))
    root, base = http_folder
    (root / "detr-r50-e632da11.pth").write_bytes(b"not the real weights")
    with pytest.raises(WeightsUnavailableError, match="checksum mismatch.*expected e632da11"):
        local_path(f"{base}/detr-r50-e632da11.pth")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_offline_without_cache_fails_with_one_line_naming_url(http_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DETR_RAY_CACHE", str(tmp_path / "cache"))
    _, base = http_folder
    with pytest.raises(WeightsUnavailableError) as error:
        local_path(f"{base}/missing-0123abcd.pth")
    message = str(error.value)
    assert "\n" not in message and f"{base}/missing-0123abcd.pth" in message and "--weights" in message


def test_missing_local_file():
    with pytest.raises(WeightsUnavailableError, match="weights file not found: /nonexistent/x.pth"):
        detr.from_pretrained("/nonexistent/x.pth")


def test_hub_download_is_checked_against_the_linked_etag_and_cached(fake_hub, tmp_path, reference_r50):
    _, hub_file, _ = reference_r50
    fake_hub.data = hub_file.read_bytes()
    fake_hub.sha256 = hashlib.sha256(fake_hub.data).hexdigest()
    cached = local_path("hf://org/repo")
    assert cached.read_bytes() == fake_hub.data
    assert ("HEAD", "/org/repo/resolve/main/model.safetensors") in fake_hub.requests
    fake_hub.requests.clear()  # the second call is served from the cache alone
    assert detr.from_pretrained("hf://org/repo").config.backbone == "resnet50"
    assert local_path("hf://org/repo") == cached and fake_hub.requests == []


def test_hub_checksum_mismatch_is_rejected_and_not_cached(fake_hub, tmp_path):
    fake_hub.data = b"tampered weights"
    fake_hub.sha256 = hashlib.sha256(b"the real weights").hexdigest()
    with pytest.raises(WeightsUnavailableError) as error:
        local_path("hf://org/repo")
    message = str(error.value)
    assert "\n" not in message and message.startswith("checksum mismatch for http://127.0.0.1:")
    assert f"expected {fake_hub.sha256[:12]}..." in message and not _cached_files(tmp_path)


def test_hub_file_without_a_sha256_is_refused_not_cached(fake_hub, tmp_path):
    fake_hub.data = b"small non-LFS file"
    with pytest.raises(WeightsUnavailableError) as error:
        local_path("hf://org/repo")
    message = str(error.value)
    assert "\n" not in message and message.startswith("cannot verify weights from http://127.0.0.1:")
    assert "/org/repo/resolve/main/model.safetensors" in message and "--weights" in message
    assert not _cached_files(tmp_path) and all(method == "HEAD" for method, _ in fake_hub.requests)


def test_hub_offline_fails_with_one_line_naming_url(tmp_path, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("DETR_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(WeightsUnavailableError) as error:
        local_path("hf://org/repo")
    message = str(error.value)
    assert "\n" not in message and message.startswith("cannot download weights from http://127.0.0.1:")
    assert "/org/repo/resolve/main/model.safetensors" in message and "--weights" in message


def test_a_presigned_weights_url_keeps_its_secret_out_of_names_messages_and_files(
    http_folder, tmp_path, monkeypatch, tiny_checkpoint
):
    monkeypatch.setenv("DETR_RAY_CACHE", str(tmp_path / "cache"))
    root, base = http_folder
    (root / "tiny.pth").write_bytes(open(tiny_checkpoint, "rb").read())
    secret = "X-Amz-Credential=AKIASECRET%2F20261130&X-Amz-Signature=0123456789abcdef"
    model = detr.from_pretrained(f"{base}/tiny.pth?{secret}")
    assert model.weights_name.startswith("tiny.pth@")
    assert [p.name for p in _cached_files(tmp_path)] == ["tiny.pth"]
    with pytest.raises(WeightsUnavailableError) as error:
        detr.from_pretrained(f"{base}/missing.pth?{secret}")
    assert "AKIASECRET" not in str(error.value) and "0123456789abcdef" not in str(error.value)
    assert f"{base}/missing.pth" in str(error.value)
