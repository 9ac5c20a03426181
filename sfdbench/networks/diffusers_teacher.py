"""Latent ε-prediction teachers from diffusers (LDM on LSUN-Bedroom, Stable Diffusion v1.5) as EDM denoisers.

A teacher is a diffusers pipeline folder (``unet/``, ``scheduler/``, and ``vqvae/`` or ``vae/`` +
``text_encoder/`` + ``tokenizer/``), given as a local folder or a Hugging Face hub id that is resolved
from the local hub cache only (``local_files_only=True``: nothing is downloaded here; ``HF_HUB_OFFLINE=1``
is honoured the same way). Weights load with ``use_safetensors=True``: a folder holding only
``.bin`` / ``.ckpt`` pickles is refused unless the caller explicitly allows pickles.

The U-Net is an ε-prediction discrete-VP model. ``UNetEpsilon`` exposes it as ``F(x_in, c_noise, **cond) ->
eps`` and ``diffusion.denoiser.VPEpsilonDenoiser`` turns it into D(x; sigma) = x - sigma eps(x / sqrt(sigma^2
+ 1), M tau(sigma) - 1) on the model's own noise table (``schedules.DiscreteVP``, built in float64 from the
scheduler config: Karras et al. 2022, Table 1 "VP" column; ``docs/algorithms.md``, "Denoiser wrappers").

Text conditioning (SD): ``cond["caption_index"]`` ([B] int64) names caption i of the suite's caption list;
index -1 is the empty prompt "" (the unconditional branch of classifier-free guidance, as diffusers'
``StableDiffusionPipeline`` encodes a missing negative prompt). ``TextEmbeddings`` tokenizes a caption
(padding to ``model_max_length``, truncation) and runs the CLIP text encoder once per caption; the
``last_hidden_state`` is cached (an LRU of ``capacity`` captions, so memory stays bounded over 30k
captions) and fed to the U-Net as ``encoder_hidden_states``. The embeddings live outside the module tree
(no parameters, not in state dicts, shared by deep copies), so a student built by deep copy trains the
U-Net only.

Decoding: ``LatentDecoder`` maps final latents to images in [-1, 1] -- ``vae.decode(z / scaling_factor)``
(SD's AutoencoderKL) or ``vqvae.decode(z / scaling_factor)`` with VQ quantisation (the LDM's VQ-f4, as
diffusers' latent-diffusion pipeline decodes), in chunks of ``chunk`` latents.

SFD-v's step condition on these U-Nets (``DiffusersUNetAdapter``, registered in ``networks.adapters``):
the integer N gets the U-Net's own sinusoidal layout (``block_out_channels[0]`` features, max period 1e4,
[cos | sin]), an MLP Linear -> SiLU -> Linear -> SiLU to the time-embedding width, and each ResNet block's
``Linear(e_step) -> C_out`` is added to its hidden state right after the time embedding, i.e. at the input
of ``norm2`` (SFD paper, arXiv 2409.19681, Sec. 4.2; ``docs/algorithms.md``, "Step-condition branch").
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from sfdbench.diffusion.denoiser import VPEpsilonDenoiser
from sfdbench.diffusion.schedules import DiscreteVP
from sfdbench.errors import BadInput, MissingAsset
from sfdbench.networks.adapters import ArchitectureAdapter, StepEmbedding, register_adapter

UNCONDITIONAL_INDEX = -1  # caption index of the empty prompt ""


# ---------------------------------------------------------------------------------------------
# Locating a pipeline


def resolve_pipeline(spec, fetch_hint: str = "") -> Path:
    """A local diffusers pipeline folder for ``spec``: an existing folder, or a hub id ("org/name") found in
    the local Hugging Face cache (never downloaded). ``MissingAsset`` names the command that fetches it."""
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise BadInput(f"--teacher {path} is not a diffusers pipeline folder (no model_index.json, no unet/); "
                           "pass a folder written by save_pretrained or a hub id")
        return path
    text = str(spec)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise BadInput(f"--teacher {text} is neither a diffusers pipeline folder nor a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, RepositoryNotFoundError, ...
        hint = fetch_hint or f"`hf download {text}`"
        raise MissingAsset(f"teacher {text} is not in the local Hugging Face cache ({type(exc).__name__}): run "
                           f"{hint} (it is never downloaded during a run), or pass --teacher FOLDER") from None


PIPELINE_PARTS = ("unet", "scheduler", "vae", "vqvae", "text_encoder", "tokenizer")


def folder_digest(folder: Path) -> str:
    """sha256 over (relative path, sha256) of the files the suites load: ``model_index.json`` and the
    safetensors, JSON and text files of ``unet/``, ``scheduler/``, ``vae/`` or ``vqvae/``, ``text_encoder/``
    and ``tokenizer/`` (other files of a hub snapshot, e.g. pickled duplicates, are not read)."""
    import hashlib

    from sfdbench.io import sha256_file

    h = hashlib.sha256()
    folder = Path(folder)
    files = sorted(p for part in PIPELINE_PARTS if (folder / part).is_dir() for p in (folder / part).rglob("*")
                   if p.is_file() and p.suffix in (".safetensors", ".json", ".txt"))
    files = sorted([*files, *([folder / "model_index.json"] if (folder / "model_index.json").is_file() else [])])
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}\t{sha256_file(p.resolve())}\n".encode())
    return h.hexdigest()


def discrete_vp_from_scheduler(folder: Path) -> DiscreteVP:
    """The teacher's noise table from ``scheduler/scheduler_config.json`` (float64): ``scaled_linear``
    (LDM's "linear" = square-root spacing), ``linear`` or explicit ``trained_betas``; ε-prediction only."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise BadInput(f"{path} is missing: the teacher's noise table comes from its scheduler config")
    cfg = json.loads(path.read_text())
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise BadInput(f"{folder}: prediction_type {cfg.get('prediction_type')!r}; these suites wrap ε-prediction "
                       "U-Nets only")
    m = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        return DiscreteVP.from_betas(cfg["trained_betas"])
    kind = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    if kind == "scaled_linear":
        return DiscreteVP.scaled_linear(start, end, m)
    if kind == "linear":
        return DiscreteVP.linear(start, end, m)
    raise BadInput(f"{folder}: beta_schedule {kind!r} is not supported (scaled_linear, linear, trained_betas)")


def _load(cls, folder: Path, sub: str, allow_pickle: bool = False):
    target = Path(folder) / sub
    if not target.is_dir():
        raise BadInput(f"{target} is missing: the teacher folder needs {sub}/")
    has_st = any(target.glob("*.safetensors"))
    if not has_st and not allow_pickle:
        raise BadInput(f"{target} holds no .safetensors weights; pickled weights are refused by default "
                       "(convert them to safetensors)")
    try:
        return cls.from_pretrained(target, use_safetensors=has_st, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise BadInput(f"cannot load {target} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


# ---------------------------------------------------------------------------------------------
# Text embeddings


class TextEmbeddings:
    """CLIP text embeddings of captions, computed once per caption and kept in an LRU of ``capacity``.

    ``captions`` is a callable index -> caption text (the suite's caption list); index -1 is "".
    Not an ``nn.Module``: it is shared (not copied) by ``copy.deepcopy``, so teacher and student use one
    cache and the text encoder is never trained."""

    def __init__(self, text_encoder, tokenizer, captions=None, capacity: int = 4096):
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.captions = captions
        self.capacity = int(capacity)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.encoded = 0  # captions run through the encoder (for tests: once per caption)

    def __deepcopy__(self, memo):
        return self

    def caption(self, index: int) -> str:
        if index == UNCONDITIONAL_INDEX:
            return ""
        if self.captions is None:
            raise BadInput("this teacher has no caption list: conditioning needs the suite's captions")
        return self.captions(index)

    def to(self, device) -> TextEmbeddings:
        self.text_encoder.to(device)
        self._cache.clear()
        return self

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), L, D] last hidden states (StableDiffusionPipeline.encode_prompt without clip skip)."""
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        self.encoded += len(texts)
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        idx = [int(i) for i in indices.reshape(-1).tolist()]
        missing = list(dict.fromkeys(i for i in idx if i not in self._cache))
        if missing:
            emb = self.encode_texts([self.caption(i) for i in missing])
            for i, e in zip(missing, emb):
                self._cache[i] = e
        for i in idx:
            self._cache.move_to_end(i)
        out = torch.stack([self._cache[i] for i in idx])
        while len(self._cache) > max(self.capacity, len(set(idx))):
            self._cache.popitem(last=False)
        return out


# ---------------------------------------------------------------------------------------------
# The network seen by the VP-epsilon wrapper


class UNetEpsilon(nn.Module):
    """``F(x_in, c_noise, caption_index=None, **cond) -> eps``: a diffusers ``UNet2DModel`` (unconditional)
    or ``UNet2DConditionModel`` (text, through ``TextEmbeddings``) called with the fractional timestep
    ``c_noise`` [B]. Other conditioning keys are ignored (step conditions are handled by the adapter)."""

    def __init__(self, unet: nn.Module, text: TextEmbeddings | None = None):
        super().__init__()
        self.unet = unet
        self.text = text

    @property
    def conditional(self) -> bool:
        return self.text is not None

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, caption_index: torch.Tensor | None = None,
                **cond) -> torch.Tensor:
        t = c_noise.reshape(-1).to(device=x.device, dtype=torch.float32).expand(x.shape[0])
        if self.text is None:
            return self.unet(x, t).sample
        if caption_index is None:
            raise BadInput("a text-conditioned teacher needs cond['caption_index'] (-1 = the empty prompt)")
        states = self.text(caption_index).to(device=x.device, dtype=x.dtype)
        return self.unet(x, t, encoder_hidden_states=states).sample


class LatentDecoder:
    """Final latents -> images in [-1, 1]: ``first_stage.decode(z / scaling_factor)`` in chunks (VQ models
    quantise first, as diffusers' latent-diffusion pipeline does). Shared by deep copies."""

    def __init__(self, first_stage: nn.Module, chunk: int = 8):
        self.model = first_stage.eval().requires_grad_(False)
        self.scaling = float(getattr(first_stage.config, "scaling_factor", 1.0) or 1.0)
        self.chunk = int(chunk)

    def __deepcopy__(self, memo):
        return self

    def to(self, device) -> LatentDecoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        out = []
        for s in range(0, latents.shape[0], self.chunk):
            z = latents[s:s + self.chunk].to(device=param.device, dtype=param.dtype) / self.scaling
            out.append(self.model.decode(z).sample.float())
        return torch.cat(out)


class DiffusersTeacher(VPEpsilonDenoiser):
    """``VPEpsilonDenoiser`` around ``UNetEpsilon`` (the network under ``.net``) with the pipeline's
    decoder attached (``decoder``) and the source folder recorded."""

    def __init__(self, net: UNetEpsilon, vp: DiscreteVP, decoder: LatentDecoder | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None, folder: str = ""):
        super().__init__(net, vp, sigma_min, sigma_max)
        self.decoder = decoder
        self.folder = folder


def load_diffusers_teacher(folder: Path, *, text: bool, allow_pickle: bool = False, device="cpu",
                           sigma_min: float | None = None, sigma_max: float | None = None,
                           captions=None) -> DiffusersTeacher:
    """The teacher of a diffusers pipeline folder: U-Net (``unet/``), noise table (``scheduler/``), decoder
    (``vae/`` AutoencoderKL or ``vqvae/`` VQModel), and with ``text`` the CLIP text encoder + tokenizer."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel, VQModel

    diffusers.utils.logging.set_verbosity_error()  # no accelerate / progress chatter on stdout
    diffusers.utils.logging.disable_progress_bar()

    folder = Path(folder)
    vp = discrete_vp_from_scheduler(folder)
    unet_cls = UNet2DConditionModel if text else UNet2DModel
    unet = _load(unet_cls, folder, "unet", allow_pickle)
    if (folder / "vae").is_dir():
        first_stage = _load(AutoencoderKL, folder, "vae", allow_pickle)
    elif (folder / "vqvae").is_dir():
        first_stage = _load(VQModel, folder, "vqvae", allow_pickle)
    else:
        raise BadInput(f"{folder} has neither vae/ nor vqvae/: the suite decodes latents with the pipeline's "
                       "first stage")
    embeddings = None
    if text:
        try:
            import transformers
            from transformers import CLIPTextModel, CLIPTokenizer

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:
            raise BadInput("the ms_coco suite needs transformers: pip install transformers") from None
        if not (folder / "tokenizer").is_dir():
            raise BadInput(f"{folder / 'tokenizer'} is missing: the teacher folder needs tokenizer/")
        encoder = _load(CLIPTextModel, folder, "text_encoder", allow_pickle)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        embeddings = TextEmbeddings(encoder.to(device), tokenizer, captions)
    net = UNetEpsilon(unet, embeddings)
    teacher = DiffusersTeacher(net, vp, LatentDecoder(first_stage).to(device), sigma_min, sigma_max, str(folder))
    return teacher.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# SFD-v step condition on diffusers U-Nets


class DiffusersUNetAdapter(ArchitectureAdapter):
    """``UNetEpsilon`` around a diffusers ``UNet2DModel`` / ``UNet2DConditionModel``: the step count gets the
    U-Net's timestep layout (``block_out_channels[0]`` features, [cos | sin], max period 1e4, no endpoint --
    ``edm_cos_sin``), an MLP to the time-embedding width, and every ``ResnetBlock2D`` a ``Linear(e_step ->
    C_out)`` added at the input of ``norm2``, where the block has just added its time embedding. Init:
    PyTorch's default ``nn.Linear`` (the LDM reference's step modules are not zero-initialised). Bottleneck:
    the mid block."""

    def step_embedding(self, net) -> StepEmbedding:
        unet = net.unet
        return StepEmbedding(channels=int(unet.config.block_out_channels[0]),
                             hidden=int(unet.time_embedding.linear_2.out_features), endpoint=False,
                             style="edm_cos_sin")

    def injection_points(self, net) -> list[tuple[str, int]]:
        from diffusers.models.resnet import ResnetBlock2D

        return [(f"{name}.norm2", int(m.norm2.num_channels)) for name, m in net.named_modules()
                if isinstance(m, ResnetBlock2D)]

    def bottleneck(self, net) -> str:
        return "unet.mid_block"


register_adapter(UNetEpsilon, DiffusersUNetAdapter())


def guided_nfe(steps: int, scale: float) -> int:
    """Network evaluations of ``steps`` guided denoiser calls: 2 per call unless w in {0, 1}."""
    return steps * (1 if scale in (0.0, 1.0) else 2)


__all__ = ["DiffusersTeacher", "DiffusersUNetAdapter", "LatentDecoder", "TextEmbeddings", "UNetEpsilon",
           "discrete_vp_from_scheduler", "folder_digest", "load_diffusers_teacher", "resolve_pipeline",
           "guided_nfe"]
