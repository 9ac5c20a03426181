"""Every downloadable asset of the real suites: URL, checksum, cache path, and how to fetch it.

Nothing is downloaded at import, in a run or in tests: a missing asset stops a run with exit code 3
and one line naming the asset, its URL, where to put it and the command that fetches it
(``sfdbench assets download KEY``). That command calls :func:`download` here: urllib only, resumable
through HTTP Range from ``<file>.part``, verified by sha256 before the atomic rename into place.

Checksums. An asset is pinned by a full ``sha256``, or by a ``sha256_prefix`` (torch hub style file
names, ``<name>-<first hex digits>.<ext>``). Where no pin is known, the first successful download
records the file's sha256 in the sidecar ``<file>.sha256`` (JSON: sha256, url, downloaded_at,
pinned) -- trust on first use -- and later verifications and re-downloads compare against it.
:func:`asset_provenance` says which of these vouches for a file; run records carry it.

No printing here: :func:`download` reports bytes through an optional callback and the CLI draws the
progress bar.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sfdbench.errors import BadInput, MissingAsset
from sfdbench.io import atomic_write_bytes, cache_dir, sha256_file

KINDS = ("teacher", "fid-ref", "feature-weights", "captions")
SIDECAR_SUFFIX = ".sha256"
PART_SUFFIX = ".part"
USER_AGENT = "sfdbench (urllib)"

# progress(downloaded_bytes, total_bytes_or_None); downloaded bytes include those resumed from .part
ProgressCallback = Callable[[int, "int | None"], None]


def hub_sha256_prefix(filename: str) -> str:
    """The sha256 prefix in a torch hub style name: ``weights-inception-2015-12-05-6726825d.pth`` -> ``6726825d``."""
    return filename.rsplit(".", 1)[0].rsplit("-", 1)[-1]


@dataclass(frozen=True)
class Asset:
    key: str  # registry key, what `sfdbench assets download KEY` takes
    name: str  # human description
    kind: str  # one of KINDS
    url: str
    filename: str
    sha256: str | None = None  # full pin (hex)
    sha256_prefix: str | None = None  # partial pin (torch hub names); None and sha256 None: trust on first use
    size: int | None = None  # bytes, when known
    suites: tuple[str, ...] = ()  # the suites that use it
    torch_hub: bool = False  # an existing copy in torch hub's checkpoint dir counts as present

    @property
    def path(self) -> Path:
        """Where `download` puts the file: ``cache_dir()/assets/<filename>``."""
        return cache_dir() / "assets" / self.filename

    @property
    def part_path(self) -> Path:
        return self.path.with_name(self.filename + PART_SUFFIX)

    @property
    def sidecar_path(self) -> Path:
        return self.path.with_name(self.filename + SIDECAR_SUFFIX)

    @property
    def pinned(self) -> bool:
        return bool(self.sha256 or self.sha256_prefix)

    def hub_path(self) -> Path | None:
        """``torch.hub.get_dir()/checkpoints/<filename>`` for torch hub assets (where torch-fidelity keeps them)."""
        if not self.torch_hub:
            return None
        import torch.hub

        return Path(torch.hub.get_dir()) / "checkpoints" / self.filename

    def locate(self) -> Path | None:
        """The file if present: the cache copy, else (torch hub assets) torch hub's copy; None when missing."""
        return locate(self)

    def download_command(self, suite: str | None = None) -> str:
        cmd = f"`sfdbench assets download {self.key}`"
        suite = suite or (self.suites[0] if self.suites else None)
        return cmd + (f" (or `sfdbench assets download --suite {suite}`)" if suite else "")

    def require(self, suite: str | None = None) -> Path:
        """The file's path; ``MissingAsset`` (exit 3) naming the asset, URL, target path and command when absent."""
        path = self.locate()
        if path is None:
            raise MissingAsset(f"missing {self.key}, {self.name}: run {self.download_command(suite)}, or download "
                               f"{self.url} yourself and put it at {self.path} (cache: $SFDBENCH_CACHE)")
        return path


