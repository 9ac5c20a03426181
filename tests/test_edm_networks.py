"""EDM's U-Nets and preconditioning wrappers (sfdbench.networks.edm): names and shapes of the released
teachers against manifests made with EDM's own classes, tiny-config forwards, the attention layout, the
preconditioning formulas, labels, the noise embedding, dtype casting, and SFD-v's step condition and
AMED's bottleneck attached through the adapters."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sfdbench.errors import BadInput
from sfdbench.networks.adapters import (
    StepConditioned,
    attach_step_condition,
    bottleneck_module,
    is_step_conditioned,
    raw_network,
)
from sfdbench.networks.edm import (
    CIFAR10_DDPMPP_CONFIG,
    IMAGENET64_ADM_CONFIG,
    Conv2d,
    DhariwalUNet,
    EDMPrecond,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    SongUNet,
    UNetBlock,
    VEPrecond,
    VPPrecond,
    build_precond,
    qkv_attention,
)

DATA = Path(__file__).parent / "data"

DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[4], augment_dim=9, dropout=0.13)
NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[4], dropout=0.1)
SKIPS = dict(DDPMPP, encoder_type="skip", decoder_type="skip", channel_mult=[1, 2, 2])
ADM = dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
           dropout=0.1)


def manifest(name: str) -> dict[str, list[int]]:
    shapes = {}
    for line in (DATA / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split()
            shapes[key] = [int(d) for d in shape.strip("[]").split(",") if d]
    return shapes


def tiny(precond="EDMPrecond", label_dim=0, resolution=8, seed=0, **net) -> nn.Module:
    """A tiny wrapper with every weight drawn at random (EDM zero-initialises the last convs, which
    would make the U-Net's output zero and hide everything these tests look at)."""
    torch.manual_seed(seed)
    wrapper = build_precond(precond, dict(img_resolution=resolution, img_channels=3, label_dim=label_dim, **net))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wrapper.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return wrapper.eval()


# --- (1) the released teachers: names, shapes, order, parameter counts --------------------------


@pytest.mark.parametrize("config, file, params", [
    (CIFAR10_DDPMPP_CONFIG, "edm-manifest-cifar10-ddpmpp.txt", 55_733_891),
    (IMAGENET64_ADM_CONFIG, "edm-manifest-imagenet64-adm.txt", 295_899_267),
])
def test_released_configs_match_edm_manifests(config, file, params):
    with torch.device("meta"):
        wrapper = build_precond(**config)
    shapes = {k: list(v.shape) for k, v in wrapper.state_dict().items()}
    assert list(shapes.items()) == list(manifest(file).items())
    count = sum(p.numel() for p in wrapper.parameters())
    print(f"{file}: {count:,} parameters")
    assert count == params
    assert all(k.endswith("resample_filter") for k, _ in wrapper.named_buffers())


def test_released_configs_round_trip_through_init_kwargs():
    with torch.device("meta"):
        wrapper = build_precond(**CIFAR10_DDPMPP_CONFIG)
        again = build_precond(type(wrapper).__name__, wrapper.init_kwargs)
    assert wrapper.init_kwargs == {**CIFAR10_DDPMPP_CONFIG["init_kwargs"], "sigma_min": 0, "sigma_max": math.inf,
                                   "sigma_data": 0.5}
    assert [(k, v.shape) for k, v in again.state_dict().items()] == [(k, v.shape) for k, v in
                                                                      wrapper.state_dict().items()]
    assert isinstance(wrapper.model, SongUNet) and wrapper.model.map_label is None
    # EDM keeps sigma in [0, inf]; the solvers get EDM's sampler range clipped to it
    assert (wrapper.precond_sigma_min, wrapper.precond_sigma_max) == (0, math.inf)
    assert (wrapper.sigma_min, wrapper.sigma_max) == (0.002, 80.0)


def test_build_precond_accepts_numpy_values_and_refuses_unknowns():
    kwargs = dict(img_resolution=8, img_channels=3, **DDPMPP)
    kwargs["dropout"] = np.float64(0.13)
    assert build_precond("EDMPrecond", kwargs).init_kwargs["dropout"] == 0.13
    with pytest.raises(BadInput, match="unknown EDM preconditioning class 'iDDPMPrecond'"):
        build_precond("iDDPMPrecond", kwargs)
    with pytest.raises(BadInput, match="unknown EDM model_type 'UNet'"):
        build_precond("EDMPrecond", {**kwargs, "model_type": "UNet"})
    with pytest.raises(BadInput, match="unknown EDMPrecond/SongUNet arguments: color"):
        build_precond("EDMPrecond", {**kwargs, "color": 1})
    with pytest.raises(BadInput, match="arguments: in_channels"):
        build_precond("EDMPrecond", {**kwargs, "in_channels": 3})
    with pytest.raises(BadInput, match="unknown encoder_type 'fancy'"):
        build_precond("EDMPrecond", {**kwargs, "encoder_type": "fancy"})
    with pytest.raises(BadInput, match="needs img_channels"):
        build_precond("EDMPrecond", {"img_resolution": 8})


# --- (2) tiny configurations: shapes and finite outputs -------------------------------------------


@pytest.mark.parametrize("net", [DDPMPP, NCSNPP, SKIPS, ADM], ids=["ddpm++", "ncsn++", "skip", "adm"])
@pytest.mark.parametrize("label_dim", [0, 5])
def test_tiny_forward_shapes(net, label_dim):
    wrapper = tiny(label_dim=label_dim, **net)
    x = torch.randn(2, 3, 8, 8)
    labels = F.one_hot(torch.tensor([1, 4]), 5).float() if label_dim else None
    with torch.no_grad():
        out = wrapper(x, torch.tensor([0.5, 20.0]), class_labels=labels)
        raw = wrapper.model(x, torch.tensor([0.1, -0.3]), class_labels=labels)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert raw.shape == x.shape and torch.isfinite(raw).all()


def test_ncsnpp_names():
    wrapper = tiny(**NCSNPP)
    keys = wrapper.state_dict().keys()
    assert "model.map_noise.freqs" in keys and list(wrapper.state_dict()["model.map_noise.freqs"].shape) == [16]
    assert "model.enc.4x4_aux_residual.weight" in keys and "model.enc.4x4_aux_residual.resample_filter" in keys
    assert list(wrapper.state_dict()["model.enc.4x4_down.conv0.resample_filter"].shape) == [1, 1, 4, 4]
    assert wrapper.model.map_layer0.in_features == 32  # channel_mult_noise = 2


# --- (3) attention: EDM's qkv layout against an independent formulation ----------------------------


@pytest.mark.parametrize("heads", [1, 3])
def test_qkv_attention_layout_matches_sdpa(heads):
    n, c, h, w = 2, 6 * heads, 3, 4
    qkv = torch.randn(n, 3 * c, h, w)  # float32: the softmax runs in float32 whatever the input
    per_head = c // heads
    # channel index = (head * per_head + channel) * 3 + {0: q, 1: k, 2: v}
    split = qkv.reshape(n, heads, per_head, 3, h * w)
    q, k, v = (split[:, :, :, i].transpose(2, 3) for i in range(3))  # [n, heads, HW, per_head]
    expected = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(per_head)
    expected = expected.transpose(2, 3).reshape(n, c, h, w)
    torch.testing.assert_close(qkv_attention(qkv, heads), expected)


def test_attention_heads_and_placement():
    adm = tiny(**ADM).model
    assert adm.dec["4x4_in0"].num_heads == 2 and adm.enc["8x8_block0"].num_heads == 0  # 64 channels per head
    assert adm.dec["4x4_in1"].num_heads == 0 and not hasattr(adm.dec["4x4_in1"], "qkv")
    song = tiny(**DDPMPP).model
    assert [k for k, b in song.dec.items() if getattr(b, "num_heads", 0)] == ["4x4_in0", "4x4_block1"]
    assert [k for k, b in song.enc.items() if getattr(b, "num_heads", 0)] == ["4x4_block0"]


# --- (4) preconditioning: D = c_skip x + c_out F(c_in x, c_noise) ---------------------------------


class Stub(nn.Module):
    """Records what the wrapper passes and returns a fixed function of it."""

    def forward(self, x, noise_labels, class_labels=None, **cond):
        self.seen = dict(x=x, noise_labels=noise_labels, class_labels=class_labels, cond=cond)
        return torch.tanh(x) + noise_labels.reshape(-1, 1, 1, 1)


def expected_coefficients(name, sigma):
    s = sigma.double().reshape(-1, 1, 1, 1)
    if name == "EDMPrecond":
        sd = 0.5
        return sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (sd**2 + s**2).sqrt(), s.log() / 4
    if name == "VPPrecond":
        bd, bmin, m = 19.9, 0.1, 1000
        t = ((bmin**2 + 2 * bd * (1 + s**2).log()).sqrt() - bmin) / bd
        return torch.ones_like(s), -s, 1 / (s**2 + 1).sqrt(), (m - 1) * t
    return torch.ones_like(s), s, torch.ones_like(s), (s / 2).log()


@pytest.mark.parametrize("name", ["EDMPrecond", "VPPrecond", "VEPrecond"])
def test_preconditioning_formulas(name):
    wrapper = build_precond(name, dict(img_resolution=8, img_channels=3, **DDPMPP))
    assert type(wrapper) is {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond}[name]
    wrapper.model = Stub()
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.01, 1.0, 60.0])
    out = wrapper(x, sigma)
    c_skip, c_out, c_in, c_noise = expected_coefficients(name, sigma)
    seen = wrapper.model.seen
    f32 = dict(rtol=1e-6, atol=1e-6)  # computed in float32, compared with float64 formulas
    torch.testing.assert_close(seen["x"].double(), c_in * x.double(), **f32)
    # VP's c_noise at small sigma loses digits to float32 cancellation, as in EDM (ln(1 + sigma^2) in float32)
    torch.testing.assert_close(seen["noise_labels"].double(), c_noise.flatten(),
                               **(dict(rtol=1e-3, atol=1e-6) if name == "VPPrecond" else f32))
    assert seen["noise_labels"].shape == (3,) and seen["class_labels"] is None
    f = torch.tanh(c_in * x.double()) + seen["noise_labels"].double().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out.double(), c_skip * x.double() + c_out * f, rtol=1e-5, atol=1e-5)
    # a scalar sigma is one value for the whole batch; float64 in -> float64 out (computed in float32)
    torch.testing.assert_close(wrapper(x, 1.0), wrapper(x, torch.ones(3)))
    assert wrapper(x.double(), 1.0).dtype == torch.float64


