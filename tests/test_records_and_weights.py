"""Records are atomic and self-describing; weights load safely and fail clearly."""

import json

import pytest
import torch

from sfdbench.errors import BadInput
from sfdbench.networks.checkpoint import load_weights, read_metadata, save_weights
from sfdbench.networks.digits_unet import DigitsUNet
from sfdbench.records import config_hash, load_records, read_record, record_path, write_record
from sfdbench.suites.digits import TEACHER_WEIGHTS, DigitsSuite, load_digits


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_write_record_is_atomic_and_loadable(tmp_path):
    path = record_path(tmp_path, "digits", "ddim", 2, 0, "abc")
    rec = {"schema_version": 1, "suite": "digits", "method": "ddim", "nfe": 2, "seed": 0, "config_hash": "abc",
           "metrics": {"fid": 3.5}, "fine_tuning": None, "sampling": {"n_samples": 10}}
    write_record(path, rec)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert read_record(path) == rec
    (path.parent / "notes.json").write_text("[1, 2]")  # not a record: ignored
    (path.parent / "half.json").write_text('{"schema_version": 1, "suite"')  # not JSON: ignored
    df = load_records(tmp_path, "digits")
    assert len(df) == 1 and df.loc[0, "fid"] == 3.5 and df.loc[0, "fine_tuning_hours"] == 0.0


def test_weights_roundtrip_and_metadata(tmp_path):
    net = DigitsUNet(model_channels=8, channel_mult=(1, 2), blocks=1, emb_dim=16)
    path = tmp_path / "w.safetensors"
    save_weights(net, path, {"config": net.config, "note": "x"})
    other = load_weights(DigitsUNet(**read_metadata(path)["config"]), path)
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert json.loads(path.with_suffix(".json").read_text())["note"] == "x"


def test_corrupt_and_mismatched_weights_are_bad_input(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 20)
    with pytest.raises(BadInput, match="corrupt weights"):
        load_weights(DigitsUNet(), bad)
    with pytest.raises(BadInput, match="does not match"):
        load_weights(DigitsUNet(model_channels=8, channel_mult=(1, 2), blocks=1, emb_dim=16), TEACHER_WEIGHTS)
    nan = tmp_path / "nan.safetensors"
    net = DigitsUNet(model_channels=8, channel_mult=(1, 2), blocks=1, emb_dim=16)
    with torch.no_grad():
        net.conv_in.weight[0, 0, 0, 0] = float("nan")
    save_weights(net, nan, {"config": net.config})
    with pytest.raises(BadInput, match="non-finite"):
        load_weights(DigitsUNet(**net.config), nan)


def test_shipped_teacher_is_small_documented_and_denoises():
    assert TEACHER_WEIGHTS.stat().st_size <= 10 * 2**20
    meta = read_metadata(TEACHER_WEIGHTS)
    assert meta["command"].startswith("sfdbench teacher train") and meta["seed"] == 0
    teacher = DigitsSuite().load_teacher()
    x0, _ = load_digits("test")
    train, _ = load_digits("train")
    sigma = 0.5
    noisy = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (teacher(noisy, sigma) - x0).square().mean()
    # the best per-pixel linear (Wiener) denoiser fitted on the training digits is a baseline
    # the learned teacher must beat on held-out digits
    mu, var = train.mean(0), train.var(0)
    wiener = mu + var / (var + sigma**2) * (noisy - mu)
    assert err < 0.5 * (wiener - x0).square().mean()
