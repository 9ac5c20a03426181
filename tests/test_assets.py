"""Assets that fetch and verify themselves, against a local HTTP server (never the real network):
resume through HTTP Range, a server that ignores the range, corrupt bytes against a pin, 404,
trust-on-first-use records, torch hub copies, and the `sfdbench assets` commands' exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from sfdbench import cli
from sfdbench.errors import MissingAsset
from sfdbench.suites import assets
from sfdbench.suites.assets import ASSETS, Asset, asset_provenance, download, locate

DATA = bytes(range(256)) * 1200  # 307200 bytes
DATA_SHA = hashlib.sha256(DATA).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files[path]`` with Range support. Per file: ``drop_after`` (send the headers
    of the whole body, then only that many bytes and close; one-shot), ``ignore_range``, ``corrupt``."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        spec = server.files.get(self.path)
        if spec is None:
            self.send_error(404, "Not Found")
            return
        data = spec["data"]
        if spec.get("corrupt"):
            data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]
        start = 0
        wanted = self.headers.get("Range")
        if wanted and not spec.get("ignore_range"):
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        drop = spec.pop("drop_after", None)
        self.wfile.write(body if drop is None else body[:drop])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests = {}, []
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    """SFDBENCH_CACHE and torch hub's cache in tmp_path, so nothing real is looked at."""
    monkeypatch.setenv("SFDBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "cache"


def closed_port_url(name: str = "x.bin") -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def make_asset(monkeypatch, url: str, key: str = "test-asset", filename: str = "test.bin", **pins) -> Asset:
    asset = Asset(key=key, name="a test file", kind="teacher", url=url, filename=filename, suites=("toy",), **pins)
    monkeypatch.setitem(ASSETS, key, asset)
    return asset


def serve(server, name: str = "/test.bin", data: bytes = DATA, **spec) -> str:
    server.files[name] = {"data": data, **spec}
    return server.base + name


# ----------------------------------------------------------------------------- the registry


def test_registry():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert set(ASSETS) == {"edm-cifar10-teacher", "cifar10-fid-ref", "edm-imagenet64-teacher", "imagenet64-fid-ref",
                           "inception-v3-compat", "dinov2-vitl14", "ms-coco-captions-30k", "clip-vit-g14-laion2b"}
    inception = ASSETS["inception-v3-compat"]
    assert inception.url == URL_INCEPTION_V3 and inception.sha256_prefix == "6726825d" and inception.torch_hub
    assert ASSETS["dinov2-vitl14"].url.endswith("/dinov2_vitl14/dinov2_vitl14_pretrain.pth")
    assert not ASSETS["dinov2-vitl14"].pinned
    for key, asset in ASSETS.items():
        assert asset.key == key and asset.kind in assets.KINDS
        assert set(asset.suites) <= {"cifar10", "imagenet64", "lsun_bedroom", "ms_coco"}
        assert asset.url.startswith("https://") and asset.url.endswith("/" + asset.filename)
    assert len({a.filename for a in ASSETS.values()}) == len(ASSETS)
    assert [a.key for a in assets.assets_for_suite("cifar10")] == [
        "edm-cifar10-teacher", "cifar10-fid-ref", "inception-v3-compat", "dinov2-vitl14"]
    assert [a.key for a in assets.assets_for_suite("ms_coco")] == [
        "inception-v3-compat", "ms-coco-captions-30k", "clip-vit-g14-laion2b"]
    assert assets.assets_for_suite("digits") == []


def test_require_names_asset_url_path_and_command(cache):
    asset = ASSETS["edm-cifar10-teacher"]
    assert asset.path == cache / "assets" / "edm-cifar10-32x32-uncond-vp.pkl"
    with pytest.raises(MissingAsset) as err:
        asset.require()
    msg = str(err.value)
    assert err.value.exit_code == 3 and "\n" not in msg
    for part in ("edm-cifar10-teacher", asset.url, str(asset.path), "`sfdbench assets download edm-cifar10-teacher`",
                 "`sfdbench assets download --suite cifar10`"):
        assert part in msg


# ----------------------------------------------------------------------------- download


def test_download_pinned(server, monkeypatch):
    asset = make_asset(monkeypatch, serve(server), sha256=DATA_SHA, size=len(DATA))
    seen = []
    path = download(asset, progress=lambda done, total: seen.append((done, total)), chunk=50_000)
    assert path == asset.path and path.read_bytes() == DATA and not asset.part_path.exists()
    assert server.requests == [("/test.bin", None)]
    assert seen[0] == (0, len(DATA)) and seen[-1] == (len(DATA), len(DATA))
    record = json.loads(asset.sidecar_path.read_text())
    assert record["sha256"] == DATA_SHA and record["pinned"] is True and record["url"] == asset.url
    assert asset_provenance(asset.key) == {"key": asset.key, "file": "test.bin", "url": asset.url, "sha256": DATA_SHA,
                                           "pinned": True, "source": "pinned"}
    assert download(asset) == path and len(server.requests) == 1  # present: no request


def test_interrupted_download_resumes_with_range(server, monkeypatch):
    k = 100_000
    asset = make_asset(monkeypatch, serve(server, drop_after=k), sha256=DATA_SHA)
    with pytest.raises(MissingAsset) as err:
        download(asset, chunk=8192)
    msg = str(err.value)
    assert err.value.exit_code == 3 and "\n" not in msg
    assert asset.url in msg and f"{k} bytes kept" in msg and str(asset.path) in msg
    assert f"sfdbench assets download {asset.key}" in msg
    assert asset.part_path.stat().st_size == k and not asset.path.exists()

    seen = []
    path = download(asset, progress=lambda done, total: seen.append((done, total)), chunk=8192)
    assert server.requests == [("/test.bin", None), ("/test.bin", f"bytes={k}-")]
    assert seen[0] == (k, len(DATA))
    assert path.read_bytes() == DATA and not asset.part_path.exists()


def test_server_ignoring_range_restarts_from_zero(server, monkeypatch):
    asset = make_asset(monkeypatch, serve(server, ignore_range=True), sha256=DATA_SHA)
    asset.part_path.parent.mkdir(parents=True)
    asset.part_path.write_bytes(b"\0" * 5000)  # stale and wrong: must not be kept in front of a full body
    assert download(asset).read_bytes() == DATA
    assert server.requests == [("/test.bin", "bytes=5000-")]


def test_416_means_the_partial_file_is_complete(server, monkeypatch):
    asset = make_asset(monkeypatch, serve(server), sha256=DATA_SHA)
    asset.part_path.parent.mkdir(parents=True)
    asset.part_path.write_bytes(DATA)
    assert download(asset).read_bytes() == DATA
    assert server.requests == [("/test.bin", f"bytes={len(DATA)}-")]


@pytest.mark.parametrize("pin", ["full", "prefix"])
def test_corrupt_bytes_are_deleted(server, monkeypatch, pin):
    pins = {"sha256": DATA_SHA} if pin == "full" else {"sha256_prefix": DATA_SHA[:8]}
    asset = make_asset(monkeypatch, serve(server, corrupt=True), **pins)
    with pytest.raises(MissingAsset) as err:
        download(asset)
    msg = str(err.value)
    corrupt = bytearray(DATA)
    corrupt[1000] ^= 0xFF
    actual = hashlib.sha256(bytes(corrupt)).hexdigest()
    assert err.value.exit_code == 3 and "\n" not in msg
    assert pins.get("sha256", pins.get("sha256_prefix")) in msg and actual in msg and asset.url in msg
    assert not asset.path.exists() and not asset.part_path.exists() and not asset.sidecar_path.exists()


def test_404(server, monkeypatch):
    asset = make_asset(monkeypatch, server.base + "/nothing.bin")
    with pytest.raises(MissingAsset) as err:
        download(asset)
    msg = str(err.value)
    assert err.value.exit_code == 3 and "HTTP 404" in msg and asset.url in msg and str(asset.path) in msg
    assert not asset.path.exists()


def test_offline(monkeypatch):
    asset = make_asset(monkeypatch, closed_port_url())
    with pytest.raises(MissingAsset) as err:
        download(asset, timeout=5)
    msg = str(err.value)
    assert err.value.exit_code == 3 and asset.url in msg and f"`sfdbench assets download {asset.key}`" in msg
    assert "download it yourself and put it at " + str(asset.path) in msg


# ----------------------------------------------------------------------------- trust on first use, provenance


def test_first_download_is_recorded_and_later_changes_detected(server, monkeypatch):
    asset = make_asset(monkeypatch, serve(server))
    path = download(asset)
    record = json.loads(asset.sidecar_path.read_text())
    assert record["sha256"] == DATA_SHA and record["pinned"] is False and record["url"] == asset.url
    assert record["downloaded_at"]
    prov = asset_provenance(asset.key)
    assert prov["sha256"] == DATA_SHA and prov["pinned"] is False and prov["source"] == "first download"
    assert assets.verify(asset)["ok"] is True

    path.write_bytes(DATA + b"tampered")
    result = assets.verify(asset)
    assert result["ok"] is False and result["expected"] == DATA_SHA
    with pytest.raises(MissingAsset) as err:
        asset_provenance(asset.key)
    assert DATA_SHA in str(err.value) and result["sha256"] in str(err.value)

    # a re-download that differs from the first one is refused (the upstream file changed)
    path.unlink()
    server.files["/test.bin"]["corrupt"] = True
    with pytest.raises(MissingAsset) as err:
        download(asset)
    assert DATA_SHA in str(err.value) and str(asset.sidecar_path) in str(err.value)
    assert not path.exists()


def test_unverified_local_file(monkeypatch):
    asset = make_asset(monkeypatch, closed_port_url())
    asset.path.parent.mkdir(parents=True)
    asset.path.write_bytes(DATA)
    assert download(asset) == asset.path  # present: no network
    prov = asset_provenance(asset.key)
    assert prov["source"] == "unverified local file" and prov["pinned"] is False and prov["sha256"] == DATA_SHA


def test_torch_hub_copy_counts_as_present(monkeypatch, tmp_path):
    name = f"weights-test-{DATA_SHA[:8]}.pth"
    asset = make_asset(monkeypatch, closed_port_url(name), filename=name, sha256_prefix=DATA_SHA[:8], torch_hub=True)
    assert asset.hub_path() == tmp_path / "torch" / "hub" / "checkpoints" / name
    assert locate(asset) is None
    asset.hub_path().parent.mkdir(parents=True)
    asset.hub_path().write_bytes(DATA)
    assert locate(asset) == asset.require() == download(asset) == asset.hub_path()
    assert asset.path.parent == tmp_path / "cache" / "assets"
    assert asset_provenance(asset.key)["source"] == "pinned"


# ----------------------------------------------------------------------------- the CLI


def sfdbench(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``sfdbench ARGS`` in this process (so the registry can be monkeypatched): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["sfdbench", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def test_cli_list(monkeypatch, capsys, cache):
    for args in (["assets"], ["assets", "list"]):
        code, out, err = sfdbench(monkeypatch, capsys, *args)
        assert code == 0, err
        assert all(key in out for key in ASSETS) and str(cache) in out and "6726825d" in out


def test_cli_download_and_verify(server, monkeypatch, capsys):
    asset = make_asset(monkeypatch, serve(server, drop_after=1000))
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "download", asset.key)
    assert code == 3 and f"sfdbench assets download {asset.key}" in err and "1000 bytes kept" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "download", asset.key)
    assert code == 0, err
    assert asset.path.read_bytes() == DATA and server.requests[-1] == ("/test.bin", "bytes=1000-")
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "download", asset.key)  # present: nothing to do
    assert code == 0 and "present" in out and len(server.requests) == 2

    code, out, err = sfdbench(monkeypatch, capsys, "assets", "verify", asset.key)
    assert code == 0, err
    assert "ok" in out and DATA_SHA[:8] in out
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "verify")  # everything present; missing ones listed
    assert code == 0, err

    asset.path.write_bytes(b"changed")
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "verify", asset.key)
    assert code == 3 and DATA_SHA in err and hashlib.sha256(b"changed").hexdigest() in err
    assert "MISMATCH" in out


