"""Test helper: write network pickles in NVIDIA EDM's snapshot format, and hostile pickles.

EDM (Karras et al. 2022, arXiv 2206.00364) pickles every network class as
``REDUCE(GLOBAL torch_utils.persistence._reconstruct_persistent_obj, (meta,))`` with
``meta = {type: 'class', version: 6, module_src, class_name, state}`` and ``state`` the object's
``nn.Module.__dict__``; ``enc`` / ``dec`` are ``torch.nn.ModuleDict``s pickled the normal way (NEWOBJ +
BUILD); tensors go through torch's own reduce (``_rebuild_parameter`` / ``_rebuild_tensor_v2`` /
``torch.storage._load_from_bytes`` with a legacy ``torch.save`` payload); see the docstring of
``sfdbench/networks/edm_pickle.py``. This file writes that format from one of our own modules built by
``sfdbench.networks.edm.build_precond``; nothing here comes from EDM's code.

To emit ``GLOBAL torch_utils.persistence._reconstruct_persistent_obj`` the writer installs a fake
``torch_utils.persistence`` module in ``sys.modules`` while it pickles (and removes it afterwards).
For numpy 1.x files it likewise stands in a fake ``numpy.core.multiarray`` for the duration of one dump.

Test code only: not part of the package.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import pickle
import pickletools
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sfdbench.networks.edm import build_precond

#: A stand-in for training/networks.py's source text (EDM stores the whole file in every object).
NETWORKS_SRC = "# training/networks.py (sfdbench test stand-in; never executed)\nimport torch\n"
LOSS_SRC = "# training/loss.py (sfdbench test stand-in; never executed)\n"
AUGMENT_SRC = "# training/augment.py (sfdbench test stand-in; never executed)\n"

EDM_MODULE_CLASSES = {"EDMPrecond", "VPPrecond", "VEPrecond", "SongUNet", "DhariwalUNet", "UNetBlock", "Conv2d",
                      "Linear", "GroupNorm", "PositionalEmbedding", "FourierEmbedding"}
HOOK_DICTS = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")

# Tiny configurations (the released ones are in sfdbench.networks.edm: CIFAR10_DDPMPP_CONFIG, ...).
TINY_DDPMPP = {"model_type": "SongUNet", "embedding_type": "positional", "encoder_type": "standard",
               "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1], "model_channels": 16,
               "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "augment_dim": 9, "dropout": 0.13,
               "use_fp16": False, "img_resolution": 8, "img_channels": 3, "label_dim": 0}
TINY_ADM = {"model_type": "DhariwalUNet", "model_channels": 64, "channel_mult": [1, 1], "num_blocks": 1,
            "attn_resolutions": [4], "dropout": 0.1, "use_fp16": True, "img_resolution": 8, "img_channels": 3,
            "label_dim": 10}


# --------------------------------------------------------------------------------------------------
# The fake torch_utils.persistence (and numpy.core.multiarray) used only while pickling


def _reconstruct_persistent_obj(meta):  # pragma: no cover - only its name is pickled
    raise RuntimeError("sfdbench test stand-in: never called")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
_reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"


def _numpy1_scalar(dtype, data):  # pragma: no cover - only its name is pickled
    raise RuntimeError("sfdbench test stand-in: never called")


_numpy1_scalar.__module__ = "numpy.core.multiarray"
_numpy1_scalar.__qualname__ = "scalar"
_numpy1_scalar.__name__ = "scalar"


@contextlib.contextmanager
def _fake_modules(numpy1: bool):
    fakes = {"torch_utils": types.ModuleType("torch_utils"),
             "torch_utils.persistence": types.ModuleType("torch_utils.persistence")}
    fakes["torch_utils"].persistence = fakes["torch_utils.persistence"]
    fakes["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    if numpy1:
        fakes["numpy.core.multiarray"] = types.ModuleType("numpy.core.multiarray")
        fakes["numpy.core.multiarray"].scalar = _numpy1_scalar
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


class _Pickler(pickle.Pickler):
    """The C pickler; with ``numpy1`` numpy scalars are written as numpy 1.x does (numpy.core.multiarray)."""

    def __init__(self, file, numpy1: bool):
        super().__init__(file, protocol=4)
        self.numpy1 = numpy1

    def reducer_override(self, obj):
        if self.numpy1 and isinstance(obj, np.generic):
            return _numpy1_scalar, (obj.dtype, obj.tobytes())
        return NotImplemented


def dumps(obj, numpy1: bool = False) -> bytes:
    """Pickle ``obj`` (protocol 4, like EDM's ``pickle.dump`` on Python 3.8+) with the fake EDM modules installed."""
    buf = io.BytesIO()
    with _fake_modules(numpy1):
        _Pickler(buf, numpy1).dump(obj)
    return buf.getvalue()


def splice_deep_list(data: bytes, placeholder: str, depth: int) -> bytes:
    """Replace the short string ``placeholder`` in a protocol-4 pickle by a list nested ``depth`` deep, which
    the pickler itself cannot write (EMPTY_LIST x depth, then APPEND x (depth - 1)), fixing the
    length of the FRAME that holds it."""
    raw = placeholder.encode()
    op = b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE
    assert data.count(op) == 1
    pos = data.index(op)
    frame = max(p for o, _, p in pickletools.genops(data) if o.name == "FRAME" and p < pos)
    size = int.from_bytes(data[frame + 1: frame + 9], "little")
    assert frame + 9 + size >= pos + len(op)
    new = b"]" * depth + b"a" * (depth - 1)
    size += len(new) - len(op)
    return data[: frame + 1] + size.to_bytes(8, "little") + data[frame + 9: pos] + new + data[pos + len(op):]


# --------------------------------------------------------------------------------------------------
# EDM persistent objects


class Persistent:
    """Pickles as EDM's persistent objects do: REDUCE(GLOBAL torch_utils.persistence._reconstruct_persistent_obj,
    (meta,)), with no BUILD after it."""

    def __init__(self, meta: dict):
        self.meta = meta

    def __reduce__(self):
        return _reconstruct_persistent_obj, (self.meta,)


def persistent(class_name: str, state: dict, module_src: str = NETWORKS_SRC, **meta_overrides) -> Persistent:
    meta = {"type": "class", "version": 6, "module_src": module_src, "class_name": class_name, "state": state}
    for key, value in meta_overrides.items():
        if value is _DROP:
            meta.pop(key)
        else:
            meta[key] = value
    return Persistent(meta)


_DROP = object()  # pass as a meta override to remove that field


def _np_floats(value):
    """Floats as numpy float64 (EDM's skip_scale, init_weight... are np.float64), recursively."""
    if type(value) is float:
        return np.float64(value)
    if isinstance(value, dict):
        return {k: _np_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_np_floats(v) for v in value]
    return value


class _Writer:
    def __init__(self, ordered: bool, numpy_floats: bool, module_src: str, class_overrides: dict[str, str]):
        self.mapping = OrderedDict if ordered else dict
        self.numpy_floats = numpy_floats
        self.module_src = module_src
        self.class_overrides = class_overrides  # dotted module name -> class_name written instead
        self.init_kwargs: dict[str, dict] = {}  # dotted module name -> its _init_kwargs

    def module_state(self, m: nn.Module, init_kwargs: dict, attributes: dict) -> dict:
        params = self.mapping((n, nn.Parameter(p.detach(), requires_grad=False))
                              for n, p in m._parameters.items() if p is not None)
        buffers = self.mapping(m._buffers.items())
        if type(m).__name__ == "Conv2d":
            buffers.setdefault("resample_filter", None)  # EDM registers it in every Conv2d
        state: dict[str, Any] = {"training": False, "_parameters": params, "_buffers": buffers,
                                 "_non_persistent_buffers_set": set()}
        for key in HOOK_DICTS:
            state[key] = OrderedDict()
        state["_is_full_backward_hook"] = None
        state["_modules"] = self.mapping()
        for n, p in m._parameters.items():
            if p is None:  # EDM leaves these as plain attributes (kernel-0 conv weight, bias=False...)
                attributes.setdefault(n, None)
        state.update(attributes)
        state["_init_args"] = ()
        state["_init_kwargs"] = _np_floats(init_kwargs) if self.numpy_floats else init_kwargs
        return state

    def convert(self, m: nn.Module, name: str, init_kwargs: dict | None = None, attributes: dict | None = None):
        cls = type(m).__name__
        if attributes is None:
            simple = (int, float, bool, str, type(None))
            attributes = {k: v for k, v in vars(m).items()
                          if not k.startswith("_") and k != "training" and type(v) in simple}
            if "skip_scale" in attributes and attributes["skip_scale"] != 1:
                attributes["skip_scale"] = np.float64(attributes["skip_scale"])  # DDPM++: np.sqrt(0.5)
        if init_kwargs is None:
            init_kwargs = self.init_kwargs.get(name)
        if init_kwargs is None:
            init_kwargs = {k: v for k, v in attributes.items() if type(v) in (int, float, bool, str)}
        state = self.module_state(m, init_kwargs, attributes)
        for child_name, child in m._modules.items():
            dotted = f"{name}.{child_name}" if name else child_name
            if child is None:
                state[child_name] = None
            elif isinstance(child, nn.ModuleDict):
                state["_modules"][child_name] = self.module_dict(child, dotted)
            elif type(child).__name__ in EDM_MODULE_CLASSES:
                state["_modules"][child_name] = self.convert(child, dotted)
            # anything else (our parameter-free helpers such as nn.Identity) is not in EDM's files
        return persistent(self.class_overrides.get(name, cls), state, self.module_src)

    def module_dict(self, md: nn.ModuleDict, name: str) -> nn.ModuleDict:
        """A real torch.nn.ModuleDict whose __dict__ is EDM-like: it pickles as NEWOBJ + BUILD."""
        state = self.module_state(md, {}, {})
        del state["_init_args"], state["_init_kwargs"]
        for key, child in md.items():
            state["_modules"][key] = self.convert(child, f"{name}.{key}")
        out = nn.ModuleDict.__new__(nn.ModuleDict)
        object.__setattr__(out, "__dict__", state)
        return out


def edm_snapshot(net: nn.Module, precond_class: str, init_kwargs: dict, *, ordered: bool = False,
                 numpy_floats: bool = True, module_src: str = NETWORKS_SRC, augment: bool = True,
                 class_overrides: dict[str, str] | None = None) -> dict:
    """The object EDM's training loop pickles: {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}."""
    writer = _Writer(ordered, numpy_floats, module_src, class_overrides or {})
    attrs = {k: getattr(net, k) for k in ("img_resolution", "img_channels", "label_dim", "use_fp16")}
    if precond_class == "EDMPrecond":
        attrs.update(sigma_min=0, sigma_max=float("inf"), sigma_data=float(net.sigma_data))
    elif precond_class == "VPPrecond":
        attrs.update(beta_d=net.beta_d, beta_min=net.beta_min, M=net.M, epsilon_t=net.epsilon_t,
                     sigma_min=net.precond_sigma_min, sigma_max=net.precond_sigma_max)
    else:
        attrs.update(sigma_min=net.precond_sigma_min, sigma_max=net.precond_sigma_max)
    unet_kwargs = {k: v for k, v in init_kwargs.items()
                   if k not in ("img_channels", "use_fp16", "model_type", "sigma_min", "sigma_max", "sigma_data",
                                "beta_d", "beta_min", "M", "epsilon_t")}
    unet_kwargs.update(in_channels=init_kwargs["img_channels"], out_channels=init_kwargs["img_channels"])
    writer.init_kwargs["model"] = unet_kwargs
    ema = writer.convert(net, "", init_kwargs=dict(init_kwargs), attributes=attrs)
    loss = persistent("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5, "_init_args": (),
                                  "_init_kwargs": {}}, LOSS_SRC)
    aug = None
    if augment:
        settings = {"p": 0.12, "xflip": 1e8, "yflip": 1, "rotate_int": 1e8, "translate_int": 1e8,
                    "translate_int_max": 0.125, "scale": 1e8, "rotate_frac": 0, "aniso": 1e8, "translate_frac": 1e8,
                    "scale_std": 0.2, "rotate_frac_max": 1, "aniso_std": 0.2, "aniso_rotate_prob": 0.5,
                    "translate_frac_std": 0.125, "brightness": 1, "contrast": 1, "lumaflip": 0, "hue": 0,
                    "saturation": 1, "brightness_std": 0.2, "contrast_std": 0.5, "hue_max": 1, "saturation_std": 1}
        aug = persistent("AugmentPipe", {**settings, "_init_args": (),
                                         "_init_kwargs": {"p": 0.12, "xflip": 1e8, "yflip": 1, "scale": 1e8}},
                         AUGMENT_SRC)
    dataset = {"class_name": "training.dataset.ImageFolderDataset", "path": "datasets/tiny.zip", "use_labels": False,
               "xflip": False, "cache": True, "resolution": init_kwargs["img_resolution"], "max_size": 50000}
    return {"ema": ema, "loss_fn": loss, "augment_pipe": aug, "dataset_kwargs": dataset}


