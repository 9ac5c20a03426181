"""CompVis latent-diffusion checkpoints (``model.ckpt`` of ``lsun_bedrooms.zip``) -> a diffusers folder, without
running code from the file.

Reading (``read_checkpoint``). A ``.ckpt`` is a PyTorch zip archive (``<name>/data.pkl`` + one raw little-endian
record per storage under ``<name>/data/``) written by PyTorch Lightning. Its pickle is read by
``RestrictedUnpickler``:

* tensors come only from ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` (arguments checked: ints,
  an empty hook dict), rebuilt by ``as_strided`` on the storage's bytes read from the archive
  (``persistent_load`` accepts only ``('storage', <torch *Storage>, key, location, numel)``);
* ``collections.OrderedDict`` is the real class; the ``torch.*Storage`` names map to dtypes;
* every other global the file names (Lightning callbacks, optimiser or hyper-parameter classes, ``os.system``,
  ...) becomes an inert stand-in class that only records its name and the arguments it was given: nothing is
  imported and nothing named in the file is ever called. Only tensors are taken from the result.

Converting (``convert_ldm``). The LatentDiffusion ``state_dict`` holds the U-Net (``model.diffusion_model.*``; its
EMA copy under ``model_ema.<name without dots>``, which the reference samples with), the VQ first stage
(``first_stage_model.*``) and the noise table (``betas``). The U-Net (LDM's ``openaimodel.UNetModel``) is mapped
onto diffusers' ``UNet2DModel`` and the first stage (taming's ``VQModel``) onto diffusers' ``VQModel``; both
configurations are read from the weights' shapes (levels, channels, blocks per level, attention per level),
except the attention head width, which the weights do not hold (``head_channels``, 32 for LSUN-Bedroom:
``num_head_channels`` of the LDM's ``lsun_beds256`` config). Layouts (the names follow diffusers' own LDM
conversion script):

* ResBlock ``in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection`` -> ``norm1, conv1, time_emb_proj,
  norm2, conv2, conv_shortcut``;
* AttentionBlock: ``qkv`` (Conv1d, 3HC outputs in LDM's legacy order: per head [q | k | v]) -> ``to_q, to_k, to_v``
  (head-major); ``proj_out`` -> ``to_out.0``; ``norm`` -> ``group_norm``;
* ``time_embed.0/2`` -> ``time_embedding.linear_1/2``; ``input_blocks.0.0`` -> ``conv_in``; ``out.0/2`` ->
  ``conv_norm_out/conv_out``; ``Downsample.op`` / ``Upsample.conv`` -> ``downsamplers.0.conv`` /
  ``upsamplers.0.conv``;
* taming: ``down.{i}.block.{j}`` -> ``down_blocks.{i}.resnets.{j}`` (``nin_shortcut`` -> ``conv_shortcut``),
  ``up.{i}`` -> ``up_blocks.{L-1-i}``, ``mid.block_1/attn_1/block_2``, attention ``q, k, v, proj_out`` (1x1 convs)
  -> ``to_q, to_k, to_v, to_out.0``, ``norm_out`` -> ``conv_norm_out``.

The folder gets ``unet/``, ``vqvae/`` (``scaling_factor`` 1.0), ``scheduler/`` (DDIM config of the checkpoint's own
betas: ``scaled_linear`` with its end points when the table is LDM's square-root spacing to 1e-6, else
``trained_betas``), ``model_index.json`` and ``conversion.json`` (source sha256, EMA or not, key counts), all
weights as safetensors. Every refusal is a ``BadInput`` (exit 2).
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from sfdbench.errors import BadInput

STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


class Inert:
    """Stand-in for a global the checkpoint names but we do not trust: records, never runs anything."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return Inert(*args, **kwargs)

    def __setitem__(self, key, value):  # SETITEM(S) on a stand-in dict subclass
        pass

    def append(self, value):  # APPEND(S) on a stand-in list subclass
        pass

    def extend(self, values):
        pass


def _inert(module: str, name: str) -> type:
    return type(f"Inert[{module}.{name}]", (Inert,), {"qualname": f"{module}.{name}"})