def test_cli_verify_missing_requested_asset_exits_3(monkeypatch, capsys):
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "verify", "--suite", "cifar10")
    assert code == 3 and "missing" in err and "sfdbench assets download edm-cifar10-teacher" in err


def test_cli_unknown_names_exit_2(monkeypatch, capsys):
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "download", "no-such-asset")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no-such-asset" in err and all(key in err for key in ASSETS)
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "verify", "--suite", "no-such-suite")
    assert code == 2 and "known suites" in err
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "download")  # nothing named
    assert code == 2
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "download", "--suite", "digits")
    assert code == 0 and "downloads nothing" in out


def test_cli_offline_exits_3_with_the_command(monkeypatch, capsys):
    asset = make_asset(monkeypatch, closed_port_url())
    other = make_asset(monkeypatch, closed_port_url("y.bin"), key="other-asset", filename="y.bin")
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "download", asset.key, "--timeout", "5")
    assert code == 3 and f"`sfdbench assets download {asset.key}`" in err and asset.url in err
    code, out, err = sfdbench(monkeypatch, capsys, "assets", "download", asset.key, other.key, "--timeout", "5")
    assert code == 3 and f"sfdbench assets download {asset.key} {other.key}" in err.strip().splitlines()[-1]


def test_run_without_assets_exits_3_with_the_download_command(tmp_path, cache):
    env = {**os.environ, "SFDBENCH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    args = ["run", "--suite", "cifar10", "--out", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, "-m", "sfdbench.cli", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "sfdbench assets download" in line and str(cache) in line
    assert not (tmp_path / "o").exists()


def test_one_download_per_file_at_a_time(server, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    asset = make_asset(monkeypatch, serve(server), sha256=DATA_SHA)
    asset.path.parent.mkdir(parents=True)
    with open(asset.path.with_name(asset.filename + ".lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process downloading (flock locks are per open file)
        with pytest.raises(MissingAsset, match="another process is downloading"):
            download(asset)
        assert server.requests == []
    assert download(asset).read_bytes() == DATA
