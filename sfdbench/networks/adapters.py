"""Network adapters: what a method needs from a network's *architecture*, attached from outside.

Methods see only a denoiser (``docs/architecture.md``). Two of them need more than its output:

* SFD-v (Zhou et al., NeurIPS 2024, arXiv 2409.19681, Sec. 4.2 "SFD-v") conditions the student on
  the number of timestamps N: a second embedding branch parallel to the noise-level embedding
  (positional embedding of N -> Linear -> SiLU -> Linear -> SiLU) whose per-block projections are
  added next to the noise-embedding projection, before the block's second normalisation
  (``docs/algorithms.md``, "SFD-v").
* AMED-Plugin (Zhou et al., CVPR 2024) reads the network's bottleneck features.

Both depend on where a given architecture keeps its blocks, so an :class:`ArchitectureAdapter` per
network class says it (``register_adapter``), and :func:`attach_step_condition` wraps any registered
network in :class:`StepConditioned`: the base network is untouched (its state-dict keys live under
``net.``) and the step projections enter through forward pre-hooks on the named modules, either added
to the module's input (``injection = "add"``) or applied to it as a FiLM (``injection = "film"``). A
network without a registered adapter is refused with one line saying how to add one
(``docs/methods.md``).

The network sits in its denoiser wrapper under ``.net`` (``sfdbench.diffusion.denoiser``) or under the
attribute the wrapper names in ``network_attribute`` (EDM's wrappers in ``networks/edm.py``: ``model``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from sfdbench.errors import BadInput
from sfdbench.networks.layers import edm_positional_embedding, positional_embedding

STEP_INITS = ("random", "zero")
EMBEDDING_STYLES = ("sin_cos", "edm_cos_sin", "edm_sin_cos")
INJECTIONS = ("add", "film")


@dataclass(frozen=True)
class StepEmbedding:
    """How the integer N is embedded: sinusoidal features of ``channels`` (``endpoint`` as EDM's
    SongUNet: the last frequency exactly 1/max_positions), then an MLP of width ``hidden``.

    ``style``: "sin_cos" is ``layers.positional_embedding`` ([sin | cos]); "edm_cos_sin" is EDM's own
    ``layers.edm_positional_embedding`` ([cos | sin], DhariwalUNet) and "edm_sin_cos" the same with the
    halves swapped ([sin | cos], SongUNet), each matching that network's noise embedding."""

    channels: int
    hidden: int
    endpoint: bool = True
    max_positions: int = 10_000
    style: str = "sin_cos"


def step_features(layout: StepEmbedding, n: torch.Tensor) -> torch.Tensor:
    """The sinusoidal features [len(n), channels] of the step counts ``n`` (float32)."""
    if layout.style == "sin_cos":
        return positional_embedding(n, layout.channels, layout.max_positions, layout.endpoint)
    if layout.style not in EMBEDDING_STYLES:
        raise BadInput(f"unknown step-embedding style {layout.style!r}: expected one of {', '.join(EMBEDDING_STYLES)}")
    features = edm_positional_embedding(n, layout.channels, layout.max_positions, layout.endpoint)
    if layout.style == "edm_sin_cos":
        half = features.shape[1] // 2
        features = torch.cat([features[:, half:], features[:, :half]], dim=1)
    return features


class ArchitectureAdapter:
    """Where one network architecture takes SFD-v's step condition and where its bottleneck is.

    Subclasses implement ``step_embedding``, ``injection_points`` (module names whose *input* gets
    the step projection, with that input's channel count C) and ``bottleneck``. ``injection`` says how
    the projection enters: "add" (a projection to C channels added to the input) or "film" (a
    projection to 2C channels [scale | shift], input h -> shift + h (1 + scale)). The default
    ``create_step_modules`` builds the new modules with PyTorch's ``nn.Linear`` init under ``seed``,
    in block order, then the embedding MLP."""

    injection: str = "add"

    def step_embedding(self, net: nn.Module) -> StepEmbedding:
        raise NotImplementedError

    def injection_points(self, net: nn.Module) -> list[tuple[str, int]]:
        raise NotImplementedError

    def bottleneck(self, net: nn.Module) -> str:
        """The name of the module whose output is the network's bottleneck feature map."""
        raise NotImplementedError

    def create_step_modules(self, net: nn.Module, seed: int) -> tuple[nn.Module, list[nn.Module]]:
        layout = self.step_embedding(net)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            projections = [nn.Linear(layout.hidden, self.projection_width(channels))
                           for _, channels in self.injection_points(net)]
            mlp = step_mlp(layout)
        return mlp, projections

    def projection_width(self, channels: int) -> int:
        """Outputs of the step projection for a site of ``channels`` channels (2C for a FiLM)."""
        return 2 * channels if self.injection == "film" else channels