class _Storage:
    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise BadInput("checkpoint tensor without a storage from the archive; refusing it")
    if not (isinstance(offset, int) and all(isinstance(v, int) for v in (*size, *stride))):
        raise BadInput("checkpoint tensor with non-integer offset / size / stride; refusing it")
    if hooks:
        raise BadInput("checkpoint tensor with backward hooks; refusing it")
    return storage.flat.as_strided(tuple(size), tuple(stride), offset).clone()


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    if not isinstance(data, torch.Tensor) or hooks:
        raise BadInput("checkpoint parameter that is not a plain tensor; refusing it")
    return data


class RestrictedUnpickler(pickle.Unpickler):
    """The checkpoint's pickle with tensors rebuilt from the archive and every other global inert."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, _Storage] = {}
        self.inert: set[str] = set()

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return ("storage-type", name)
        self.inert.add(f"{module}.{name}")
        return _inert(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], tuple) and pid[1][0] == "storage-type" and isinstance(pid[2], str)):
            raise BadInput(f"checkpoint persistent id {str(pid)[:80]!r} is not a tensor storage; refusing it")
        dtype, key, numel = STORAGE_DTYPES[pid[1][1]], pid[2], pid[4]
        if key not in self.storages:
            if not re.fullmatch(r"[0-9A-Za-z_]+", key):
                raise BadInput(f"checkpoint storage key {key!r} is not a plain name")
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise BadInput(f"checkpoint storage {key} is missing from the archive") from None
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if isinstance(numel, int) and flat.numel() != numel:
                raise BadInput(f"checkpoint storage {key} holds {flat.numel()} values, expected {numel}")
            self.storages[key] = _Storage(flat)
        return self.storages[key]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the tensors of the checkpoint's ``state_dict`` (or of the top-level dict), the globals made inert)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist")
    if not zipfile.is_zipfile(path):
        raise BadInput(f"{path} is not a PyTorch zip checkpoint (legacy pre-1.6 pickles are not read)")
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(names) != 1:
            raise BadInput(f"{path} holds {len(names)} data.pkl records; expected one")
        prefix = names[0][: -len("data.pkl")]
        with archive.open(names[0]) as f:
            unpickler = RestrictedUnpickler(f, archive, prefix)
            try:
                top = unpickler.load()
            except BadInput:
                raise
            except Exception as exc:
                raise BadInput(f"cannot read {path} ({type(exc).__name__}: {exc})") from None
    sd = top.get("state_dict", top) if isinstance(top, dict) else None
    if not isinstance(sd, dict):
        raise BadInput(f"{path} holds no state_dict")
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise BadInput(f"{path} holds no tensors in its state_dict")
    return tensors, sorted(unpickler.inert)


# ---------------------------------------------------------------------------------------------
# U-Net: LDM openaimodel.UNetModel -> diffusers UNet2DModel


def _take(sd: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def ema_unet(sd: dict, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    """The U-Net weights (``diffusion_model.``-relative names), from the EMA copy when present and asked for."""
    unet = _take(sd, "model.diffusion_model.")
    if not unet:
        raise BadInput("no model.diffusion_model.* weights: not a CompVis LatentDiffusion checkpoint")
    ema = {k: v for k, v in sd.items() if k.startswith("model_ema.")}
    if not use_ema or not ema:
        return unet, False
    out = {}
    for name in unet:
        key = "model_ema." + ("diffusion_model." + name).replace(".", "")
        if key not in ema:
            raise BadInput(f"EMA weights incomplete: {key} missing (use --no-ema to convert the raw weights)")
        out[name] = ema[key]
    return out, True


def unet_layout(w: dict) -> dict:
    """Levels, channels, blocks per level and attention per level, from the weight names and shapes."""
    n_in = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("input_blocks."))
    levels, current = [], {"blocks": 0, "attention": False, "channels": None}
    for i in range(1, n_in):
        if f"input_blocks.{i}.0.op.weight" in w:
            levels.append(current)
            current = {"blocks": 0, "attention": False, "channels": None}
            continue
        if f"input_blocks.{i}.0.out_layers.3.weight" not in w:
            raise BadInput(f"input_blocks.{i} is neither a ResBlock nor a Downsample; unsupported U-Net")
        current["blocks"] += 1
        current["channels"] = int(w[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])
        current["attention"] |= f"input_blocks.{i}.1.qkv.weight" in w
    levels.append(current)
    blocks = {lv["blocks"] for lv in levels}
    if len(blocks) != 1:
        raise BadInput(f"levels with different block counts {sorted(blocks)}; unsupported U-Net")
    if any(k.startswith("label_emb") for k in w) or any(".proj_in." in k or "transformer_blocks" in k for k in w):
        raise BadInput("class- or text-conditioned LDM U-Net; only the unconditional UNetModel is converted")
    return {"levels": levels, "blocks": blocks.pop(), "in": int(w["input_blocks.0.0.weight"].shape[1]),
            "out": int(w["out.2.weight"].shape[0]), "model_channels": int(w["input_blocks.0.0.weight"].shape[0])}


def _resnet(dst: dict, d: str, w: dict, s: str) -> None:
    for a, b in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                 ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")):
        for p in ("weight", "bias"):
            if f"{s}.{a}.{p}" in w:
                dst[f"{d}.{b}.{p}"] = w[f"{s}.{a}.{p}"]


def _attention(dst: dict, d: str, w: dict, s: str, head_channels: int) -> None:
    qkv_w, qkv_b = w[f"{s}.qkv.weight"], w[f"{s}.qkv.bias"]
    three_hc = qkv_w.shape[0]
    c = three_hc // 3
    if c % head_channels:
        raise BadInput(f"{s}: {c} channels are not a multiple of the head width {head_channels}")
    heads = c // head_channels
    wq = qkv_w.reshape(heads, 3, head_channels, -1)  # LDM's legacy order: per head [q | k | v]
    bq = qkv_b.reshape(heads, 3, head_channels)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        dst[f"{d}.{name}.weight"] = wq[:, i].reshape(c, -1).contiguous()
        dst[f"{d}.{name}.bias"] = bq[:, i].reshape(c).contiguous()
    dst[f"{d}.to_out.0.weight"] = w[f"{s}.proj_out.weight"].reshape(c, c)
    dst[f"{d}.to_out.0.bias"] = w[f"{s}.proj_out.bias"]
    dst[f"{d}.group_norm.weight"] = w[f"{s}.norm.weight"]
    dst[f"{d}.group_norm.bias"] = w[f"{s}.norm.bias"]


def convert_unet(w: dict, head_channels: int, sample_size: int):
    """(diffusers UNet2DModel with the converted weights loaded strictly, its config)."""
    from diffusers import UNet2DModel

    lay = unet_layout(w)
    levels, r = lay["levels"], lay["blocks"]
    config = dict(sample_size=sample_size, in_channels=lay["in"], out_channels=lay["out"],
                  block_out_channels=tuple(lv["channels"] for lv in levels), layers_per_block=r,
                  down_block_types=tuple("AttnDownBlock2D" if lv["attention"] else "DownBlock2D" for lv in levels),
                  up_block_types=tuple("AttnUpBlock2D" if lv["attention"] else "UpBlock2D" for lv in levels[::-1]),
                  attention_head_dim=head_channels, norm_num_groups=32, norm_eps=1e-5, downsample_padding=1,
                  flip_sin_to_cos=True, freq_shift=0)
    dst: dict[str, torch.Tensor] = {}
    for a, b in (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                 ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")):
        dst[f"{b}.weight"], dst[f"{b}.bias"] = w[f"{a}.weight"], w[f"{a}.bias"]
    i = 1
    for li, lv in enumerate(levels):
        for j in range(r):
            _resnet(dst, f"down_blocks.{li}.resnets.{j}", w, f"input_blocks.{i}.0")
            if lv["attention"]:
                _attention(dst, f"down_blocks.{li}.attentions.{j}", w, f"input_blocks.{i}.1", head_channels)
            i += 1
        if li < len(levels) - 1:
            dst[f"down_blocks.{li}.downsamplers.0.conv.weight"] = w[f"input_blocks.{i}.0.op.weight"]
            dst[f"down_blocks.{li}.downsamplers.0.conv.bias"] = w[f"input_blocks.{i}.0.op.bias"]
            i += 1
    _resnet(dst, "mid_block.resnets.0", w, "middle_block.0")
    _attention(dst, "mid_block.attentions.0", w, "middle_block.1", head_channels)
    _resnet(dst, "mid_block.resnets.1", w, "middle_block.2")
    o = 0
    for ui, lv in enumerate(levels[::-1]):
        for j in range(r + 1):
            _resnet(dst, f"up_blocks.{ui}.resnets.{j}", w, f"output_blocks.{o}.0")
            k = 1
            if lv["attention"]:
                _attention(dst, f"up_blocks.{ui}.attentions.{j}", w, f"output_blocks.{o}.1", head_channels)
                k = 2
            if j == r and ui < len(levels) - 1:
                dst[f"up_blocks.{ui}.upsamplers.0.conv.weight"] = w[f"output_blocks.{o}.{k}.conv.weight"]
                dst[f"up_blocks.{ui}.upsamplers.0.conv.bias"] = w[f"output_blocks.{o}.{k}.conv.bias"]
            o += 1
    model = UNet2DModel(**config)
    _load_strict(model, dst, "U-Net")
    return model, config


# ---------------------------------------------------------------------------------------------
# First stage: taming VQModel -> diffusers VQModel


def _vq_resnet(dst, d, w, s):
    for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                 ("nin_shortcut", "conv_shortcut")):
        for p in ("weight", "bias"):
            if f"{s}.{a}.{p}" in w:
                dst[f"{d}.{b}.{p}"] = w[f"{s}.{a}.{p}"]


def _vq_attention(dst, d, w, s):
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        weight = w[f"{s}.{a}.weight"]
        dst[f"{d}.{b}.weight"] = weight.reshape(weight.shape[0], weight.shape[1])
        dst[f"{d}.{b}.bias"] = w[f"{s}.{a}.bias"]
    dst[f"{d}.group_norm.weight"], dst[f"{d}.group_norm.bias"] = w[f"{s}.norm.weight"], w[f"{s}.norm.bias"]


def convert_vq(w: dict):
    """(diffusers VQModel with the converted first stage loaded strictly, its config)."""
    from diffusers import VQModel

    n = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.down."))
    if any(k.startswith(f"encoder.down.{i}.attn") for i in range(n) for k in w):
        raise BadInput("first stage with attention inside its levels; only VQ-f4/f8-style stages are converted")
    r = 1 + max(int(k.split(".")[4]) for k in w if k.startswith("encoder.down.0.block."))
    channels = tuple(int(w[f"encoder.down.{i}.block.{r - 1}.conv2.weight"].shape[0]) for i in range(n))
    emb = w["quantize.embedding.weight"]
    config = dict(in_channels=int(w["encoder.conv_in.weight"].shape[1]), out_channels=int(w["decoder.conv_out.weight"]
                  .shape[0]), down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                  block_out_channels=channels, layers_per_block=r, latent_channels=int(w["encoder.conv_out.weight"]
                                                                                     .shape[0]),
                  num_vq_embeddings=int(emb.shape[0]), vq_embed_dim=int(emb.shape[1]), norm_num_groups=32,
                  scaling_factor=1.0)
    dst: dict[str, torch.Tensor] = {}
    for part in ("encoder", "decoder"):
        for a, b in (("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")):
            dst[f"{part}.{b}.weight"], dst[f"{part}.{b}.bias"] = w[f"{part}.{a}.weight"], w[f"{part}.{a}.bias"]
        _vq_resnet(dst, f"{part}.mid_block.resnets.0", w, f"{part}.mid.block_1")
        _vq_attention(dst, f"{part}.mid_block.attentions.0", w, f"{part}.mid.attn_1")
        _vq_resnet(dst, f"{part}.mid_block.resnets.1", w, f"{part}.mid.block_2")
    for i in range(n):
        for j in range(r):
            _vq_resnet(dst, f"encoder.down_blocks.{i}.resnets.{j}", w, f"encoder.down.{i}.block.{j}")
        if f"encoder.down.{i}.downsample.conv.weight" in w:
            dst[f"encoder.down_blocks.{i}.downsamplers.0.conv.weight"] = w[f"encoder.down.{i}.downsample.conv.weight"]
            dst[f"encoder.down_blocks.{i}.downsamplers.0.conv.bias"] = w[f"encoder.down.{i}.downsample.conv.bias"]
        u = n - 1 - i
        for j in range(r + 1):
            _vq_resnet(dst, f"decoder.up_blocks.{u}.resnets.{j}", w, f"decoder.up.{i}.block.{j}")
        if f"decoder.up.{i}.upsample.conv.weight" in w:
            dst[f"decoder.up_blocks.{u}.upsamplers.0.conv.weight"] = w[f"decoder.up.{i}.upsample.conv.weight"]
            dst[f"decoder.up_blocks.{u}.upsamplers.0.conv.bias"] = w[f"decoder.up.{i}.upsample.conv.bias"]
    for name in ("quant_conv", "post_quant_conv"):
        dst[f"{name}.weight"], dst[f"{name}.bias"] = w[f"{name}.weight"], w[f"{name}.bias"]
    dst["quantize.embedding.weight"] = emb
    model = VQModel(**config)
    _load_strict(model, dst, "first stage")
    return model, config


def _load_strict(model: torch.nn.Module, dst: dict, what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(dst))
    extra = sorted(set(dst) - set(expected))
    if missing or extra:
        raise BadInput(f"{what}: the checkpoint does not map onto the inferred diffusers model (missing "
                       f"{missing[:3]}, unexpected {extra[:3]}); unsupported architecture")
    for k, v in dst.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise BadInput(f"{what}: {k} has shape {tuple(v.shape)}, the inferred model needs "
                           f"{tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in dst.items()}, strict=True)


# ---------------------------------------------------------------------------------------------
# The folder


def scheduler_config(betas: torch.Tensor) -> dict:
    """DDIM config of the checkpoint's betas: LDM's square-root spacing when it matches to 1e-6, else the table."""
    b = betas.double()
    m = len(b)
    start, end = float(b[0]), float(b[-1])
    sqrt_spaced = torch.linspace(start ** 0.5, end ** 0.5, m, dtype=torch.float64) ** 2
    common = {"num_train_timesteps": m, "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False}
    if torch.allclose(b, sqrt_spaced, rtol=1e-6, atol=1e-9):
        return {**common, "beta_schedule": "scaled_linear", "beta_start": round(start, 8), "beta_end": round(end, 8)}
    return {**common, "trained_betas": b.tolist()}


def convert_ldm(ckpt: Path, out: Path, *, use_ema: bool = True, head_channels: int = 32,
                sample_size: int | None = None) -> dict:
    """Write the diffusers folder of a CompVis unconditional LDM checkpoint (see the module docstring)."""
    from diffusers import DDIMScheduler

    from sfdbench.io import sha256_file

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"{out} exists and is not empty; pick a new folder")
    sd, inert = read_checkpoint(ckpt)
    unet_w, used_ema = ema_unet(sd, use_ema)
    vq_w = _take(sd, "first_stage_model.")
    if not vq_w:
        raise BadInput("no first_stage_model.* weights in the checkpoint (the VQ first stage is needed for decoding)")
    if "betas" not in sd:
        raise BadInput("no betas in the checkpoint: cannot recover the noise table")
    vq, vq_config = convert_vq(vq_w)
    if sample_size is None:
        sample_size = 64  # LSUN-Bedroom / FFHQ LDM latents (256 / f4)
    unet, unet_config = convert_unet(unet_w, head_channels, sample_size)
    sched = scheduler_config(sd["betas"])
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vq.save_pretrained(out / "vqvae", safe_serialization=True)
    DDIMScheduler(**sched).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline", "unet": ["diffusers",
                                                      "UNet2DModel"], "vqvae": ["diffusers", "VQModel"],
                                                      "scheduler": ["diffusers", "DDIMScheduler"]}, indent=2) + "\n")
    record = {"source": str(Path(ckpt).resolve()), "source_sha256": sha256_file(Path(ckpt)), "ema": used_ema,
              "head_channels": head_channels, "unet_tensors": len(unet_w), "first_stage_tensors": len(vq_w),
              "inert_globals": inert, "scheduler": {k: v for k, v in sched.items() if k != "trained_betas"},
              "unet_config": unet_config, "vqvae_config": vq_config}
    (out / "conversion.json").write_text(json.dumps(record, indent=2, default=list) + "\n")
    return record