def test_sigma_ranges():
    vp = build_precond("VPPrecond", dict(img_resolution=8, img_channels=3, **DDPMPP))
    assert vp.precond_sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)))
    assert vp.precond_sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)))
    assert (vp.sigma_min, vp.sigma_max) == (0.002, 80.0)
    ve = build_precond("VEPrecond", dict(img_resolution=8, img_channels=3, **DDPMPP))
    assert (ve.precond_sigma_min, ve.precond_sigma_max, ve.sigma_min, ve.sigma_max) == (0.02, 100, 0.02, 80.0)


# --- (5) labels ---------------------------------------------------------------------------------


def test_class_labels_none_is_one_zero_row_and_unconditional_is_none():
    wrapper = build_precond("EDMPrecond", dict(img_resolution=8, img_channels=3, label_dim=4, **DDPMPP))
    wrapper.model = Stub()
    x = torch.randn(2, 3, 8, 8)
    wrapper(x, 1.0)
    assert torch.equal(wrapper.model.seen["class_labels"], torch.zeros(1, 4))
    wrapper(x, 1.0, class_labels=torch.eye(4)[[0, 2]].double())
    assert wrapper.model.seen["class_labels"].dtype == torch.float32
    wrapper(x, 1.0, augment_labels=torch.zeros(2, 9))
    assert set(wrapper.model.seen["cond"]) == {"augment_labels"}  # passed through to the U-Net
    uncond = build_precond("EDMPrecond", dict(img_resolution=8, img_channels=3, **DDPMPP))
    uncond.model = Stub()
    uncond(x, 1.0, class_labels=torch.eye(4)[[0, 2]])
    assert uncond.model.seen["class_labels"] is None