def _asset(key: str, name: str, kind: str, url: str, suites: tuple[str, ...], **pins) -> Asset:
    return Asset(key=key, name=name, kind=kind, url=url, filename=url.rsplit("/", 1)[-1], suites=suites, **pins)


EDM_CDN = "https://nvlabs-fi-cdn.nvidia.com/edm"
# torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3 (written out: listing assets imports no torch-fidelity;
# tests/test_assets.py checks that the two agree)
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
COCO_CAPTIONS_URL = ("https://github.com/boomb0om/text2image-benchmark/releases/download/v0.0.1/"
                     "MS-COCO_val2014_30k_captions.csv")
CLIP_G14_URL = "https://huggingface.co/laion/CLIP-ViT-g-14-laion2B-s34B-b88K/resolve/main/open_clip_pytorch_model.bin"

ASSETS: dict[str, Asset] = {a.key: a for a in (
    _asset("edm-cifar10-teacher", "EDM CIFAR-10 teacher (edm-cifar10-32x32-uncond-vp.pkl)", "teacher",
           f"{EDM_CDN}/pretrained/edm-cifar10-32x32-uncond-vp.pkl", ("cifar10",)),
    _asset("cifar10-fid-ref", "CIFAR-10 FID reference statistics (cifar10-32x32.npz)", "fid-ref",
           f"{EDM_CDN}/fid-refs/cifar10-32x32.npz", ("cifar10",)),
    _asset("edm-imagenet64-teacher", "EDM ImageNet-64 teacher (edm-imagenet-64x64-cond-adm.pkl)", "teacher",
           f"{EDM_CDN}/pretrained/edm-imagenet-64x64-cond-adm.pkl", ("imagenet64",)),
    _asset("imagenet64-fid-ref", "ImageNet-64 FID reference statistics (imagenet-64x64.npz)", "fid-ref",
           f"{EDM_CDN}/fid-refs/imagenet-64x64.npz", ("imagenet64",)),
    _asset("inception-v3-compat", "Inception-v3 weights of torch-fidelity's inception-v3-compat (FID, KID, P/R)",
           "feature-weights", INCEPTION_URL, ("cifar10", "imagenet64", "lsun_bedroom", "ms_coco"),
           sha256_prefix=hub_sha256_prefix(INCEPTION_URL.rsplit("/", 1)[-1]), torch_hub=True),
    _asset("dinov2-vitl14", "DINOv2 ViT-L/14 weights (FD-DINOv2)", "feature-weights", DINOV2_URL,
           ("cifar10", "imagenet64")),
    # latent suites (sfdbench/suites/latent.py); unpinned: the first download's sha256 is recorded
    _asset("ms-coco-captions-30k", "MS-COCO val2014 30k captions (text2image-benchmark CSV, column text)", "captions",
           COCO_CAPTIONS_URL, ("ms_coco",)),
    _asset("clip-vit-g14-laion2b", "open_clip ViT-g-14 laion2b_s34b_b88k weights (CLIP score)", "feature-weights",
           CLIP_G14_URL, ("ms_coco",)),
)}