def step_mlp(layout: StepEmbedding) -> nn.Module:
    return nn.Sequential(nn.Linear(layout.channels, layout.hidden), nn.SiLU(), nn.Linear(layout.hidden, layout.hidden),
                         nn.SiLU())


_ADAPTERS: dict[type, ArchitectureAdapter] = {}


def register_adapter(network_class: type, adapter: ArchitectureAdapter) -> None:
    """Declare ``adapter`` for ``network_class`` (and its subclasses)."""
    _ADAPTERS[network_class] = adapter


def adapter_for(net: nn.Module) -> ArchitectureAdapter:
    for cls in type(net).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    raise BadInput(f"no network adapter for architecture {type(net).__name__}: register one with "
                   "sfdbench.networks.adapters.register_adapter (see docs/methods.md)")


class StepProjection(nn.Linear):
    """One block's projection of the step embedding, added to the input of the hooked module
    (``inject`` is registered as that module's forward pre-hook). ``current`` holds the step
    embedding of the call in progress; None = no step condition (the hook does nothing)."""

    current: torch.Tensor | None = None

    def inject(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.current is None:
            return None
        h = args[0]
        projected = super().forward(self.current).to(h.dtype)
        return (h + projected.reshape(*projected.shape, *([1] * (h.ndim - 2))), *args[1:])


class StepFiLM(StepProjection):
    """One block's FiLM from the step embedding: [scale | shift] = Linear(e_step) (2C outputs), applied
    to the hooked module's input as h -> shift + h (1 + scale) (SFD-v on EDM's DhariwalUNet)."""

    def inject(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.current is None:
            return None
        h = args[0]
        projected = nn.Linear.forward(self, self.current).to(h.dtype)
        scale, shift = projected.reshape(*projected.shape, *([1] * (h.ndim - 2))).chunk(2, dim=1)
        return (torch.addcmul(shift, h, scale + 1), *args[1:])


class StepConditioned(nn.Module):
    """``net`` with SFD-v's step-condition branch: ``forward(x, c_noise, step_condition=None, **cond)``.

    ``step_condition`` is N (a scalar or shape [1], broadcast over the batch, or one value per
    sample); without it the network is exactly ``net``. ``init="zero"`` zeroes the per-block
    projections, so the model starts exactly as the teacher."""

    def __init__(self, net: nn.Module, seed: int = 0, init: str = "random"):
        super().__init__()
        if init not in STEP_INITS:
            raise BadInput(f"step-condition init must be one of {', '.join(STEP_INITS)}, got {init!r}")
        adapter = adapter_for(net)
        if adapter.injection not in INJECTIONS:
            raise BadInput(f"unknown step-condition injection {adapter.injection!r}: expected one of "
                           f"{', '.join(INJECTIONS)}")
        self.net = net
        self.embedding = adapter.step_embedding(net)
        mlp, projections = adapter.create_step_modules(net, seed)
        self.step_map = mlp
        self.step_proj = nn.ModuleList()
        projection_class = StepFiLM if adapter.injection == "film" else StepProjection
        for (name, _), linear in zip(adapter.injection_points(net), projections):
            proj = projection_class(linear.in_features, linear.out_features, device=linear.weight.device)
            with torch.no_grad():
                proj.weight.copy_(linear.weight)
                proj.bias.copy_(linear.bias)
                if init == "zero":
                    proj.weight.zero_()
                    proj.bias.zero_()
            net.get_submodule(name).register_forward_pre_hook(proj.inject)
            self.step_proj.append(proj)
        self.to(next(net.parameters()).device)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, step_condition=None, **cond) -> torch.Tensor:
        emb = None
        if step_condition is not None:
            n = torch.as_tensor(step_condition, dtype=torch.float32, device=x.device).reshape(-1)
            features = step_features(self.embedding, n)
            # the MLP runs in its weights' dtype (float32 also when the network runs in float16);
            # the projections are cast to each site's dtype
            emb = self.step_map(features.to(next(self.step_map.parameters()).dtype))
        for proj in self.step_proj:
            proj.current = emb
        try:
            return self.net(x, c_noise, **cond)
        finally:
            for proj in self.step_proj:
                proj.current = None


def network_attribute(denoiser: nn.Module) -> str:
    """The attribute of ``denoiser`` that holds its network: what the wrapper declares in
    ``network_attribute`` (EDM's wrappers: "model"), else "net" (``sfdbench.diffusion.denoiser``)."""
    name = getattr(type(denoiser), "network_attribute", "net")
    return name if isinstance(name, str) else "net"


def raw_network(denoiser: nn.Module) -> nn.Module:
    """The network inside a preconditioning wrapper (EDM, VP-epsilon): its ``net`` attribute, or the
    one the wrapper names in ``network_attribute`` (``model`` for EDM's wrappers)."""
    name = network_attribute(denoiser)
    net = getattr(denoiser, name, None)
    if not isinstance(net, nn.Module):
        raise BadInput(f"{type(denoiser).__name__} exposes no network (.{name}); wrap the model in a denoiser "
                       "of sfdbench.diffusion.denoiser")
    return net


def attach_step_condition(denoiser: nn.Module, seed: int = 0, init: str = "random") -> nn.Module:
    """A copy of ``denoiser`` whose network takes SFD-v's ``step_condition`` (the original is untouched)."""
    adapter_for(raw_network(denoiser))  # refuse unknown architectures before copying anything
    copied = copy.deepcopy(denoiser)
    name = network_attribute(copied)
    setattr(copied, name, StepConditioned(getattr(copied, name), seed, init))
    return copied


def is_step_conditioned(denoiser: nn.Module) -> bool:
    return isinstance(getattr(denoiser, network_attribute(denoiser), None), StepConditioned)


def bottleneck_module(denoiser: nn.Module) -> nn.Module:
    """The module whose output is the bottleneck feature map of ``denoiser``'s network (AMED)."""
    net = raw_network(denoiser)
    base = net.net if isinstance(net, StepConditioned) else net
    return base.get_submodule(adapter_for(base).bottleneck(base))


# ---------------------------------------------------------------------------------------------
# The embedded suites' network


class DigitsUNetAdapter(ArchitectureAdapter):
    """``sfdbench.networks.digits_unet.DigitsUNet``: the step embedding mirrors its noise embedding
    (``model_channels`` features, SongUNet's ``endpoint`` convention, MLP to ``emb_dim``); every
    residual block takes the projection at the input of ``norm1`` (its second GroupNorm), right
    after the noise-embedding projection was added; the bottleneck is the last encoder block at the
    top (8x8) level.

    Init: the new modules are drawn under ``seed`` in the order the network's own constructor
    would have drawn them had they been built into it (each block's projection after the block's
    own layers, the MLP last): the RNG is advanced past each existing layer by re-running its
    ``reset_parameters`` on a throwaway copy. This reproduces, bit for bit, the step-conditioned
    U-Net of sfdbench 0.1, which had the branch built in."""

    def step_embedding(self, net) -> StepEmbedding:
        return StepEmbedding(channels=net.noise_channels, hidden=net.map[2].out_features, endpoint=True)

    def _blocks(self, net) -> list[tuple[str, nn.Module]]:
        from sfdbench.networks.digits_unet import ResBlock

        return [(name, m) for name, m in net.named_modules() if isinstance(m, ResBlock)]

    def injection_points(self, net) -> list[tuple[str, int]]:
        return [(f"{name}.norm1", block.emb.out_features) for name, block in self._blocks(net)]

    def bottleneck(self, net) -> str:
        # the last encoder block at the top (8x8) resolution: its channel mean is the 64-d input AMED's predictor
        # was designed for (the reference reads EDM's last 8x8 encoder block on CIFAR-10)
        return f"down.{net.config['blocks'] - 1}"

    def create_step_modules(self, net, seed):
        layout = self.step_embedding(net)
        blocks = {id(block): block.emb.out_features for _, block in self._blocks(net)}
        projections: list[nn.Module] = []

        def replay(module: nn.Module) -> None:
            children = list(module.children())
            for child in children:
                replay(child)
            if not children and callable(getattr(module, "reset_parameters", None)):
                copy.deepcopy(module).reset_parameters()
            if id(module) in blocks:
                projections.append(nn.Linear(layout.hidden, blocks[id(module)]))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            replay(net)
            mlp = step_mlp(layout)
        return mlp, projections


# ---------------------------------------------------------------------------------------------
# EDM's U-Nets (networks/edm.py; SFD paper's reference, docs/algorithms.md "Step-condition branch")


class _EDMUNetAdapter(ArchitectureAdapter):
    """Shared by SongUNet and DhariwalUNet: every ``UNetBlock`` (encoder and decoder, in order) gets a
    projection; the step MLP mirrors the noise-embedding MLP; the bottleneck (AMED's input) is the
    output of the last encoder block, ``enc.{lowest}x{lowest}_block{num_blocks - 1}``, as AMED's reference
    reads it. The new modules are drawn under ``seed`` (projections in
    block order, then the MLP) with the architecture's own init (``init_linear``)."""

    site = "norm1"

    def _blocks(self, net) -> list[tuple[str, nn.Module]]:
        from sfdbench.networks.edm import UNetBlock

        return [(name, m) for name, m in net.named_modules() if isinstance(m, UNetBlock)]

    def injection_points(self, net) -> list[tuple[str, int]]:
        return [(f"{name}.{self.site}", block.out_channels) for name, block in self._blocks(net)]

    def bottleneck(self, net) -> str:
        # AMED's hook (Zhou et al., CVPR 2024; the reference reads EDM's enc['8x8_block3'] on CIFAR-10 and
        # enc['8x8_block2'] on ImageNet-64): the last encoder block, at the lowest resolution
        blocks = [key for key in net.enc if "_block" in key]
        return f"enc.{blocks[-1]}"

    def init_linear(self, linear: nn.Linear) -> None:
        raise NotImplementedError

    def create_step_modules(self, net, seed):
        mlp, projections = super().create_step_modules(net, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for linear in [*projections, *(m for m in mlp if isinstance(m, nn.Linear))]:
                self.init_linear(linear)
        return mlp, projections


class SongUNetAdapter(_EDMUNetAdapter):
    """EDM's SongUNet (DDPM++ / NCSN++): the step count gets the noise embedding's layout (width of
    ``map_layer0``'s input, ``endpoint``, [sin | cos] after the swap), an MLP to the embedding width
    (``map_layer1``), and each block's Linear(e_step -> C_out) is added at the input of ``norm1``,
    next to ``affine(emb)``. Init: Xavier-uniform weights, zero biases (SongUNet's own)."""

    def step_embedding(self, net) -> StepEmbedding:
        return StepEmbedding(channels=net.map_layer0.in_features, hidden=net.map_layer1.out_features, endpoint=True,
                             style="edm_sin_cos")

    def init_linear(self, linear: nn.Linear) -> None:
        from sfdbench.networks.edm import init_tensor

        with torch.no_grad():
            linear.weight.copy_(init_tensor(linear.weight.shape, "xavier_uniform", linear.in_features,
                                            linear.out_features))
            linear.bias.zero_()


class DhariwalUNetAdapter(_EDMUNetAdapter):
    """EDM's DhariwalUNet (ADM): the step count gets the noise embedding's layout (``model_channels``
    features, no endpoint, [cos | sin]), an MLP to the embedding width, and each block a second FiLM
    from Linear(e_step -> 2 C_out) = [scale | shift] on the modulated features (``film_site``, after
    shift + GN(h)(1 + scale), before the SiLU). Init: Kaiming-uniform x sqrt(1/3) for weights and
    biases (ADM's own)."""

    injection = "film"
    site = "film_site"

    def step_embedding(self, net) -> StepEmbedding:
        return StepEmbedding(channels=net.map_noise.num_channels, hidden=net.map_layer1.out_features, endpoint=False,
                             style="edm_cos_sin")

    def init_linear(self, linear: nn.Linear) -> None:
        from sfdbench.networks.edm import init_tensor

        scale = math.sqrt(1 / 3)
        with torch.no_grad():
            for p in (linear.weight, linear.bias):
                p.copy_(init_tensor(p.shape, "kaiming_uniform", linear.in_features, linear.out_features) * scale)


def _register_builtin() -> None:
    from sfdbench.networks.digits_unet import DigitsUNet
    from sfdbench.networks.edm import DhariwalUNet, SongUNet

    register_adapter(DigitsUNet, DigitsUNetAdapter())
    register_adapter(SongUNet, SongUNetAdapter())
    register_adapter(DhariwalUNet, DhariwalUNetAdapter())


_register_builtin()
