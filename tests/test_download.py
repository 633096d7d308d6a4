"""Resolving weight sources: short names, download cache, checksum, offline failure."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial

import pytest

import detr
from detr.download import SHORT_NAMES, WeightsUnavailableError, local_path, resolve_url


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


def test_short_names_resolve_to_the_official_files():
    assert resolve_url("detr-r50") == "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth"
    assert SHORT_NAMES["detr-r50-dc5"].dilation and not SHORT_NAMES["detr-r101"].dilation
    assert resolve_url("hf://facebook/detr-resnet-50").endswith("facebook/detr-resnet-50/resolve/main/model.safetensors")


def test_unknown_short_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown weights name 'detr-r34'.*detr-r50"):
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