@pytest.mark.parametrize("net", [DDPMPP, dict(ADM, augment_dim=9)], ids=["ddpm++", "adm"])
def test_zero_labels_equal_none(net):
    wrapper = tiny(label_dim=4, **net)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 3.0])
    with torch.no_grad():
        ref = wrapper(x, sigma)
        torch.testing.assert_close(wrapper(x, sigma, class_labels=torch.zeros(2, 4)), ref, rtol=0, atol=0)
        torch.testing.assert_close(wrapper(x, sigma, augment_labels=torch.zeros(2, 9)), ref, rtol=0, atol=0)
        assert (wrapper(x, sigma, class_labels=torch.eye(4)[[1, 3]]) - ref).abs().max() > 1e-3
        assert (wrapper(x, sigma, augment_labels=torch.ones(2, 9)) - ref).abs().max() > 1e-3


# --- (6) noise embedding ------------------------------------------------------------------------


def capture_map_layer0_input(net: nn.Module, noise_labels: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = net.map_layer0.register_forward_pre_hook(lambda m, args: seen.setdefault("emb", args[0]))
    with torch.no_grad():
        net(torch.randn(len(noise_labels), 3, 8, 8), noise_labels)
    handle.remove()
    return seen["emb"]


def test_noise_embedding_frequencies_and_order():
    labels = torch.tensor([-1.3, 0.2, 2.5])
    half = 8
    song = tiny(**dict(DDPMPP, model_channels=16, augment_dim=0)).model
    freqs = 1e-4 ** (np.arange(half) / (half - 1))  # endpoint: the last frequency is 1/10000
    angles = labels.double().numpy()[:, None] * freqs
    emb = capture_map_layer0_input(song, labels)
    np.testing.assert_allclose(emb.numpy(), np.concatenate([np.sin(angles), np.cos(angles)], 1), atol=2e-6)
    adm = tiny(**ADM).model
    freqs = 1e-4 ** (np.arange(32) / 32)  # no endpoint, 64 channels
    angles = labels.double().numpy()[:, None] * freqs
    emb = capture_map_layer0_input(adm, labels)
    np.testing.assert_allclose(emb.numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=2e-6)
    # the frequencies are computed in float32, as a power
    f32 = torch.tensor(1e-4) ** (torch.arange(4, dtype=torch.float32) / 3)
    expected = torch.cat([torch.outer(labels, f32).cos(), torch.outer(labels, f32).sin()], 1)
    assert torch.equal(PositionalEmbedding(8, endpoint=True)(labels), expected)


# --- (7) SFD-v's step condition and AMED's bottleneck on EDM teachers -----------------------------


@pytest.mark.parametrize("net", [DDPMPP, ADM], ids=["songunet", "adm"])
def test_step_condition_on_edm_teachers(net):
    teacher = tiny(label_dim=3, **net).requires_grad_(False)
    assert raw_network(teacher) is teacher.model and not is_step_conditioned(teacher)
    student = attach_step_condition(teacher, seed=1)
    assert is_step_conditioned(student) and isinstance(student.model, StepConditioned)
    assert isinstance(teacher.model, (SongUNet, DhariwalUNet))  # the original is untouched
    keys = student.state_dict().keys()
    assert {k.replace("model.net.", "model.", 1) for k in keys if k.startswith("model.net.")} == set(
        teacher.state_dict())
    blocks = [m for m in teacher.model.modules() if isinstance(m, UNetBlock)]
    assert len(student.model.step_proj) == len(blocks)
    width = 2 if net is ADM else 1  # ADM: a FiLM [scale | shift]
    assert [p.out_features for p in student.model.step_proj] == [width * b.out_channels for b in blocks]
    assert student.model.step_map[0].in_features == (64 if net is ADM else 16)

    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 5.0])
    labels = torch.eye(3)[[0, 2]]
    with torch.no_grad():
        ref = teacher(x, sigma, class_labels=labels)
        torch.testing.assert_close(student(x, sigma, class_labels=labels), ref, rtol=0, atol=0)
        four = student(x, sigma, class_labels=labels, step_condition=4)
        five = student(x, sigma, class_labels=labels, step_condition=torch.tensor([5.0]))
        assert (four - ref).abs().max() > 1e-4 and (five - four).abs().max() > 1e-4
        zero = attach_step_condition(teacher, init="zero")
        for n in (3, 7):
            torch.testing.assert_close(zero(x, sigma, class_labels=labels, step_condition=n), ref, rtol=0, atol=0)

    student.train().requires_grad_(True)
    student(x, sigma, class_labels=labels, step_condition=5).square().mean().backward()
    step_params = [*student.model.step_map.parameters(), *student.model.step_proj.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in step_params)

    # AMED's hook: the last encoder block at the lowest resolution (EDM's enc['8x8_block3'] on CIFAR-10)
    last = [k for k in teacher.model.enc if "_block" in k][-1]
    assert last.startswith("4x4_block")
    assert bottleneck_module(teacher) is teacher.model.enc[last]
    assert bottleneck_module(student) is student.model.net.enc[last]


