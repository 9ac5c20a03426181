"""Read NVIDIA EDM network snapshots (``edm-*.pkl``, ``network-snapshot-*.pkl``) without running their code.

EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv 2206.00364) ships its networks as plain pickles. Each network class pickles as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` carries the full
source text of the module that defined the class (``module_src``). EDM's own loader ``exec``s that
source. This module never compiles or executes it: it only hashes it for logging.

The format, as this module reads it (see also ``docs/suites.md#paper-suites``):

* the file is one pickle (protocol 4) of a dict ``{'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}``;
  ``ema`` is the preconditioning wrapper (``EDMPrecond`` / ``VPPrecond`` / ``VEPrecond``) holding the
  U-Net (``SongUNet`` / ``DhariwalUNet``) as submodule ``model``; the other entries are parsed and dropped;
* ``meta = {type: 'class', version: 6, module_src, class_name, state}``; ``state`` is the object's
  ``__dict__``: for modules ``_parameters``, ``_buffers`` (``None`` entries, e.g. a non-resampling
  ``Conv2d``'s ``resample_filter``, are skipped), ``_modules`` (children, or a ``torch.nn.ModuleDict``
  pickled by NEWOBJ + BUILD for ``enc`` / ``dec``), hook dicts, plain attributes, and the constructor
  arguments ``_init_args`` / ``_init_kwargs`` (numpy float64 values included);
* tensors pickle through torch's own reduce: ``_rebuild_parameter(_rebuild_tensor_v2(
  _load_from_bytes(payload), offset, size, stride, ...))``, where ``payload`` is a legacy
  ``torch.save`` stream of one storage.

Walking ``_parameters``, the non-``None`` ``_buffers`` and ``_modules`` with dotted names gives
exactly the wrapper's ``state_dict()`` (``model.`` prefix included).

How loading stays safe:

* ``EDMUnpickler.find_class`` resolves only the eight GLOBALs an EDM snapshot contains (the
  allow-list ``ALLOWED_GLOBALS``: nine module/name pairs, since numpy's ``scalar`` lives in
  ``numpy.core.multiarray`` before numpy 2 and in ``numpy._core.multiarray`` since). Each maps to
  a stand-in written here, never to the real object. Any other GLOBAL (``os.system``,
  ``builtins.eval``, ...) is refused *before* it is resolved, so it never runs. Persistent ids are refused too.
* A persistent object becomes a ``PersistentRecord`` ``(class_name, state, module_src_sha256)``
  after its metadata is checked (type ``'class'``, version 6, exactly five fields, one of EDM's
  class names).
* Tensor storages are decoded with ``torch.load(..., weights_only=True)``; tensors are rebuilt by
  torch's own ``_rebuild_tensor_v2`` after their arguments are checked.
* The weights are then copied (``load_state_dict(strict=True)``) into our own network, built by
  ``sfdbench.networks.edm.build_precond`` from the constructor arguments stored in the pickle.
  No class named in the file is ever instantiated.

Every refusal is a ``BadInput`` (exit code 2) whose message names what the file asked for.

Converted teachers: ``convert_to_safetensors`` writes the weights as safetensors with the
configuration as JSON in the file's metadata (and in a sidecar, like every sfdbench checkpoint);
``load_teacher`` accepts both the pickle and the converted file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import reprlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sfdbench.errors import BadInput
from sfdbench.io import sha256_file

#: The value of ``format`` in a converted teacher's safetensors metadata.
FORMAT = "sfdbench-edm-teacher"
FORMAT_VERSION = 1

#: The preconditioning wrappers we can build (``ema`` must be one of these).
PRECOND_CLASSES = ("EDMPrecond", "VPPrecond", "VEPrecond")
#: The U-Nets a wrapper's ``model`` may be.
UNET_CLASSES = ("SongUNet", "DhariwalUNet")
#: ``model_type`` defaults of EDM's wrappers, used when ``_init_kwargs`` does not name it.
DEFAULT_MODEL_TYPE = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet", "VEPrecond": "SongUNet"}
#: EDM's persistent classes that are ``torch.nn.Module``s.
MODULE_CLASSES = frozenset({
    "EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "SongUNet", "DhariwalUNet", "UNetBlock",
    "Conv2d", "Linear", "GroupNorm", "PositionalEmbedding", "FourierEmbedding",
})
#: EDM's persistent classes that are plain objects (losses, the augmentation pipe).
PLAIN_CLASSES = frozenset({"EDMLoss", "VPLoss", "VELoss", "AugmentPipe"})
KNOWN_CLASSES = MODULE_CLASSES | PLAIN_CLASSES

#: (module, name) pairs an EDM network pickle may ask for; everything else is refused.
ALLOWED_GLOBALS = frozenset({
    ("torch_utils.persistence", "_reconstruct_persistent_obj"),
    ("torch.storage", "_load_from_bytes"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"),
    ("torch.nn.modules.container", "ModuleDict"),
    ("numpy.core.multiarray", "scalar"),  # written by numpy < 2
    ("numpy._core.multiarray", "scalar"),  # written by numpy >= 2
    ("numpy", "dtype"),
})

_META_FIELDS = frozenset({"type", "version", "module_src", "class_name", "state"})
_NUMERIC_DTYPES = frozenset({"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"})
_MAX_DEPTH = 64  # EDM's module trees are 4 deep
_PRECOND_ATTRIBUTES = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                       "sigma_data", "beta_d", "beta_min", "M", "epsilon_t")


class _Refusal(Exception):
    """Raised inside the unpickler; turned into ``BadInput("refusing to load PATH: <reason>")``."""


# --------------------------------------------------------------------------------------------------
# Stand-ins returned by find_class


class PersistentRecord:
    """What an EDM persistent object becomes: its class name, its state, and a hash of its source.

    The source itself is dropped after hashing; it is never compiled or executed.
    """

    __slots__ = ("class_name", "state", "module_src_sha256")

    def __init__(self, class_name: str, state: dict, module_src_sha256: str):
        self.class_name = class_name
        self.state = state
        self.module_src_sha256 = module_src_sha256

    def __setstate__(self, state):
        raise _Refusal(f"it applies BUILD to a {self.class_name} object, which an EDM network pickle never does")

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name!r}, src sha256 {self.module_src_sha256[:12]})"


class ModuleDictRecord:
    """Stand-in for ``torch.nn.ModuleDict`` (EDM's ``enc`` / ``dec``): it only keeps its state dict."""

    __slots__ = ("state",)
    class_name = "ModuleDict"

    def __init__(self, *args, **kwargs):
        if args or kwargs:
            raise _Refusal("it calls torch.nn.modules.container.ModuleDict with arguments, which an EDM "
                           "network pickle never does")

    def __setstate__(self, state):
        if hasattr(self, "state"):
            raise _Refusal("it applies BUILD twice to a ModuleDict")
        if type(state) is not dict:
            raise _Refusal(f"its ModuleDict state is a {type(state).__name__}, not a dict")
        self.state = state

    def __repr__(self) -> str:
        return "ModuleDictRecord()"


class _StandIn:
    """A callable returned by ``find_class`` in place of the real global; it has no attributes to tamper with."""

    __slots__ = ("_name", "_fn")

    def __init__(self, name: str, fn):
        self._name = name
        self._fn = fn

    def __call__(self, *args):
        return self._fn(*args)

    def __setstate__(self, state):
        raise _Refusal(f"it applies BUILD to {self._name}, which an EDM network pickle never does")

    def __repr__(self) -> str:
        return f"<stand-in for {self._name}>"


class _StorageHandle:
    """A decoded tensor storage; only ``_rebuild_tensor_v2``'s stand-in unwraps it."""

    __slots__ = ("storage",)

    def __init__(self, storage):
        self.storage = storage

    def __setstate__(self, state):
        raise _Refusal("it applies BUILD to a tensor storage, which an EDM network pickle never does")


class _DType:
    """Stand-in for ``numpy.dtype``: a numeric type code and, after BUILD, a byte order."""

    __slots__ = ("code", "order", "built")

    def __init__(self, code: str):
        self.code = code
        self.order = "="
        self.built = False

    def __setstate__(self, state):
        if self.built:
            raise _Refusal("it applies BUILD twice to a numpy dtype")
        if (type(state) is not tuple or len(state) not in (8, 9) or state[1] not in ("<", ">", "|", "=")
                or any(s is not None for s in state[2:5])):
            raise _Refusal(f"its numpy dtype {self.code!r} has an unexpected state {_short(state)}")
        self.order = state[1]
        self.built = True


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def _short(obj: Any, limit: int = 80) -> str:
    """A bounded repr for messages (the object may be huge or deeply nested)."""
    text = _REPR.repr(obj).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(x) -> bool:
    return type(x) is int


class EDMUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only the GLOBALs of an EDM network pickle, to safe stand-ins.

    ``find_class`` refuses every other (module, name) before anything is imported or called;
    ``persistent_load`` refuses every persistent id. Refusals raise ``_Refusal``; use
    ``read_edm_pickle`` for the user-facing ``BadInput``.
    """

    def __init__(self, file):
        super().__init__(file)
        self._src_hashes: dict[str, str] = {}
        scalar = _StandIn("numpy scalar", self._scalar)
        rebuild_parameter = _StandIn("torch._utils._rebuild_parameter", self._rebuild_parameter)
        self._stand_ins = {
            ("torch_utils.persistence", "_reconstruct_persistent_obj"):
                _StandIn("torch_utils.persistence._reconstruct_persistent_obj", self._persistent_obj),
            ("torch.storage", "_load_from_bytes"): _StandIn("torch.storage._load_from_bytes", self._load_from_bytes),
            ("torch._utils", "_rebuild_tensor_v2"): _StandIn("torch._utils._rebuild_tensor_v2", self._rebuild_tensor),
            ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
            ("collections", "OrderedDict"): OrderedDict,
            ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
            ("numpy.core.multiarray", "scalar"): scalar,
            ("numpy._core.multiarray", "scalar"): scalar,
            ("numpy", "dtype"): _StandIn("numpy.dtype", self._dtype),
        }
        assert set(self._stand_ins) == ALLOWED_GLOBALS

    def find_class(self, module, name):
        try:
            return self._stand_ins[(module, name)]
        except (KeyError, TypeError):
            raise _Refusal(f"it asks for GLOBAL {module}.{name}, which an EDM network pickle never contains") from None

    def persistent_load(self, pid):
        raise _Refusal(f"it uses a persistent id ({_short(pid, 60)}), which an EDM network pickle never contains")

    # -- stand-ins -------------------------------------------------------------------------------

    def _persistent_obj(self, meta):
        if type(meta) is not dict:
            raise _Refusal(f"it holds a persistent object whose metadata is a {type(meta).__name__}, not a dict")
        keys = set(meta)
        if keys != _META_FIELDS:
            extra, missing = sorted(map(str, keys - _META_FIELDS)), sorted(_META_FIELDS - keys)
            raise _Refusal("it holds a persistent object whose metadata fields are not EDM's five "
                           f"(extra: {extra or 'none'}, missing: {missing or 'none'})")
        class_name = meta["class_name"]
        if type(class_name) is not str or class_name not in KNOWN_CLASSES:
            raise _Refusal(f"it holds a persistent object of class {_short(class_name, 60)}, which is not one of "
                           "EDM's network, loss or augmentation classes")
        if meta["type"] != "class" or type(meta["type"]) is not str:
            raise _Refusal(f"its {class_name} object has persistent type {_short(meta['type'], 40)}, not 'class'")
        if not _is_int(meta["version"]) or meta["version"] != 6:
            raise _Refusal(f"its {class_name} object has persistence version {_short(meta['version'], 40)}, "
                           "not EDM's 6")
        src = meta["module_src"]
        if type(src) is not str:
            raise _Refusal(f"its {class_name} object's module_src is a {type(src).__name__}, not source text")
        if type(meta["state"]) is not dict:
            raise _Refusal(f"its {class_name} object's state is a {type(meta['state']).__name__}, not a dict")
        digest = self._src_hashes.get(src)
        if digest is None:  # hashed for logging only: never compiled, never executed
            digest = self._src_hashes[src] = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()
        return PersistentRecord(class_name, meta["state"], digest)

    @staticmethod
    def _load_from_bytes(payload):
        if type(payload) is not bytes:
            raise _Refusal(f"a tensor storage payload is a {type(payload).__name__}, not bytes")
        try:  # torch's restricted loader; the caller silences "TypedStorage is deprecated"
            storage = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any failure of the restricted loader means a bad payload
            raise _Refusal(f"a tensor storage is not a valid torch storage ({type(exc).__name__}: "
                           f"{_short(str(exc), 120)})") from None
        if type(storage) is not torch.storage.TypedStorage or storage.device.type != "cpu":
            raise _Refusal(f"a tensor storage payload holds a {type(storage).__name__}, not a storage")
        return _StorageHandle(storage)

    @staticmethod
    def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
        if type(storage) is not _StorageHandle:
            raise _Refusal(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
        ok = (_is_int(offset) and offset >= 0 and type(size) is tuple and type(stride) is tuple
              and len(size) == len(stride) <= 16 and all(_is_int(s) and s >= 0 for s in size + stride)
              and type(requires_grad) is bool and type(hooks) in (dict, OrderedDict) and not hooks
              and (metadata is None or (type(metadata) is dict and not metadata)))
        if not ok:
            raise _Refusal(f"a tensor has invalid arguments (offset {_short(offset, 20)}, size {_short(size, 40)}, "
                           f"stride {_short(stride, 40)})")
        typed = storage.storage
        numel = math.prod(size)
        if numel > 0:  # in bounds, and no more elements than the storage holds (no broadcast views)
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= typed.size() or numel > typed.size() - offset:
                raise _Refusal(f"a tensor of size {list(size)} reaches past the end of its storage "
                               f"({typed.size()} elements)")
        return torch._utils._rebuild_tensor_v2(typed, offset, size, stride, False, OrderedDict())

    @staticmethod
    def _rebuild_parameter(data, requires_grad, hooks):
        if type(data) is not torch.Tensor or type(requires_grad) is not bool or type(hooks) not in (dict, OrderedDict) \
                or hooks:
            raise _Refusal(f"a parameter is rebuilt from a {type(data).__name__} with unexpected arguments")
        return data

    @staticmethod
    def _dtype(code, align=False, copy=True):
        if type(code) is not str or code not in _NUMERIC_DTYPES or type(align) is not bool or type(copy) is not bool:
            raise _Refusal(f"it asks for numpy dtype {_short(code, 40)}; only numeric dtypes are allowed")
        return _DType(code)

    @staticmethod
    def _scalar(dtype, data):
        if type(dtype) is not _DType:
            raise _Refusal(f"it asks for a numpy scalar of {type(dtype).__name__}; only numeric dtypes are allowed")
        np_dtype = np.dtype(dtype.code).newbyteorder(dtype.order)
        if type(data) is not bytes or len(data) != np_dtype.itemsize:
            raise _Refusal(f"a numpy {dtype.code} scalar has {_short(data, 40)} as its data")
        return np.frombuffer(data, dtype=np_dtype)[0].item()


# --------------------------------------------------------------------------------------------------
# Reading a snapshot


@dataclass
class EDMSnapshot:
    """What an EDM network pickle holds, as plain data.

    ``state_dict`` equals EDM's ``ema.state_dict()`` (same keys, same order, ``model.`` prefix).
    """

    path: Path
    precond_class: str
    precond_init_kwargs: dict[str, Any]
    unet_class: str
    unet_init_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    num_parameters: int
    module_src_sha256: str
    precond_attributes: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        """The JSON-able configuration stored with a converted teacher."""
        return {"precond_class": self.precond_class, "precond_init_kwargs": self.precond_init_kwargs,
                "unet_class": self.unet_class, "unet_init_kwargs": self.unet_init_kwargs,
                "module_src_sha256": self.module_src_sha256}


def _unpickle(path: Path):
    if not path.is_file():
        raise BadInput(f"teacher file {path} does not exist")
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            return EDMUnpickler(f).load()
    except _Refusal as exc:
        raise BadInput(f"refusing to load {path}: {exc}") from None
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - anything else while parsing untrusted bytes is a corrupt file
        raise BadInput(f"cannot read {path} as an EDM network pickle ({type(exc).__name__}: {_short(str(exc), 160)}); "
                       "pass an intact edm-*.pkl or network-snapshot-*.pkl") from None


def _items(mapping, what: str) -> list[tuple[Any, Any]]:
    """The items of a dict or OrderedDict, read without calling methods the pickle could have shadowed."""
    if type(mapping) not in (dict, OrderedDict):
        raise _Refusal(f"its {what} is a {type(mapping).__name__}, not a dict")
    return list(dict.items(mapping))


def _name(key, what: str) -> str:
    if type(key) is not str or not key or "." in key:
        raise _Refusal(f"its {what} has an invalid name {_short(key, 60)}")
    return key


def _plain(value, what: str, strict: bool = True, depth: int = 0):
    """``value`` as JSON-able Python data (tuples become lists); anything else is refused (or repr'd)."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if depth > 16:
        if strict:
            raise _Refusal(f"its {what} is nested more than 16 levels deep")
        return _short(value)
    if type(value) in (list, tuple):
        return [_plain(v, what, strict, depth + 1) for v in value]
    if type(value) in (dict, OrderedDict):
        out = {}
        for k, v in dict.items(value):
            if type(k) is not str:
                if strict:
                    raise _Refusal(f"its {what} has a non-string key {_short(k, 40)}")
                k = _short(k, 40)
            out[k] = _plain(v, f"{what}[{_short(k, 40)}]", strict, depth + 1)
        return out
    if strict:
        raise _Refusal(f"its {what} holds a {type(value).__name__} ({_short(value, 40)}), not plain data")
    return _short(value)


class _Walker:
    """Collects EDM's ``state_dict()`` from a tree of records: parameters, non-None buffers, then children."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}
        self.num_parameters = 0
        self._seen: set[int] = set()

    def walk(self, record, prefix: str, depth: int = 0) -> None:
        where = prefix.rstrip(".") or "network"
        if depth > _MAX_DEPTH:
            raise _Refusal(f"its module tree is deeper than {_MAX_DEPTH} levels at {where}")
        if id(record) in self._seen:
            raise _Refusal(f"its module {where} is also reachable under another name (shared or cyclic modules)")
        self._seen.add(id(record))
        state = getattr(record, "state", None)
        if type(state) is not dict:
            raise _Refusal(f"its {record.class_name} {where} has no state (missing BUILD)")
        for key in ("_parameters", "_buffers", "_modules"):
            if key not in state:
                raise _Refusal(f"its {record.class_name} {where} has no {key}")
        for name, t in _items(state["_parameters"], f"{where} parameters"):
            if t is not None:
                self._add(prefix + _name(name, f"{where} parameters"), t)
                self.num_parameters += t.numel()
        skip = state.get("_non_persistent_buffers_set", set())
        if type(skip) not in (set, frozenset):
            raise _Refusal(f"its {where} _non_persistent_buffers_set is a {type(skip).__name__}, not a set")
        for name, t in _items(state["_buffers"], f"{where} buffers"):
            if t is not None and name not in skip:
                self._add(prefix + _name(name, f"{where} buffers"), t)
        for name, child in _items(state["_modules"], f"{where} submodules"):
            name = _name(name, f"{where} submodules")
            if child is None:
                continue
            if not (type(child) is ModuleDictRecord
                    or (type(child) is PersistentRecord and child.class_name in MODULE_CLASSES)):
                kind = child.class_name if type(child) is PersistentRecord else type(child).__name__
                raise _Refusal(f"its submodule {prefix}{name} is a {kind}, not one of EDM's network modules")
            self.walk(child, f"{prefix}{name}.", depth + 1)

    def _add(self, key: str, t) -> None:
        if (type(t) is not torch.Tensor or t.layout != torch.strided or t.device.type != "cpu" or t._backward_hooks
                or t.requires_grad):
            raise _Refusal(f"its weight {key} is a {type(t).__name__}, not a plain CPU tensor")
        if key in self.state:
            raise _Refusal(f"its weight {key} appears twice")
        self.state[key] = t


def read_edm_pickle(path) -> EDMSnapshot:
    """Parse an EDM network pickle into an ``EDMSnapshot`` without executing anything from it.

    Raises ``BadInput`` naming the reason when the file is not an EDM snapshot, asks for anything
    outside the allow-list, or is corrupt.
    """
    path = Path(path)
    top = _unpickle(path)
    try:
        return _snapshot(path, top)
    except _Refusal as exc:
        raise BadInput(f"refusing to load {path}: {exc}") from None
    except RecursionError:
        raise BadInput(f"refusing to load {path}: its objects are nested too deeply for an EDM snapshot") from None


def _snapshot(path: Path, top) -> EDMSnapshot:
    if type(top) is not dict:
        raise _Refusal(f"it holds a {type(top).__name__}, not the dict of an EDM network snapshot")
    if "ema" not in top:
        keys = ", ".join(sorted(k if type(k) is str else _short(k) for k in top)) or "none"
        raise _Refusal(f"it has no 'ema' network (its keys: {keys}); it is not an EDM network snapshot")
    ema = top["ema"]
    if type(ema) is not PersistentRecord:
        raise _Refusal(f"its 'ema' is a {type(ema).__name__}, not an EDM network")
    if ema.class_name not in PRECOND_CLASSES:
        raise _Refusal(f"its 'ema' is a {ema.class_name}; sfdbench loads {', '.join(PRECOND_CLASSES)}")
    state = ema.state
    modules = _items(state.get("_modules"), f"{ema.class_name} submodules")
    model = dict(modules).get("model")
    if type(model) is not PersistentRecord or model.class_name not in UNET_CLASSES:
        kind = "nothing" if model is None else "a " + getattr(model, "class_name", type(model).__name__)
        raise _Refusal(f"its {ema.class_name} has {kind} as its U-Net 'model', not {' or '.join(UNET_CLASSES)}")
    args = state.get("_init_args", ())
    if type(args) not in (tuple, list) or args:
        raise _Refusal(f"its {ema.class_name} was built with positional arguments {_short(args, 60)}")
    if "_init_kwargs" not in state:
        raise _Refusal(f"its {ema.class_name} has no _init_kwargs (constructor arguments)")
    precond_kwargs = _plain(state["_init_kwargs"], f"{ema.class_name} _init_kwargs")
    if type(precond_kwargs) is not dict:
        raise _Refusal(f"its {ema.class_name} _init_kwargs is not a dict")
    model_type = precond_kwargs.get("model_type", DEFAULT_MODEL_TYPE[ema.class_name])
    if model_type != model.class_name:
        raise _Refusal(f"its {ema.class_name} says model_type {model_type!r} but holds a {model.class_name}")
    unet_kwargs = _plain(model.state.get("_init_kwargs", {}), f"{model.class_name} _init_kwargs", strict=False)

    walker = _Walker()
    walker.walk(ema, "")
    if not walker.state:
        raise _Refusal(f"its {ema.class_name} holds no weights")

    attributes = {k: _plain(state[k], k, strict=False) for k in _PRECOND_ATTRIBUTES if k in state}
    extra: dict[str, Any] = {"keys": [k if type(k) is str else _short(k) for k in top]}
    if "dataset_kwargs" in top:
        extra["dataset_kwargs"] = _plain(top["dataset_kwargs"], "dataset_kwargs", strict=False)
    for key in ("loss_fn", "augment_pipe"):
        obj = top.get(key)
        if type(obj) is PersistentRecord:
            extra[key] = {"class_name": obj.class_name,
                          "init_kwargs": _plain(obj.state.get("_init_kwargs", {}), key, strict=False)}
        elif key in top:
            extra[key] = None if obj is None else type(obj).__name__
    return EDMSnapshot(path=path, precond_class=ema.class_name, precond_init_kwargs=precond_kwargs,
                       unet_class=model.class_name, unet_init_kwargs=unet_kwargs, state_dict=walker.state,
                       num_parameters=walker.num_parameters, module_src_sha256=ema.module_src_sha256,
                       precond_attributes=attributes, extra=extra)


# --------------------------------------------------------------------------------------------------
# Building our network


def _shape(t) -> list[int]:
    return list(t.shape)


def _build(precond_class: str, init_kwargs: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Our wrapper built from the stored config, with ``state`` loaded strictly; eval mode, no grad."""
    from sfdbench.networks.edm import build_precond

    try:
        net = build_precond(precond_class, dict(init_kwargs))
    except BadInput as exc:
        raise BadInput(f"cannot build the {precond_class} network stored in {path}: {exc}") from None
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise BadInput(f"cannot build the {precond_class} network stored in {path} "
                       f"({type(exc).__name__}: {_short(str(exc), 160)})") from None
    expected = net.state_dict()
    for key, t in expected.items():
        if key not in state:
            raise BadInput(f"{path} does not match the {precond_class} network built from its config: it has no "
                           f"weight {key} {_shape(t)}")
        if state[key].shape != t.shape:
            raise BadInput(f"{path} does not match the {precond_class} network built from its config: {key} has "
                           f"shape {_shape(state[key])} in the file but {_shape(t)} in the network")
    for key, t in state.items():
        if key not in expected:
            raise BadInput(f"{path} does not match the {precond_class} network built from its config: it has "
                           f"{key} {_shape(t)}, which the network does not have")
    bad = next((k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise BadInput(f"{path} holds non-finite values in {bad}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "mismatch"
        raise BadInput(f"{path} does not match the {precond_class} network built from its config ({first})") from None
    return net.eval().requires_grad_(False)


def load_edm_pickle(path) -> nn.Module:
    """Our EDM-compatible network (``build_precond``) holding the EMA weights of an EDM pickle.

    Nothing from the file is executed; the returned module is in eval mode with gradients off.
    Its forward is EDM's ``D(x; sigma, class_labels)``.
    """
    snap = read_edm_pickle(path)
    return _build(snap.precond_class, snap.precond_init_kwargs, snap.state_dict, snap.path)


# --------------------------------------------------------------------------------------------------
# Converted teachers (safetensors) and the format-agnostic entry points


def _sniff(path: Path) -> str:
    """'pickle' or 'safetensors', from the first bytes of the file."""
    if not path.is_file():
        raise BadInput(f"teacher file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    raise BadInput(f"{path} is neither an EDM network pickle (.pkl) nor a safetensors teacher; pass an edm-*.pkl "
                   "or a file written by convert_to_safetensors")


def _converted_config(path: Path) -> dict[str, Any]:
    from sfdbench.networks.checkpoint import read_metadata

    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise BadInput(f"{path} is a safetensors file without an sfdbench EDM teacher config; convert the EDM "
                       ".pkl with sfdbench.networks.edm_pickle.convert_to_safetensors")
    if meta.get("format_version") != FORMAT_VERSION or meta.get("precond_class") not in PRECOND_CLASSES \
            or type(meta.get("precond_init_kwargs")) is not dict:
        raise BadInput(f"{path} has an unsupported or incomplete EDM teacher config (format_version "
                       f"{meta.get('format_version')!r}, precond {meta.get('precond_class')!r}); "
                       "convert the .pkl again")
    return meta


def convert_to_safetensors(src, out) -> Path:
    """Convert an EDM pickle to safetensors, with its config as JSON in the file's metadata.

    The network is built and loaded first, so only a teacher that loads is written. The write is
    atomic (``checkpoint.save_weights``), and a JSON sidecar with the same metadata sits next to it.
    """
    from sfdbench.networks.checkpoint import save_weights

    src, out = Path(src), Path(out)
    snap = read_edm_pickle(src)
    net = _build(snap.precond_class, snap.precond_init_kwargs, snap.state_dict, src)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **snap.config(),
            "num_parameters": snap.num_parameters, "source": src.name, "source_sha256": sha256_file(src),
            "precond_attributes": snap.precond_attributes}
    if "dataset_kwargs" in snap.extra:
        meta["dataset_kwargs"] = snap.extra["dataset_kwargs"]
    json.dumps(meta)  # fail before writing anything if the config is not JSON-able
    save_weights(net, out, meta)
    return out


def load_teacher(path) -> nn.Module:
    """An EDM teacher from an EDM ``.pkl`` or from a safetensors file written by ``convert_to_safetensors``.

    The format is decided from the file's content, not its name. Returns our wrapper in eval mode
    with gradients off; its forward is ``D(x, sigma, class_labels=None)``.
    """
    path = Path(path)
    if _sniff(path) == "pickle":
        return load_edm_pickle(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = _converted_config(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInput(f"corrupt teacher file {path} ({exc}); convert the .pkl again") from None
    return _build(meta["precond_class"], meta["precond_init_kwargs"], state, path)


def inspect_teacher(path) -> dict[str, Any]:
    """What a teacher file holds (format, sha256, preconditioning, architecture, config, parameter count).

    Reads the file; builds nothing. JSON-able.
    """
    path = Path(path)
    kind = _sniff(path)
    info: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    if kind == "pickle":
        snap = read_edm_pickle(path)
        info.update(format="edm-pickle", precond=snap.precond_class, architecture=snap.unet_class,
                    config=snap.precond_init_kwargs, unet_config=snap.unet_init_kwargs,
                    parameters=snap.num_parameters, tensors=len(snap.state_dict),
                    module_src_sha256=snap.module_src_sha256, precond_attributes=snap.precond_attributes,
                    **{k: v for k, v in snap.extra.items() if k != "keys"}, pickle_keys=snap.extra["keys"])
        return info
    from safetensors import SafetensorError, safe_open

    meta = _converted_config(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = len(list(f.keys()))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInput(f"corrupt teacher file {path} ({exc}); convert the .pkl again") from None
    info.update(format="safetensors", precond=meta["precond_class"], architecture=meta.get("unet_class"),
                config=meta["precond_init_kwargs"], unet_config=meta.get("unet_init_kwargs"),
                parameters=meta.get("num_parameters"), tensors=tensors,
                module_src_sha256=meta.get("module_src_sha256"), precond_attributes=meta.get("precond_attributes"),
                source=meta.get("source"), source_sha256=meta.get("source_sha256"))
    if "dataset_kwargs" in meta:
        info["dataset_kwargs"] = meta["dataset_kwargs"]
    return info
