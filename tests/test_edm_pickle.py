"""EDM network pickles: read without executing anything, load into our networks, convert, refuse hostile files.

The pickles are written by ``tests/edm_format.py`` in EDM's snapshot format (Karras et al. 2022,
arXiv 2206.00364; described in ``sfdbench/networks/edm_pickle.py``) from networks built by
``sfdbench.networks.edm.build_precond``.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import edm_format as ef
import numpy as np
import pytest
import torch

from sfdbench.errors import BadInput
from sfdbench.io import sha256_file
from sfdbench.networks import edm_pickle as ep

TINY_VP = {**ef.TINY_DDPMPP, "model_type": "SongUNet"}
TINY_VE = {**ef.TINY_DDPMPP, "model_type": "SongUNet", "augment_dim": 0}
CASES = {
    "ddpmpp": ("EDMPrecond", ef.TINY_DDPMPP),
    "adm-cond": ("EDMPrecond", ef.TINY_ADM),
    "vp": ("VPPrecond", TINY_VP),
    "ve": ("VEPrecond", TINY_VE),
}


@pytest.fixture(scope="module")
def nets():
    return {name: ef.tiny_net(cls, cfg, seed=i) for i, (name, (cls, cfg)) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def pickles(nets, tmp_path_factory):
    root = tmp_path_factory.mktemp("edm")
    return {name: ef.write_edm_pickle(root / f"{name}.pkl", nets[name], *CASES[name]) for name in CASES}


def _inputs(name: str, batch: int = 3):
    cfg = CASES[name][1]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"], generator=g) * 2.0
    sigma = torch.tensor([0.05, 1.3, 40.0][:batch])
    labels = None
    if cfg["label_dim"]:
        labels = torch.nn.functional.one_hot(torch.arange(batch) % cfg["label_dim"], cfg["label_dim"]).float()
    return x, sigma, labels


def _same_output(a, b, name: str) -> None:
    x, sigma, labels = _inputs(name)
    with torch.no_grad():
        assert torch.equal(a(x, sigma, labels), b(x, sigma, labels))
        assert torch.equal(a(x, sigma), b(x, sigma))  # no labels: the all-zero row on conditional nets


def _refused(path, *needles: str) -> str:
    with pytest.raises(BadInput) as info:
        ep.load_teacher(path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert info.value.exit_code == 2
    return message


# ------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", list(CASES))
def test_read_gives_edms_state_dict_and_config(name, nets, pickles):
    snap = ep.read_edm_pickle(pickles[name])
    expected = nets[name].state_dict()
    assert list(snap.state_dict) == list(expected)  # same keys in the same order, 'model.' prefix included
    assert all(torch.equal(snap.state_dict[k], v) and snap.state_dict[k].dtype == v.dtype for k, v in expected.items())
    precond, cfg = CASES[name]
    assert snap.precond_class == precond and snap.unet_class == cfg["model_type"]
    assert snap.precond_init_kwargs == cfg
    assert type(snap.precond_init_kwargs["dropout"]) is float  # pickled as numpy float64
    assert snap.unet_init_kwargs["in_channels"] == cfg["img_channels"]
    assert snap.num_parameters == sum(p.numel() for p in nets[name].parameters())
    assert snap.module_src_sha256 == hashlib.sha256(ef.NETWORKS_SRC.encode()).hexdigest()
    assert snap.extra["dataset_kwargs"]["resolution"] == cfg["img_resolution"]
    assert snap.extra["loss_fn"]["class_name"] == "EDMLoss"
    assert snap.extra["augment_pipe"]["class_name"] == "AugmentPipe"
    if precond == "EDMPrecond":
        assert snap.precond_attributes["sigma_max"] == float("inf") and snap.precond_attributes["sigma_data"] == 0.5
    if name == "ddpmpp":
        assert any(k.endswith("resample_filter") for k in snap.state_dict)
        assert "model.map_augment.weight" in snap.state_dict


@pytest.mark.parametrize("name", list(CASES))
def test_loaded_network_matches_the_original_bit_for_bit(name, nets, pickles):
    loaded = ep.load_edm_pickle(pickles[name])
    assert type(loaded).__name__ == CASES[name][0] and type(loaded.model).__name__ == CASES[name][1]["model_type"]
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _same_output(loaded, nets[name], name)


def test_the_pickle_holds_only_the_allow_listed_globals(pickles, tmp_path, nets):
    class Recording(ep.EDMUnpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    for numpy1, scalar_module in ((False, "numpy._core.multiarray"), (True, "numpy.core.multiarray")):
        path = ef.write_edm_pickle(tmp_path / "g.pkl", nets["ddpmpp"], *CASES["ddpmpp"], numpy1=numpy1)
        seen: set[tuple[str, str]] = set()
        with open(path, "rb") as f:
            Recording(f).load()
        assert seen <= ep.ALLOWED_GLOBALS
        scalars = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
        assert seen == ep.ALLOWED_GLOBALS - scalars | {(scalar_module, "scalar")}


def test_numpy1_scalars_and_torch1_ordered_dicts_are_accepted(nets, tmp_path):
    path = ef.write_edm_pickle(tmp_path / "old.pkl", nets["adm-cond"], *CASES["adm-cond"], numpy1=True, ordered=True)
    raw = path.read_bytes()
    assert b"numpy.core.multiarray" in raw and b"numpy._core" not in raw
    snap = ep.read_edm_pickle(path)
    assert list(snap.state_dict) == list(nets["adm-cond"].state_dict())
    assert type(snap.precond_init_kwargs["dropout"]) is float
    _same_output(ep.load_edm_pickle(path), nets["adm-cond"], "adm-cond")


def test_snapshot_without_augment_pipe_and_python_floats(nets, tmp_path):
    path = ef.write_edm_pickle(tmp_path / "plain.pkl", nets["adm-cond"], *CASES["adm-cond"], augment=False,
                               numpy_floats=False)
    snap = ep.read_edm_pickle(path)
    assert snap.extra["augment_pipe"] is None
    _same_output(ep.load_teacher(path), nets["adm-cond"], "adm-cond")


@pytest.mark.parametrize("name", ["ddpmpp", "adm-cond"])
def test_convert_to_safetensors_and_load_teacher(name, nets, pickles, tmp_path):
    out = ep.convert_to_safetensors(pickles[name], tmp_path / "teacher.safetensors")
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    from sfdbench.networks.checkpoint import read_metadata

    meta = read_metadata(out)
    assert meta["format"] == ep.FORMAT and meta["precond_class"] == CASES[name][0]
    assert meta["precond_init_kwargs"] == CASES[name][1]
    assert meta["source_sha256"] == sha256_file(pickles[name])
    assert json.loads(out.with_suffix(".json").read_text()) == meta
    _same_output(ep.load_teacher(out), nets[name], name)
    # the format comes from the content, not the name
    disguised = tmp_path / "teacher.bin"
    disguised.write_bytes(pickles[name].read_bytes())
    _same_output(ep.load_teacher(disguised), nets[name], name)


def test_public_api_and_cheap_package_import(pickles, nets):
    import sfdbench.networks

    _same_output(sfdbench.networks.load_teacher(pickles["ddpmpp"]), nets["ddpmpp"], "ddpmpp")
    code = "import sys, sfdbench.networks; print('sfdbench.networks.edm_pickle' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_inspect_teacher(pickles, nets, tmp_path):
    info = ep.inspect_teacher(pickles["adm-cond"])
    n_params = sum(p.numel() for p in nets["adm-cond"].parameters())
    assert info["format"] == "edm-pickle" and info["precond"] == "EDMPrecond" and info["architecture"] == "DhariwalUNet"
    assert info["config"] == ef.TINY_ADM and info["parameters"] == n_params
    assert info["tensors"] == len(nets["adm-cond"].state_dict())
    assert info["sha256"] == sha256_file(pickles["adm-cond"])
    assert info["dataset_kwargs"]["resolution"] == 8 and info["pickle_keys"][0] == "ema"
    json.dumps(info)
    out = ep.convert_to_safetensors(pickles["adm-cond"], tmp_path / "t.safetensors")
    info2 = ep.inspect_teacher(out)
    assert info2["format"] == "safetensors" and info2["architecture"] == "DhariwalUNet"
    assert info2["config"] == ef.TINY_ADM and info2["parameters"] == n_params and info2["tensors"] == info["tensors"]
    assert info2["source_sha256"] == info["sha256"] and info2["sha256"] == sha256_file(out)
    json.dumps(info2)


# ------------------------------------------------------------------------------------------------
# Hostile files: refused before anything runs


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a payload ran"


def test_the_hostile_payloads_are_real(tmp_path):
    """Control: with plain pickle these payloads do create the marker (so the refusals below mean something)."""
    for name in ("os.system", "builtins.eval"):
        marker = tmp_path / f"control-{name}"
        data = ef.hostile_pickles(marker, {"dataset_kwargs": {}})[name][0]
        pickle.loads(data)  # noqa: S301 - deliberately unsafe control
        assert marker.exists()
    marker = tmp_path / "control-src"
    exec(ef.unknown_class_pickle(marker)[1], {})  # noqa: S102 - deliberately unsafe control
    assert marker.exists()


@pytest.mark.parametrize("name", ["os.system", "posix.system", "builtins.exec", "builtins.eval", "__builtin__.eval",
                                  "subprocess.check_call", "hidden in dataset_kwargs"])
def test_hostile_globals_are_refused(name, marker, nets, tmp_path):
    valid = ef.edm_snapshot(nets["ddpmpp"], *CASES["ddpmpp"])
    data, needle = ef.hostile_pickles(marker, valid)[name]
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    message = _refused(path, f"refusing to load {path}: it asks for {needle}", "never contains")
    assert message.count("GLOBAL") == 1
    for reader in (ep.read_edm_pickle, ep.inspect_teacher, ep.load_edm_pickle):
        with pytest.raises(BadInput, match="never contains"):
            reader(path)
    with pytest.raises(BadInput, match="never contains"):
        ep.convert_to_safetensors(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_unknown_persistent_class_is_refused_and_its_source_never_runs(marker, tmp_path):
    data, _ = ef.unknown_class_pickle(marker)
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    _refused(path, "persistent object of class 'Evil'", "not one of EDM's")


def test_hostile_source_in_a_known_class_is_never_executed(marker, nets, tmp_path):
    src = ef.python_payload(marker) + "\n" + ef.NETWORKS_SRC
    path = ef.write_edm_pickle(tmp_path / "src.pkl", nets["ddpmpp"], *CASES["ddpmpp"], module_src=src)
    snap = ep.read_edm_pickle(path)
    assert snap.module_src_sha256 == hashlib.sha256(src.encode()).hexdigest()
    _same_output(ep.load_teacher(path), nets["ddpmpp"], "ddpmpp")


def test_persistent_ids_are_refused(tmp_path):
    path = tmp_path / "pid.pkl"
    path.write_bytes(ef.persistent_id_pickle())
    _refused(path, "persistent id", "never contains")


def _hand(*ops: bytes) -> bytes:
    return b"\x80\x04" + b"".join(ops) + b"."


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _typed_storage(n: int = 3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "TypedStorage is deprecated"
        return torch.zeros(n).storage()


def _legacy_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _rebuild(*args) -> bytes:
    return pickle.dumps(ef.Reduces(torch._utils._rebuild_tensor_v2, *args))


MISUSED = {
    "BUILD on a stand-in": (lambda: _hand(_global("torch._utils", "_rebuild_parameter"), b"}", b"b"), "applies BUILD"),
    "ModuleDict state": (lambda: _hand(_global("torch.nn.modules.container", "ModuleDict"), b")\x81", b"K\x01", b"b"),
                         "ModuleDict state is a int"),
    "object dtype": (lambda: pickle.dumps(np.dtype("O")), "numpy dtype 'O8'"),
    "str scalar": (lambda: pickle.dumps(np.str_("abc")), "numpy dtype"),
    "untyped storage": (lambda: _rebuild(torch.zeros(3).untyped_storage(), 0, (3,), (1,), False, OrderedDict()),
                        "not a valid torch storage"),
    "payload not a storage": (lambda: pickle.dumps(ef.Reduces(torch.storage._load_from_bytes, _legacy_save({"a": 1}))),
                              "payload holds a dict, not a storage"),
    "out of bounds": (lambda: _rebuild(_typed_storage(), 0, (100,), (1,), False, OrderedDict()),
                      "reaches past the end of its storage"),
    "broadcast view": (lambda: _rebuild(_typed_storage(1), 0, (10**9,), (0,), False, OrderedDict()),
                       "reaches past the end of its storage"),
    "negative offset": (lambda: _rebuild(_typed_storage(), -1, (3,), (1,), False, OrderedDict()), "invalid arguments"),
    "hooks": (lambda: _rebuild(_typed_storage(), 0, (3,), (1,), False, OrderedDict(evil=1)), "invalid arguments"),
    "bad payload": (lambda: pickle.dumps(ef.Reduces(torch.storage._load_from_bytes, b"not a torch file")),
                    "not a valid torch storage"),
}


@pytest.mark.parametrize("case", list(MISUSED))
def test_misused_stand_ins_are_refused(case, tmp_path):
    make, needle = MISUSED[case]
    path = tmp_path / "bad.pkl"
    path.write_bytes(make())
    _refused(path, "refusing to load", needle)


def _deep(n: int) -> list:
    out: list = [2]
    for _ in range(n):
        out = [out]
    return out


def _edit_ema(fn):
    def edit(top):
        fn(top["ema"].meta)
    return edit


def _model_meta(top):
    return top["ema"].meta["state"]["_modules"]["model"].meta


def _modules(top):
    return _model_meta(top)["state"]["_modules"]


@pytest.mark.parametrize("edit,needle", [
    (lambda top: top.pop("ema"), "no 'ema' network (its keys: augment_pipe, dataset_kwargs, loss_fn)"),
    (lambda top: [top.clear(), top.update(ema=[1, 2])], "its 'ema' is a list"),
    (_edit_ema(lambda m: m.update(class_name="iDDPMPrecond")), "its 'ema' is a iDDPMPrecond"),
    (_edit_ema(lambda m: m.update(class_name="SongUNet")), "its 'ema' is a SongUNet"),
    (_edit_ema(lambda m: m.update(version=5)), "persistence version 5"),
    (_edit_ema(lambda m: m.update(type="function")), "persistent type 'function'"),
    (_edit_ema(lambda m: m.update(module_name="x")), "extra: ['module_name']"),
    (_edit_ema(lambda m: m.pop("module_src")), "missing: ['module_src']"),
    (_edit_ema(lambda m: m["state"]["_modules"].pop("model")), "nothing as its U-Net 'model'"),
    (_edit_ema(lambda m: m["state"]["_modules"].update(model=ef.persistent("Linear", {}))), "a Linear as its U-Net"),
    (_edit_ema(lambda m: m["state"]["_init_kwargs"].update(model_type="DhariwalUNet")),
     "model_type 'DhariwalUNet' but holds a SongUNet"),
    (_edit_ema(lambda m: m["state"].update(_init_args=(8, 3))), "positional arguments"),
    (lambda top: _model_meta(top)["state"]["_modules"].update(extra=top["loss_fn"]), "model.extra is a EDMLoss"),
    (lambda top: _modules(top).update(again=_modules(top)["map_layer0"]), "also reachable under another name"),
    (lambda top: _model_meta(top)["state"]["_parameters"].update(x=3), "model.x is a int"),
    (lambda top: _model_meta(top)["state"].update(_buffers=[1]), "model buffers is a list"),
    (_edit_ema(lambda m: m["state"]["_init_kwargs"].update(channel_mult=_deep(40))), "nested more than 16 levels"),
    (_edit_ema(lambda m: m["state"]["_init_kwargs"].update(bad=ef.persistent("Linear", {}))),
     "holds a PersistentRecord"),
])
def test_broken_snapshots_are_refused_with_the_reason(edit, needle, nets, tmp_path):
    path = ef.write_edm_pickle(tmp_path / "broken.pkl", nets["ddpmpp"], *CASES["ddpmpp"], edit=edit)
    _refused(path, f"refusing to load {path}", needle)


def test_a_top_level_that_is_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    _refused(path, "holds a list, not the dict")


@pytest.mark.parametrize("cut", [3, 100, 5000, 0.5, -1])
def test_truncated_files_are_bad_input(cut, pickles, tmp_path):
    raw = pickles["ddpmpp"].read_bytes()
    n = cut if isinstance(cut, int) and cut > 0 else (len(raw) + cut if cut == -1 else int(len(raw) * cut))
    path = tmp_path / "cut.pkl"
    path.write_bytes(raw[:n])
    _refused(path, "cannot read", "as an EDM network pickle")


def test_corrupt_files_are_bad_input(pickles, tmp_path):
    raw = bytearray(pickles["ddpmpp"].read_bytes())
    payload = raw.find(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")  # the magic number of a legacy torch.save
    assert payload > 0
    raw[payload + 2: payload + 12] = b"\x00" * 10
    path = tmp_path / "flipped.pkl"
    path.write_bytes(bytes(raw))
    _refused(path, "not a valid torch storage")
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04" + random.Random(0).randbytes(64))
    with pytest.raises(BadInput):
        ep.load_teacher(garbage)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _refused(text, "neither an EDM network pickle")
    _refused(tmp_path / "missing.pkl", "does not exist")


def test_weights_that_do_not_fit_the_config_are_bad_input(nets, tmp_path):
    path = ef.write_edm_pickle(tmp_path / "wide.pkl", nets["ddpmpp"], *CASES["ddpmpp"],
                               edit=_edit_ema(lambda m: m["state"]["_init_kwargs"].update(model_channels=32)))
    _refused(path, "does not match the EDMPrecond network built from its config",
             "model.map_augment.weight has shape [16, 9] in the file but [32, 9] in the network")
    path = ef.write_edm_pickle(tmp_path / "extra.pkl", nets["ddpmpp"], *CASES["ddpmpp"],
                               edit=_edit_ema(lambda m: m["state"]["_init_kwargs"].update(augment_dim=0)))
    _refused(path, "it has model.map_augment.weight [16, 9], which the network does not have")
    path = ef.write_edm_pickle(tmp_path / "unknown.pkl", nets["ddpmpp"], *CASES["ddpmpp"],
                               edit=_edit_ema(lambda m: m["state"]["_init_kwargs"].update(bogus=1)))
    _refused(path, "cannot build the EDMPrecond network stored in", "bogus")


def test_non_finite_weights_are_bad_input(nets, tmp_path):
    net = ef.tiny_net(*CASES["ddpmpp"])
    with torch.no_grad():
        net.model.map_layer0.weight[0, 0] = float("nan")
    path = ef.write_edm_pickle(tmp_path / "nan.pkl", net, *CASES["ddpmpp"])
    _refused(path, "non-finite values in model.map_layer0.weight")


def test_safetensors_without_our_config_is_bad_input(nets, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in nets["ddpmpp"].state_dict().items()}, str(path))
    _refused(path, "without an sfdbench EDM teacher config")
    with pytest.raises(BadInput, match="without an sfdbench EDM teacher config"):
        ep.inspect_teacher(path)


def test_a_truncated_converted_teacher_is_bad_input(pickles, tmp_path):
    out = ep.convert_to_safetensors(pickles["ddpmpp"], tmp_path / "t.safetensors")
    raw = out.read_bytes()
    out.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadInput):
        ep.load_teacher(out)


def test_stand_ins_cannot_be_tampered_with(tmp_path):
    # BUILD with a (dict, slotstate) pair would setattr on a plain function; the stand-ins refuse BUILD.
    data = _hand(_global("numpy", "dtype"), b"}", b"\x8c\x01a", b"K\x01", b"s", b"N", b"\x86", b"b")
    path = tmp_path / "tamper.pkl"
    path.write_bytes(data)
    _refused(path, "applies BUILD to numpy.dtype")


def test_the_released_cifar10_config_round_trips(tmp_path):
    """The exact config of edm-cifar10-32x32-uncond-vp.pkl (55.7M parameters, a ~223 MB pickle): the
    snapshot's state_dict names and shapes equal the manifest made with EDM's own classes, and the
    loaded network equals the one that was written."""
    from sfdbench.networks.edm import CIFAR10_DDPMPP_CONFIG as config

    net = ef.tiny_net(config["precond_class"], config["init_kwargs"])
    path = ef.write_edm_pickle(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl", net, config["precond_class"],
                               config["init_kwargs"])
    snap = ep.read_edm_pickle(path)
    manifest = Path(__file__).resolve().parent / "data" / "edm-manifest-cifar10-ddpmpp.txt"
    lines = [line.split() for line in manifest.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert [(k, str(list(v.shape)).replace(" ", "")) for k, v in snap.state_dict.items()] == [tuple(x) for x in lines]
    assert snap.num_parameters == 55_733_891
    loaded = ep.load_edm_pickle(path)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([2.5])), net(x, torch.tensor([2.5])))
    path.unlink()


def test_numeric_numpy_scalars_of_every_kind(tmp_path, nets):
    values = {"f8": np.float64(0.1), "f4": np.float32(0.25), "i8": np.int64(-3), "u1": np.uint8(7),
              "b1": np.bool_(True), "be": np.array([1.5], dtype=">f8")[0]}
    path = ef.write_edm_pickle(tmp_path / "scalars.pkl", nets["ddpmpp"], *CASES["ddpmpp"],
                               edit=lambda top: top["dataset_kwargs"].update(values))
    got = ep.read_edm_pickle(path).extra["dataset_kwargs"]
    for key, value in values.items():
        assert got[key] == value.item() and type(got[key]) is type(value.item())


@pytest.mark.parametrize("where", ["dataset_kwargs", "init_kwargs"])
def test_deeply_nested_data(where, tmp_path, nets):
    """Nesting the pickler itself cannot write (100,000 levels): summarised in extra data, refused in the config."""
    def edit(top):
        target = top["dataset_kwargs"] if where == "dataset_kwargs" else top["ema"].meta["state"]["_init_kwargs"]
        target["deep"] = "DEEP-PLACEHOLDER"

    path = ef.write_edm_pickle(tmp_path / "deep.pkl", nets["ddpmpp"], *CASES["ddpmpp"], edit=edit)
    path.write_bytes(ef.splice_deep_list(path.read_bytes(), "DEEP-PLACEHOLDER", 100_000))
    if where == "init_kwargs":
        _refused(path, "refusing to load", "_init_kwargs['deep'] is nested more than 16 levels deep")
        return
    snap = ep.read_edm_pickle(path)
    assert isinstance(snap.extra["dataset_kwargs"]["deep"], list)
    json.dumps(snap.extra)
    _same_output(ep.load_teacher(path), nets["ddpmpp"], "ddpmpp")
