"""File I/O shared by every layer: atomic writes, sha256 of files, the cache directory.

One copy of each: records, checkpoints, fits, reference statistics and reports are all written
through ``atomic_write_bytes`` (a temp file in the same folder, fsync, then an atomic rename), so a
reader never sees half a file and an interrupted write leaves the old one in place.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import cache
from pathlib import Path


def cache_dir() -> Path:
    """``$SFDBENCH_CACHE`` or ``~/.cache/sfdbench`` (assets, reference statistics, CLIP weights)."""
    return Path(os.environ.get("SFDBENCH_CACHE") or Path.home() / ".cache" / "sfdbench")


def umask_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@cache
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file, streamed and computed once per (path, size, mtime)."""
    st = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