def write_edm_pickle(path, net: nn.Module, precond_class: str, init_kwargs: dict, *, numpy1: bool = False,
                     edit=None, **options) -> Path:
    """Write ``net`` (built by build_precond(precond_class, init_kwargs)) as an EDM network snapshot.

    ``edit(snapshot_dict)`` may change the snapshot in place before it is pickled (broken-file tests)."""
    top = edm_snapshot(net, precond_class, init_kwargs, **options)
    if edit is not None:
        edit(top)  # in place; its return value is ignored
    path = Path(path)
    path.write_bytes(dumps(top, numpy1=numpy1))
    return path


def tiny_net(precond_class: str, init_kwargs: dict, seed: int = 0) -> nn.Module:
    """build_precond with random weights and non-trivial output (EDM zero-initialises some output convs)."""
    torch.manual_seed(seed)
    net = build_precond(precond_class, init_kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Hostile pickles (each would create ``marker`` if loaded with plain pickle)


def global_call(module: str, name: str, arg) -> bytes:
    """A hand-written protocol-2 pickle: GLOBAL module.name, called with one argument."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps(arg, protocol=2)[2:-1] + b"\x85R."


def touch_command(marker: Path) -> str:
    return f"touch {marker}"


def python_payload(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


class Reduces:
    """An object that pickles as ``func(*args)`` (with the STACK_GLOBAL of ``func``'s real module)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_pickles(marker: Path, valid: dict) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, the text the refusal must contain). ``valid`` is an edm_snapshot dict."""
    marker = Path(marker)
    hidden = dict(valid)
    hidden["dataset_kwargs"] = {**valid["dataset_kwargs"], "path": Reduces(os.system, touch_command(marker))}
    return {
        "os.system": (global_call("os", "system", touch_command(marker)), "GLOBAL os.system"),
        "posix.system": (pickle.dumps(Reduces(os.system, touch_command(marker))),
                         f"GLOBAL {os.system.__module__}.system"),
        "builtins.exec": (pickle.dumps(Reduces(builtins.exec, python_payload(marker))), "GLOBAL builtins.exec"),
        "builtins.eval": (global_call("builtins", "eval", python_payload(marker)), "GLOBAL builtins.eval"),
        "__builtin__.eval": (global_call("__builtin__", "eval", python_payload(marker)), "GLOBAL __builtin__.eval"),
        "subprocess.check_call": (pickle.dumps(Reduces(subprocess.check_call, ["touch", str(marker)])),
                                  "GLOBAL subprocess.check_call"),
        "hidden in dataset_kwargs": (dumps(hidden), f"GLOBAL {os.system.__module__}.system"),
    }


def unknown_class_pickle(marker: Path) -> tuple[bytes, str]:
    """A persistent object of a class EDM does not have, whose module_src would write ``marker`` if exec'd."""
    src = f"{python_payload(marker)}\nclass Evil:\n    pass\n"
    return dumps({"ema": persistent("Evil", {"_init_args": (), "_init_kwargs": {}}, src)}), src


class _WithPersistentIds(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", "evil") if isinstance(obj, torch.Tensor) else None


def persistent_id_pickle() -> bytes:
    buf = io.BytesIO()
    _WithPersistentIds(buf, protocol=4).dump({"ema": {"weight": torch.zeros(3)}})
    return buf.getvalue()