def get_asset(key: str) -> Asset:
    if key not in ASSETS:
        raise BadInput(f"unknown asset {key!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[key]


def assets_for_suite(suite: str) -> list[Asset]:
    """The assets a suite uses (empty for suites that download nothing, e.g. the embedded ones)."""
    return [a for a in ASSETS.values() if suite in a.suites]


def locate(asset: Asset) -> Path | None:
    """The asset's file if present: ``asset.path`` first, then (torch hub assets) torch hub's copy."""
    if asset.path.is_file():
        return asset.path
    hub = asset.hub_path()
    return hub if hub is not None and hub.is_file() else None


def status() -> list[tuple[str, Asset, bool]]:
    """(key, asset, present) for every known asset."""
    return [(key, asset, locate(asset) is not None) for key, asset in ASSETS.items()]


# ----------------------------------------------------------------------------- checksums


def read_record(asset: Asset) -> dict | None:
    """The first-download record (sidecar) of the cache copy, or None when there is none."""
    path = asset.sidecar_path
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError("no sha256 field")
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read the checksum record {path} ({exc}); delete it (the next download "
                       "records a new one)") from None
    return record


def expected_sha256(asset: Asset, path: Path | None = None) -> tuple[str | None, str]:
    """(expected hex digest or prefix, source): source 'pinned', 'first download' or 'unverified local file'.

    The first-download record applies to the cache copy only (``path`` None or ``asset.path``)."""
    if asset.sha256:
        return asset.sha256.lower(), "pinned"
    if asset.sha256_prefix:
        return asset.sha256_prefix.lower(), "pinned"
    if path is None or Path(path) == asset.path:
        record = read_record(asset)
        if record is not None:
            return record["sha256"].lower(), "first download"
    return None, "unverified local file"


def _mismatch(asset: Asset, path: Path, expected: str, actual: str, source: str) -> str:
    what = "pinned sha256" if source == "pinned" else f"sha256 recorded at first download ({asset.sidecar_path})"
    return f"{asset.key}: {path} has sha256 {actual}, expected {what} {expected}"


def verify(asset: Asset) -> dict:
    """Recompute the sha256 of the present file and compare it with the pin or the first-download record.

    Returns ``{"key", "path", "sha256", "expected", "source", "ok"}`` (``ok`` None: nothing to compare
    with, an unpinned file placed by hand); ``MissingAsset`` when the file is absent."""
    path = asset.require()
    actual = sha256_file(path)
    expected, source = expected_sha256(asset, path)
    ok = None if expected is None else actual.startswith(expected)
    return {"key": asset.key, "path": str(path), "sha256": actual, "expected": expected, "source": source,
            "ok": ok}


def asset_provenance(key: str) -> dict:
    """What a run record says about an asset: ``{"key", "file", "url", "sha256", "pinned", "source"}``.

    ``source`` is 'pinned' (the registry's sha256 or prefix), 'first download' (the sidecar recorded at
    the first download) or 'unverified local file' (placed by hand, nothing to compare with).
    ``MissingAsset`` (exit 3) when the file is missing or its sha256 disagrees with the pin or record."""
    asset = get_asset(key)
    result = verify(asset)
    if result["ok"] is False:
        raise MissingAsset(_mismatch(asset, Path(result["path"]), result["expected"], result["sha256"],
                                     result["source"]) + f"; delete it and run {asset.download_command()}")
    return {"key": key, "file": asset.filename, "url": asset.url, "sha256": result["sha256"],
            "pinned": result["source"] == "pinned", "source": result["source"]}


# ----------------------------------------------------------------------------- download


def _failed(asset: Asset, why: str) -> MissingAsset:
    part = asset.part_path
    kept = part.stat().st_size if part.is_file() else 0
    resume = (f"{kept} bytes kept in {part}; rerun {asset.download_command()} to resume" if kept
              else f"rerun {asset.download_command()} when online")
    return MissingAsset(f"cannot download {asset.key} from {asset.url} ({why}); {resume}, or download it yourself "
                        f"and put it at {asset.path}")


def _content_range(header: str | None) -> tuple[int, int | None] | None:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None)."""
    try:
        unit, _, spec = (header or "").partition(" ")
        span, _, total = spec.partition("/")
        if unit.strip() != "bytes":
            return None
        return int(span.split("-")[0]), (None if total.strip() in ("", "*") else int(total))
    except ValueError:
        return None


def download(asset: Asset, progress: ProgressCallback | None = None, chunk: int = 1 << 20,
             timeout: float = 60.0) -> Path:
    """Fetch ``asset`` into ``asset.path`` (nothing to do when it is already present) and return the path.

    Streams into ``<path>.part``, resuming a partial file with ``Range: bytes=N-`` (206: append; 200:
    the server ignored the range, start again from zero; 416: the partial file is already complete).
    When complete the sha256 is compared with the pin, the prefix or the first-download record: a
    mismatch deletes the file and raises ``MissingAsset`` naming both hashes; otherwise ``.part`` is
    renamed into place atomically and (unpinned assets' first download) the sha256 is recorded in
    ``<path>.sha256``. Network errors raise ``MissingAsset`` with the URL, the bytes kept for resume
    and the manual alternative."""
    present = locate(asset)
    if present is not None:
        return present
    asset.path.parent.mkdir(parents=True, exist_ok=True)
    with _download_lock(asset):
        present = locate(asset)  # another process may have finished it just before
        return present if present is not None else _download(asset, progress, chunk, timeout)


@contextmanager
def _download_lock(asset: Asset):
    """One download per file at a time (two appending to the same .part would corrupt it); POSIX only."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(asset.path.with_name(asset.filename + ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MissingAsset(f"another process is downloading {asset.key} into {asset.path}; wait for it to "
                               f"finish, then rerun {asset.download_command()}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(asset: Asset, progress: ProgressCallback | None, chunk: int, timeout: float) -> Path:
    part = asset.part_path
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(asset.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code != 416 or not offset:
            raise _failed(asset, f"HTTP {exc.code} {exc.reason}") from None
        total = offset  # 416 Range Not Satisfiable: the partial file already holds everything
        response = None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _failed(asset, _reason(exc)) from None
    if response is not None:
        with response:
            total = _stream(asset, response, part, offset, progress, chunk)
    if progress is not None:
        progress(part.stat().st_size, total)
    return _finish(asset, part)


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def _stream(asset: Asset, response, part: Path, offset: int, progress: ProgressCallback | None,
            chunk: int) -> int | None:
    """Write the response body into ``part`` (appending on 206); return the expected total size."""
    status = response.status
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if status == 206:
        span = _content_range(response.headers.get("Content-Range"))
        if span is None or span[0] != offset:
            part.unlink(missing_ok=True)
            raise _failed(asset, f"the server answered range {response.headers.get('Content-Range')!r} to a "
                                 f"request from byte {offset}; the partial file was deleted")
        total = span[1] if span[1] is not None else (offset + length if length is not None else None)
        mode = "ab"
    elif status == 200:  # a fresh download, or the server ignored the range: start again from zero
        offset, total, mode = 0, length, "wb"
    else:
        raise _failed(asset, f"HTTP {status}")
    done = offset
    if progress is not None:
        progress(done, total)
    try:
        with open(part, mode) as f:
            while True:
                block = response.read(chunk)
                if not block:
                    break
                f.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
            f.flush()
            os.fsync(f.fileno())
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _failed(asset, f"interrupted after {done} bytes: {_reason(exc)}") from None
    if total is not None and done < total:
        raise _failed(asset, f"the connection closed after {done} of {total} bytes")
    return total


def _finish(asset: Asset, part: Path) -> Path:
    """Check the complete ``part`` (size, sha256), rename it into place, record its sha256 when unpinned."""
    actual = sha256_file(part)
    expected, source = expected_sha256(asset)
    size = part.stat().st_size
    problem = None
    if expected is not None and not actual.startswith(expected):
        problem = _mismatch(asset, asset.path, expected, actual, source)
    elif asset.size is not None and size != asset.size:
        problem = f"{asset.key}: downloaded {size} bytes, expected {asset.size}"
    if problem is not None:
        part.unlink(missing_ok=True)
        asset.path.unlink(missing_ok=True)
        hint = ("the server sent something else or the file changed upstream" if source != "first download" else
                f"the file changed upstream since the first download; delete {asset.sidecar_path} to trust the new one")
        raise MissingAsset(f"{problem} (downloaded from {asset.url}; the file was deleted: {hint})")
    os.replace(part, asset.path)
    if not asset.sidecar_path.is_file():  # pinned assets get one too (url, date); unpinned: trust on first use
        record = {"sha256": actual, "url": asset.url, "size": size,
                  "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pinned": asset.pinned}
        atomic_write_bytes(asset.sidecar_path, (json.dumps(record, indent=2) + "\n").encode())
    return asset.path
