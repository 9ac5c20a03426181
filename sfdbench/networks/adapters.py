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
``net.``) and the step projections enter through forward pre-hooks on the named modules. A network
without a registered adapter is refused with one line saying how to add one (``docs/methods.md``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from sfdbench.errors import BadInput
from sfdbench.networks.layers import positional_embedding

STEP_INITS = ("random", "zero")


@dataclass(frozen=True)
class StepEmbedding:
    """How the integer N is embedded: sinusoidal features of ``channels`` (``endpoint`` as EDM's
    SongUNet: the last frequency exactly 1/max_positions), then an MLP of width ``hidden``."""

    channels: int
    hidden: int
    endpoint: bool = True
    max_positions: int = 10_000


class ArchitectureAdapter:
    """Where one network architecture takes SFD-v's step condition and where its bottleneck is.

    Subclasses implement ``step_embedding``, ``injection_points`` (module names whose *input* gets
    the step projection added, with that input's channel count) and ``bottleneck``. The default
    ``create_step_modules`` builds the new modules with PyTorch's ``nn.Linear`` init under ``seed``,
    in block order, then the embedding MLP."""

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
            projections = [nn.Linear(layout.hidden, channels) for _, channels in self.injection_points(net)]
            mlp = step_mlp(layout)
        return mlp, projections


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
        projected = super().forward(self.current)
        return (h + projected.reshape(*projected.shape, *([1] * (h.ndim - 2))), *args[1:])


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
        self.net = net
        self.embedding = adapter.step_embedding(net)
        mlp, projections = adapter.create_step_modules(net, seed)
        self.step_map = mlp
        self.step_proj = nn.ModuleList()
        for (name, _), linear in zip(adapter.injection_points(net), projections):
            proj = StepProjection(linear.in_features, linear.out_features, device=linear.weight.device)
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
            layout = self.embedding
            features = positional_embedding(n, layout.channels, layout.max_positions, layout.endpoint)
            emb = self.step_map(features.to(x.dtype))
        for proj in self.step_proj:
            proj.current = emb
        try:
            return self.net(x, c_noise, **cond)
        finally:
            for proj in self.step_proj:
                proj.current = None


def raw_network(denoiser: nn.Module) -> nn.Module:
    """The network inside a preconditioning wrapper (EDM, VP-epsilon): its ``net`` attribute."""
    net = getattr(denoiser, "net", None)
    if not isinstance(net, nn.Module):
        raise BadInput(f"{type(denoiser).__name__} exposes no network (.net); wrap the model in a denoiser "
                       "of sfdbench.diffusion.denoiser")
    return net


def attach_step_condition(denoiser: nn.Module, seed: int = 0, init: str = "random") -> nn.Module:
    """A copy of ``denoiser`` whose network takes SFD-v's ``step_condition`` (the original is untouched)."""
    adapter_for(raw_network(denoiser))  # refuse unknown architectures before copying anything
    copied = copy.deepcopy(denoiser)
    copied.net = StepConditioned(copied.net, seed, init)
    return copied


def is_step_conditioned(denoiser: nn.Module) -> bool:
    return isinstance(getattr(denoiser, "net", None), StepConditioned)


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
    after the noise-embedding projection was added; the bottleneck is the last middle block.

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
        return f"mid.{len(net.mid) - 1}"

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


def _register_builtin() -> None:
    from sfdbench.networks.digits_unet import DigitsUNet

    register_adapter(DigitsUNet, DigitsUNetAdapter())


_register_builtin()
