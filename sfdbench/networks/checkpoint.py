"""Checkpoint I/O: safetensors weights plus a JSON sidecar. Loading never executes code."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sfdbench.errors import BadInput
from sfdbench.io import atomic_write_bytes, umask_mode


def save_weights(module: nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """Save ``module``'s state dict to ``path`` (safetensors) and ``metadata`` next to it as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, tmp, metadata={"sfdbench": json.dumps(metadata, sort_keys=True)})
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_bytes(sidecar(path), (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata stored inside a safetensors file by ``save_weights``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("sfdbench", "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInput(f"cannot read weights file {path}: {exc}; re-create it or pass a valid file") from exc


def load_weights(module: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into ``module`` strictly; corrupt or mismatched files are BadInput."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"weights file {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInput(f"corrupt weights file {path} ({exc}); re-create it or pass a valid file") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "shape mismatch"
        raise BadInput(f"weights file {path} does not match the network ({first})") from exc
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise BadInput(f"weights file {path} holds non-finite values in {bad[0]}")
    return module