def test_step_modules_use_the_architecture_init():
    song = attach_step_condition(tiny(**DDPMPP), seed=3).model
    for linear in [*song.step_proj, song.step_map[0], song.step_map[2]]:
        bound = math.sqrt(6 / (linear.in_features + linear.out_features))
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.8 * bound
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    adm = attach_step_condition(tiny(**ADM), seed=3).model
    for linear in [*adm.step_proj, adm.step_map[0], adm.step_map[2]]:
        bound = math.sqrt(1 / linear.in_features)  # kaiming-uniform sqrt(3 / fan_in) times sqrt(1/3)
        for p in (linear.weight, linear.bias):
            assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound
    again = attach_step_condition(tiny(**ADM), seed=3).model
    assert torch.equal(again.step_proj[0].weight, adm.step_proj[0].weight)


# --- (8) weights are cast to the input's dtype ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_layers_cast_weights_to_the_input_dtype(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    layers = [Conv2d(8, 4, 3), Conv2d(8, 8, 3, down=True), Conv2d(8, 8, 0, up=True), GroupNorm(8, eps=1e-6)]
    for layer in layers:
        out = layer(x.to(dtype))
        assert out.dtype == dtype
        assert all(p.dtype == torch.float32 for p in layer.parameters())  # stored weights stay float32
        torch.testing.assert_close(out.float(), layer(x), rtol=0.05, atol=0.05)
    linear = Linear(8, 5)
    assert linear(x[:, :, 0, 0].to(dtype)).dtype == dtype


def test_resampling_is_average_pool_and_nearest():
    x = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(Conv2d(2, 2, 0, down=True)(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(Conv2d(2, 2, 0, up=True)(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_use_fp16_is_cuda_only():
    wrapper = tiny(**dict(ADM))
    wrapper.use_fp16 = True
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # on the CPU the flag changes nothing
        torch.testing.assert_close(wrapper(x, 1.0), wrapper(x, 1.0, force_fp32=True), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_is_close_to_fp32():
    wrapper = tiny(**dict(ADM)).cuda()
    wrapper.use_fp16 = True
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with torch.no_grad():
        half, full = wrapper(x, 2.0), wrapper(x, 2.0, force_fp32=True)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.05 * full.abs().max()
