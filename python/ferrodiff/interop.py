"""diffusers checkpoints in and out, without torch.

A diffusers ``save_pretrained`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
of a ``UNet2DModel``, ``AutoencoderKL`` or ``VQModel`` becomes a ferrodiff :class:`~ferrodiff.nn.Model`
computing the same function, and back; a ``scheduler_config.json`` becomes a ferrodiff schedule and
sampler. The safetensors format is read and written here (8-byte little-endian header length, a
JSON header, raw little-endian data), so neither torch nor the ``safetensors`` package is needed.

    >>> unet = from_diffusers("my-pipeline", subfolder="unet")          # doctest: +SKIP
    >>> schedule, sampler, prediction = scheduler_from_diffusers("my-pipeline")  # doctest: +SKIP
    >>> save_diffusers(unet, "out/unet")   # diffusers.UNet2DModel.from_pretrained("out/unet")  # doctest: +SKIP

Every diffusers option is either mapped, ignored because it does not change what the network
computes (said where it is decided), or a ``ValueError`` naming the option and its value;
docs/interop.md lists them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ferrodiff import _core

__all__ = [
    "DiffusersPipeline",
    "diffusers_config",
    "from_diffusers",
    "pipeline_from_diffusers",
    "read_safetensors",
    "save_diffusers",
    "scheduler_from_diffusers",
    "write_safetensors",
]

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
# The diffusers release these mappings were checked against (tests/test_interop.py).
DIFFUSERS_VERSION = "0.42.1"

# ferrodiff's U-Net GroupNorm ε (src/nn/layers.rs, GROUP_NORM_EPS: PyTorch's default); the
# autoencoders use diffusers' 1e-6 throughout, which is not an option of diffusers' classes.
UNET_NORM_EPS = 1e-5

# ----------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------

# safetensors dtype -> the little-endian numpy dtype of its raw data (BF16 is read as its bits).
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as float32 numpy arrays (F32, F16, BF16 and F64 data)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file: it is shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(f"{path} is not a safetensors file: header length {header_len} exceeds the file")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    start = 8 + header_len
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {dtype}; ferrodiff reads F32, F16, BF16 and F64"
            )
        np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        count = math.prod(shape)
        if end - begin != count * np_dtype.itemsize or begin < 0 or start + end > size:
            raise ValueError(
                f"{path}: tensor {name!r} has data offsets {begin}..{end} that do not fit {shape}"
            )
        data = raw[start + begin : start + end].view(np_dtype)
        if dtype == "BF16":
            data = (data.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = data.astype(np.float32).reshape(shape)
    del raw
    return tensors


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Any]) -> None:
    """Writes `tensors` (name -> array) as float32 safetensors, atomically (a temporary, then
    ``os.replace``)."""
    arrays = {name: np.ascontiguousarray(tensors[name], dtype="<f4") for name in sorted(tensors)}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, a in arrays.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(fh: BinaryIO) -> None:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for a in arrays.values():
            fh.write(a.tobytes())

    _atomic_write(Path(path), write)


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# Configurations: diffusers' __init__ arguments and their defaults (diffusers 0.42; a saved
# config.json holds all of them, an older one may lack some)
# ----------------------------------------------------------------------------------------------

_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

_AUTOENCODER_COMMON_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "mid_block_add_attention": True,
}

_KL_DEFAULTS: dict[str, Any] = {
    **_AUTOENCODER_COMMON_DEFAULTS,
    "latent_channels": 4,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}

_VQ_DEFAULTS: dict[str, Any] = {
    **_AUTOENCODER_COMMON_DEFAULTS,
    "latent_channels": 3,
    "num_vq_embeddings": 256,
    "vq_embed_dim": None,
    "norm_type": "group",
    "lookup_from_codebook": False,
    "force_upcast": False,
}

MODEL_DEFAULTS = {"UNet2DModel": _UNET_DEFAULTS, "AutoencoderKL": _KL_DEFAULTS, "VQModel": _VQ_DEFAULTS}


class _Options:
    """A diffusers config with its class's defaults filled in; `need` raises the ValueError that
    names an option ferrodiff cannot represent."""

    def __init__(self, cls: str, config: Mapping[str, Any], defaults: Mapping[str, Any]):
        self.cls = cls
        unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
        if unknown:
            # diffusers passes config keys to __init__ and drops (with a warning) those it does
            # not take, so an unknown key cannot change what its model computes either.
            warnings.warn(
                f"{cls} config keys {unknown} are not diffusers {DIFFUSERS_VERSION} options; ignored"
            )
        self.values = {**defaults, **{k: v for k, v in config.items() if k in defaults}}

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def need(self, key: str, ok: bool, supported: str) -> None:
        if not ok:
            raise ValueError(
                f"{self.cls} option {key}={self.values[key]!r} is not supported (ferrodiff supports {supported})"
            )

    def positive_int(self, key: str, supported: str = "a positive int") -> int:
        v = self.values[key]
        self.need(key, isinstance(v, int) and not isinstance(v, bool) and v > 0, supported)
        return int(v)

    def side(self, key: str, factor: int, default: int | None = None) -> int:
        """A square sample side divisible by `factor` from an int or an [h, w] pair."""
        v = self.values[key]
        if v is None and default is not None:
            return default
        if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
            v = v[0]
        self.need(
            key,
            isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % factor == 0,
            f"a square side (an int) divisible by the downsampling factor {factor}",
        )
        return int(v)


def _silu(o: _Options) -> None:
    o.need("act_fn", o["act_fn"] in ("silu", "swish"), "'silu' (alias 'swish')")


# ---------------------------------------------------------------------------------------------
# UNet2DModel
# ---------------------------------------------------------------------------------------------

# Block type -> (has self-attention, its resampler: "conv", "resnet" or None = downsample_type /
# upsample_type). diffusers strips a "UNetRes" prefix from block type names.
_DOWN_BLOCKS = {
    "DownBlock2D": (False, "conv"),
    "ResnetDownsampleBlock2D": (False, "resnet"),
    "AttnDownBlock2D": (True, None),
}
_UP_BLOCKS = {
    "UpBlock2D": (False, "conv"),
    "ResnetUpsampleBlock2D": (False, "resnet"),
    "AttnUpBlock2D": (True, None),
}


def _unet_config(o: _Options) -> dict[str, Any]:
    """ferrodiff's U-Net config for a UNet2DModel config (raises for what it cannot represent)."""
    o.need("time_embedding_type", o["time_embedding_type"] == "positional", "'positional'")
    # flip_sin_to_cos and freq_shift are ferrodiff U-Net options of the same names
    # (src/nn/layers.rs, timestep_embedding_with); the shift must leave a positive denominator.
    o.need("flip_sin_to_cos", isinstance(o["flip_sin_to_cos"], bool), "True or False")
    shift_f = o["freq_shift"]
    o.need(
        "freq_shift",
        isinstance(shift_f, (int, float)) and shift_f < (o["block_out_channels"] or [0])[0] // 2,
        "a number below half the time embedding's width",
    )
    o.need("center_input_sample", not o["center_input_sample"], "False")
    _silu(o)
    o.need("mid_block_type", o["mid_block_type"] == "UNetMidBlock2D", "'UNetMidBlock2D'")
    o.need("add_attention", o["add_attention"] is True, "True: ferrodiff's middle block always has attention")
    # UNet2DModel's down and up blocks always sum residuals unscaled; ferrodiff's skip_rescale
    # scales every sum by 1/√2, so only the middle block's factor 1 is representable.
    o.need(
        "mid_block_scale_factor",
        o["mid_block_scale_factor"] == 1,
        "1 (ferrodiff's skip_rescale divides every residual sum by √2, UNet2DModel only the middle block's)",
    )
    shift = o["resnet_time_scale_shift"]
    o.need("resnet_time_scale_shift", shift in ("default", "scale_shift"), "'default' and 'scale_shift'")
    o.need(
        "class_embed_type", o["class_embed_type"] is None, "None (a learned table of num_class_embeds rows)"
    )
    eps = o["norm_eps"]
    o.need("norm_eps", isinstance(eps, (int, float)) and eps > 0, "a positive number")
    groups = o.positive_int("norm_num_groups")
    o.need(
        "attn_norm_num_groups",
        o["attn_norm_num_groups"] in (None, groups)
        and (shift == "default" or o["attn_norm_num_groups"] == groups),
        f"None or norm_num_groups={groups} (with resnet_time_scale_shift='scale_shift', None means a middle "
        "attention without GroupNorm, which ferrodiff does not have: set it to norm_num_groups)",
    )
    layers = o.positive_int("layers_per_block", "a positive int: the same number of blocks at every level")
    boc = o["block_out_channels"]
    o.need(
        "block_out_channels",
        isinstance(boc, (list, tuple)) and len(boc) > 0 and all(isinstance(c, int) and c > 0 for c in boc),
        "a non-empty list of positive widths",
    )
    base = boc[0]
    # Our time embedding is base_channels wide, diffusers' block_out_channels[0], and our
    # widths are base_channels · channel_mult: base = block_out_channels[0] with integer mults.
    o.need(
        "block_out_channels",
        all(c % base == 0 for c in boc),
        "widths that are multiples of the first one (ferrodiff's base_channels · channel_mult)",
    )
    o.need(
        "time_embedding_dim",
        o["time_embedding_dim"] in (None, 4 * base),
        f"None or 4 · block_out_channels[0] = {4 * base}",
    )
    levels = len(boc)
    image_size = o.side("sample_size", 2 ** (levels - 1), default=2 ** (levels - 1))
    down, up = list(o["down_block_types"]), list(o["up_block_types"])
    o.need(
        "down_block_types", len(down) == levels, f"one block type per entry of block_out_channels ({levels})"
    )
    o.need("up_block_types", len(up) == levels, f"one block type per entry of block_out_channels ({levels})")

    def kind(key: str, types: list[str], table: dict, default_kind: str) -> list[tuple[bool, str]]:
        out = []
        for name in types:
            short = name[7:] if name.startswith("UNetRes") else name
            o.need(key, short in table, f"block types {sorted(table)}")
            attention, resample = table[short]
            out.append((attention, resample or default_kind))
        return out

    o.need("downsample_type", o["downsample_type"] in ("conv", "resnet"), "'conv' and 'resnet'")
    o.need("upsample_type", o["upsample_type"] in ("conv", "resnet"), "'conv' and 'resnet'")
    down_kinds = kind("down_block_types", down, _DOWN_BLOCKS, o["downsample_type"])
    up_kinds = kind("up_block_types", up, _UP_BLOCKS, o["upsample_type"])
    for level in range(levels):
        o.need(
            "up_block_types",
            down_kinds[level][0] == up_kinds[levels - 1 - level][0],
            f"attention on both paths of a level or on neither (down_block_types[{level}]={down[level]!r}, "
            f"up_block_types[{levels - 1 - level}]={up[levels - 1 - level]!r})",
        )
    # The last down block has no downsampler and the last up block no upsampler.
    resamplers = {k for _, k in down_kinds[:-1]} | {k for _, k in up_kinds[:-1]}
    o.need(
        "down_block_types",
        len(resamplers) <= 1,
        "the same resampling everywhere: strided / post-upsampling convolutions (DownBlock2D, UpBlock2D, "
        "Attn*Block2D with 'conv') or residual blocks (ResnetDownsampleBlock2D, ResnetUpsampleBlock2D, "
        f"Attn*Block2D with 'resnet'); these blocks use {sorted(resamplers)}",
    )
    resblock_updown = resamplers == {"resnet"}
    conv_down = any(k == "conv" for _, k in down_kinds[:-1])
    # Only a convolution downsampler pads: 1 on every side, or 0 with the bottom and right
    # padded by one (ferrodiff's downsample_padding); diffusers pads n on every side for n > 1.
    padding = o["downsample_padding"] if conv_down else 1
    o.need("downsample_padding", padding in (0, 1), "0 or 1")
    attention_levels = [level for level in range(levels) if down_kinds[level][0]]
    num_heads = _num_heads(o, [boc[level] for level in attention_levels] + [boc[-1]])
    in_channels = o.positive_int("in_channels")
    out_channels = o.positive_int("out_channels")
    o.need(
        "out_channels",
        out_channels in (in_channels, 2 * in_channels),
        f"in_channels={in_channels}, or 2 · in_channels={2 * in_channels} (ferrodiff's learn_sigma)",
    )
    classes = o["num_class_embeds"]
    o.need(
        "num_class_embeds",
        classes is None or (isinstance(classes, int) and classes >= 2),
        "None or at least 2 (ferrodiff's num_classes + 1: the last row is its null class)",
    )
    # Ignored: dropout is carried over but acts in training only; num_train_timesteps sizes the
    # "learned" time embedding only, which is refused above.
    return {
        "type": "unet",
        "in_channels": in_channels,
        "image_size": image_size,
        "base_channels": base,
        "channel_mult": [c // base for c in boc],
        "num_res_blocks": layers,
        "attention_resolutions": [image_size >> level for level in attention_levels],
        "num_heads": num_heads,
        "dropout": float(o["dropout"]),
        "groups": groups,
        "scale_shift": shift == "scale_shift",
        "resblock_updown": resblock_updown,
        "skip_rescale": False,
        "num_classes": 0 if classes is None else classes - 1,
        "learn_sigma": out_channels == 2 * in_channels,
        "flip_sin_to_cos": bool(o["flip_sin_to_cos"]),
        "freq_shift": float(shift_f),
        "downsample_padding": padding,
        "norm_eps": float(eps),
    }


def _num_heads(o: _Options, attention_channels: list[int]) -> int:
    """One head count for every attention block (ferrodiff's num_heads): diffusers gives a block
    of C channels C // attention_head_dim heads (one head when attention_head_dim is None)."""
    d = o["attention_head_dim"]
    if d is None:
        return 1
    o.need(
        "attention_head_dim",
        isinstance(d, int) and all(c % d == 0 for c in attention_channels),
        f"None or a divisor of every attention block's channels {attention_channels}",
    )
    heads = {c // d for c in attention_channels}
    o.need(
        "attention_head_dim",
        len(heads) == 1,
        f"one head count for all attention blocks (channels {attention_channels} give {sorted(heads)} heads)",
    )
    return heads.pop()


def _unet_to_diffusers(c: Mapping[str, Any]) -> dict[str, Any]:
    """UNet2DModel's config for ferrodiff's U-Net config (raises for what it cannot represent)."""
    target = "UNet2DModel"
    for key, off in (
        ("context_dim", 0),
        ("guidance_embed", False),
        ("cond_channels", 0),
        ("aug_embed", False),
        ("downsample_first", False),
        ("skip_rescale", False),
    ):
        _no_counterpart(key, c.get(key, off), off, target)
    blocks = c["num_res_blocks"]
    if isinstance(blocks, list):
        _no_counterpart(
            "num_res_blocks", blocks, [blocks[0]] * len(blocks), target, "one count for every level"
        )
        blocks = blocks[0]
    mult = list(c["channel_mult"])
    # diffusers' time embedding is block_out_channels[0] wide, ours base_channels.
    _no_counterpart(
        "channel_mult", mult, [1, *mult[1:]], target, "channel_mult[0] = 1 (the time embedding width)"
    )
    base = c["base_channels"]
    boc = [base * m for m in mult]
    levels = len(boc)
    attention = [(c["image_size"] >> level) in c["attention_resolutions"] for level in range(levels)]
    heads = c["num_heads"]
    attention_channels = [boc[level] for level in range(levels) if attention[level]] + [boc[-1]]
    head_dims = {ch // heads for ch in attention_channels}
    if heads != 1 and (len(head_dims) != 1 or any(ch % heads for ch in attention_channels)):
        raise ValueError(
            f"ferrodiff option num_heads={heads} has no counterpart in diffusers' {target} (it has one "
            f"head width, attention_head_dim, for the attention blocks' {attention_channels} channels)"
        )
    resample = "resnet" if c["resblock_updown"] else "conv"
    plain_down = "ResnetDownsampleBlock2D" if c["resblock_updown"] else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if c["resblock_updown"] else "UpBlock2D"
    return {
        "sample_size": c["image_size"],
        "in_channels": c["in_channels"],
        "out_channels": 2 * c["in_channels"] if c["learn_sigma"] else c["in_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "freq_shift": c.get("freq_shift", 0.0),
        "flip_sin_to_cos": c.get("flip_sin_to_cos", True),
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attention],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attention)],
        "block_out_channels": boc,
        "layers_per_block": blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": c.get("downsample_padding", 1),
        "downsample_type": resample,
        "upsample_type": resample,
        "dropout": c["dropout"],
        "act_fn": "silu",
        "attention_head_dim": None if heads == 1 else head_dims.pop(),
        "norm_num_groups": c["groups"],
        # Set explicitly: with scale_shift, None would drop the middle attention's GroupNorm.
        "attn_norm_num_groups": c["groups"],
        "norm_eps": c.get("norm_eps", UNET_NORM_EPS),
        "resnet_time_scale_shift": "scale_shift" if c["scale_shift"] else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": c["num_classes"] + 1 if c["num_classes"] > 0 else None,
        "num_train_timesteps": None,
    }


def _no_counterpart(key: str, value: Any, ok: Any, target: str, supported: str | None = None) -> None:
    if value != ok:
        raise ValueError(
            f"ferrodiff option {key}={value!r} has no counterpart in diffusers' {target} "
            f"(it supports {supported or repr(ok)})"
        )


# ---------------------------------------------------------------------------------------------
# AutoencoderKL and VQModel
# ---------------------------------------------------------------------------------------------


def _autoencoder_config(o: _Options, kind: str) -> tuple[dict[str, Any], list[str]]:
    """ferrodiff's autoencoder config for an AutoencoderKL / VQModel config, and the 1x1
    convolutions the checkpoint leaves out (use_quant_conv=False: the identity)."""
    _silu(o)
    boc = o["block_out_channels"]
    o.need(
        "block_out_channels",
        isinstance(boc, (list, tuple)) and len(boc) > 0 and all(isinstance(c, int) and c > 0 for c in boc),
        "a non-empty list of positive widths",
    )
    levels = len(boc)
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(o[key])
        o.need(key, types == [block] * levels, f"{levels} x {block!r} (one per entry of block_out_channels)")
    config = {
        "type": "autoencoder",
        "kind": kind,
        "in_channels": o.positive_int("in_channels"),
        "out_channels": o.positive_int("out_channels"),
        "image_size": o.side("sample_size", 2 ** (levels - 1)),
        "block_out_channels": list(boc),
        "layers_per_block": o.positive_int("layers_per_block"),
        "latent_channels": o.positive_int("latent_channels"),
        "norm_num_groups": o.positive_int("norm_num_groups"),
        "mid_block_add_attention": bool(o["mid_block_add_attention"]),
        "scaling_factor": float(o["scaling_factor"]),
    }
    # Ignored: force_upcast is a dtype policy of diffusers' pipelines (float32 here anyway).
    identity = []
    if kind == "kl":
        o.need(
            "shift_factor",
            o["shift_factor"] in (None, 0, 0.0),
            "None (ferrodiff scales latents, it does not shift them)",
        )
        o.need("latents_mean", o["latents_mean"] is None, "None (one scaling_factor for every channel)")
        o.need("latents_std", o["latents_std"] is None, "None (one scaling_factor for every channel)")
        # Without quant_conv / post_quant_conv diffusers computes what ours does with identity
        # 1x1 convolutions in their place.
        identity = [name for name in ("quant_conv", "post_quant_conv") if not o[f"use_{name}"]]
    else:
        o.need("norm_type", o["norm_type"] == "group", "'group'")
        dim = o["vq_embed_dim"]
        o.need("vq_embed_dim", dim is None or (isinstance(dim, int) and dim > 0), "None or a positive int")
        config["num_vq_embeddings"] = o.positive_int("num_vq_embeddings")
        config["vq_embed_dim"] = dim or 0
        # Ignored: lookup_from_codebook only changes decode(force_not_quantize=True), which
        # ferrodiff's decode (it always quantises) does not offer.
    return config, identity


def _autoencoder_to_diffusers(c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    levels = len(c["block_out_channels"])
    common = {
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(c["block_out_channels"]),
        "layers_per_block": c["layers_per_block"],
        "act_fn": "silu",
        "latent_channels": c["latent_channels"],
        "norm_num_groups": c["norm_num_groups"],
        "sample_size": c["image_size"],
        "scaling_factor": c["scaling_factor"],
        "mid_block_add_attention": c["mid_block_add_attention"],
    }
    if c["kind"] == "kl":
        return "AutoencoderKL", {
            **common,
            "shift_factor": None,
            "latents_mean": None,
            "latents_std": None,
            "force_upcast": True,
            "use_quant_conv": True,
            "use_post_quant_conv": True,
        }
    return "VQModel", {
        **common,
        "num_vq_embeddings": c["num_vq_embeddings"],
        "vq_embed_dim": c["vq_embed_dim"] or None,  # None: latent_channels, as ferrodiff's 0
        "norm_type": "group",
        "lookup_from_codebook": False,
        "force_upcast": False,
    }


# ---------------------------------------------------------------------------------------------
# Models in and out
# ---------------------------------------------------------------------------------------------

# Attention parameter names of checkpoints saved before diffusers 0.14 (diffusers renames them
# on load, modeling_utils._fix_state_dict_keys_on_load).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _model_folder(folder: str | os.PathLike[str], subfolder: str | None) -> Path:
    path = Path(folder) / subfolder if subfolder else Path(folder)
    if not (path / CONFIG_NAME).is_file():
        hint = ""
        if (path / "model_index.json").is_file():
            parts = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
            hint = (
                f" (it is a pipeline folder: pass subfolder= one of {parts}, or use pipeline_from_diffusers)"
            )
        raise ValueError(f"{path} has no {CONFIG_NAME}{hint}")
    return path


def _load_weights(path: Path, variant: str | None) -> dict[str, np.ndarray]:
    stem = WEIGHTS_NAME if variant is None else f"{WEIGHTS_NAME}.{variant}"
    single = path / f"{stem}.safetensors"
    index = path / f"{stem}.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, np.ndarray] = {}
        for shard in shards:
            state.update(read_safetensors(path / shard))
        return state
    other = sorted(p.name for p in path.glob(f"{WEIGHTS_NAME}*"))
    raise ValueError(
        f"{path} has no {single.name} (found {other or 'no weights'}); ferrodiff reads safetensors "
        "checkpoints only (a .bin checkpoint needs torch: re-save it with save_pretrained)"
    )


def from_diffusers(
    folder: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    variant: str | None = None,
    dtype: Any = "float32",
) -> _core.Model:
    """A ferrodiff model from a diffusers ``save_pretrained`` folder of a ``UNet2DModel``,
    ``AutoencoderKL`` or ``VQModel`` (``subfolder``: e.g. ``"unet"`` / ``"vae"`` of a pipeline
    folder; ``variant``: e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``).

    Weights stored as F16, BF16 or F64 are converted to float32, the only ``dtype`` ferrodiff's
    Python models have. A config option ferrodiff cannot represent, or a checkpoint whose
    parameters differ from the configured network's, is a ``ValueError`` naming it.
    """
    if np.dtype(dtype) != np.float32:
        raise ValueError(f"dtype={dtype!r} is not supported: ferrodiff's Python models are float32")
    path = _model_folder(folder, subfolder)
    config = json.loads((path / CONFIG_NAME).read_text())
    cls = config.get("_class_name")
    if cls is None:
        raise ValueError(f"{path / CONFIG_NAME} has no _class_name: it is not a diffusers model config")
    if cls not in MODEL_DEFAULTS:
        raise ValueError(
            f"{path / CONFIG_NAME} describes a diffusers {cls!r}; ferrodiff reads {sorted(MODEL_DEFAULTS)}"
        )
    options = _Options(cls, config, MODEL_DEFAULTS[cls])
    identity: list[str] = []
    if cls == "UNet2DModel":
        ours = _unet_config(options)
    else:
        ours, identity = _autoencoder_config(options, "kl" if cls == "AutoencoderKL" else "vq")
    model = _core.Model(ours, 0)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = _rename(_load_weights(path, variant), expected)
    for name in identity:  # use_quant_conv / use_post_quant_conv = False
        out_ch, in_ch = expected[f"{name}.weight"][:2]
        state[f"{name}.weight"] = np.eye(out_ch, in_ch, dtype=np.float32).reshape(out_ch, in_ch, 1, 1)
        state[f"{name}.bias"] = np.zeros(out_ch, np.float32)
    _check_names(cls, path, state, expected)
    model.load_state_dict(state, strict=True)
    return model


def _rename(state: dict[str, np.ndarray], expected: Mapping[str, tuple]) -> dict[str, np.ndarray]:
    """diffusers' own load-time renames: legacy attention names, and 1x1-conv attention
    projections [C, C, 1, 1] stored for linear layers [C, C]."""
    out = {}
    for stored, value in state.items():
        prefix, _, leaf = stored.rpartition(".")
        head, _, module = prefix.rpartition(".")
        name = stored
        if module in _LEGACY_ATTENTION:
            new = ".".join(p for p in (head, _LEGACY_ATTENTION[module], leaf) if p)
            if new in expected:
                name = new
        want = expected.get(name)
        square = want is not None and len(want) == 2 and value.shape == (*want, 1, 1)
        out[name] = value.reshape(want) if square else value
    return out


def _check_names(
    cls: str, path: Path, state: Mapping[str, np.ndarray], expected: Mapping[str, tuple]
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameter(s) missing, the first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, the first {unexpected[0]!r}")
        raise ValueError(f"the {cls} checkpoint in {path} does not match its config: {'; '.join(parts)}")
    for name in sorted(expected):
        if tuple(state[name].shape) != tuple(expected[name]):
            raise ValueError(
                f"the {cls} checkpoint in {path} does not match its config: {name!r} has shape "
                f"{tuple(state[name].shape)}, the network expects {tuple(expected[name])}"
            )


def diffusers_config(model: _core.Model) -> dict[str, Any]:
    """The diffusers config (``_class_name`` included) of a ferrodiff U-Net or autoencoder."""
    c = model.config
    if c.get("type") == "unet":
        cls, config = "UNet2DModel", _unet_to_diffusers(c)
    elif c.get("type") == "autoencoder":
        cls, config = _autoencoder_to_diffusers(c)
    else:
        raise ValueError(
            f"a ferrodiff {c.get('type')!r} model has no diffusers counterpart (U-Nets and autoencoders have)"
        )
    return {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **config}


def save_diffusers(model: _core.Model, folder: str | os.PathLike[str]) -> None:
    """Writes `model` as a diffusers ``save_pretrained`` folder: ``config.json`` and float32
    ``diffusion_pytorch_model.safetensors``, which ``diffusers.<Class>.from_pretrained(folder)``
    loads with no missing or unexpected keys. Each file is written atomically (the weights
    first). ferrodiff features diffusers' class lacks are a ``ValueError`` naming them."""
    config = diffusers_config(model)
    folder = Path(folder)
    write_safetensors(folder / f"{WEIGHTS_NAME}.safetensors", model.state_dict())
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(folder / CONFIG_NAME, lambda fh: fh.write(text.encode()))


# ---------------------------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------------------------

_BETA_KEYS = "num_train_timesteps beta_start beta_end beta_schedule trained_betas "
_THRESHOLD_KEYS = "thresholding dynamic_thresholding_ratio sample_max_value "
_SIGMA_GRID_KEYS = "use_karras_sigmas use_exponential_sigmas use_beta_sigmas final_sigmas_type "
_SPACING_KEYS = "prediction_type timestep_spacing steps_offset "

# diffusers scheduler -> (ferrodiff sampler, the config keys ferrodiff carries over or refuses
# with a message naming them: diffusers 0.42's __init__ arguments).
SCHEDULERS: dict[str, tuple[str, tuple[str, ...]]] = {
    name: (sampler, tuple(keys.split()))
    for name, sampler, keys in [
        (
            "DDPMScheduler",
            "DDPM",
            _BETA_KEYS
            + _THRESHOLD_KEYS
            + _SPACING_KEYS
            + "variance_type clip_sample clip_sample_range rescale_betas_zero_snr",
        ),
        (
            "DDIMScheduler",
            "DDIM",
            _BETA_KEYS
            + _THRESHOLD_KEYS
            + _SPACING_KEYS
            + "clip_sample clip_sample_range set_alpha_to_one rescale_betas_zero_snr",
        ),
        (
            "EulerDiscreteScheduler",
            "Euler",
            _BETA_KEYS
            + _SIGMA_GRID_KEYS
            + _SPACING_KEYS
            + "interpolation_type sigma_min sigma_max timestep_type rescale_betas_zero_snr",
        ),
        (
            "EulerAncestralDiscreteScheduler",
            "EulerAncestral",
            _BETA_KEYS + _SPACING_KEYS + "rescale_betas_zero_snr",
        ),
        (
            "HeunDiscreteScheduler",
            "Heun",
            _BETA_KEYS
            + _SPACING_KEYS
            + "use_karras_sigmas use_exponential_sigmas use_beta_sigmas clip_sample clip_sample_range",
        ),
        (
            "DPMSolverMultistepScheduler",
            "DPMSolver",
            _BETA_KEYS
            + _THRESHOLD_KEYS
            + _SIGMA_GRID_KEYS
            + _SPACING_KEYS
            + "solver_order algorithm_type solver_type lower_order_final euler_at_final use_lu_lambdas "
            "use_flow_sigmas flow_shift lambda_min_clipped variance_type rescale_betas_zero_snr "
            "use_dynamic_shifting time_shift_type",
        ),
    ]
}
SAMPLERS = {name: cls for cls, (name, _) in SCHEDULERS.items()}


def _scheduler_dict(source: Any) -> dict[str, Any]:
    """A scheduler config from a dict, a diffusers scheduler (its ``.config``), a
    scheduler_config.json, its folder, or a pipeline folder with a scheduler/ subfolder."""
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "config") and isinstance(source.config, Mapping):
        return {**source.config, "_class_name": type(source).__name__}
    path = Path(source)
    for candidate in (path, path / SCHEDULER_CONFIG_NAME, path / "scheduler" / SCHEDULER_CONFIG_NAME):
        if candidate.is_file():
            # diffusers writes lambda_min_clipped = -inf as -Infinity, which Python's json reads.
            return json.loads(candidate.read_text())
    raise ValueError(
        f"{path} is neither a scheduler config file nor a folder holding {SCHEDULER_CONFIG_NAME}"
    )


def _check_scheduler_options(cls: str, config: Mapping[str, Any]) -> None:
    """The options ferrodiff's samplers do not implement, named in one message format (the
    samplers' own from_diffusers_config refuses the rest)."""

    def need(key: str, ok: Callable[[Any], bool], supported: str) -> None:
        if key in config and config[key] is not None and not ok(config[key]):
            raise ValueError(
                f"{cls} option {key}={config[key]!r} is not supported (ferrodiff supports {supported})"
            )

    need(
        "beta_schedule",
        lambda v: v in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
        "'linear', 'scaled_linear', 'squaredcos_cap_v2' and 'sigmoid'",
    )
    need(
        "prediction_type",
        lambda v: v in ("epsilon", "v_prediction", "sample"),
        "'epsilon', 'v_prediction', 'sample'",
    )
    need(
        "timestep_spacing",
        lambda v: v in ("linspace", "leading", "trailing"),
        "'linspace', 'leading', 'trailing'",
    )
    if cls == "DDPMScheduler":
        need(
            "variance_type",
            lambda v: (
                v in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range")
            ),
            "'fixed_small', 'fixed_large' (and their '_log' aliases) and 'learned_range'",
        )
    if cls != "DDPMScheduler" and cls != "DDIMScheduler":
        need("thresholding", lambda v: not v, "False")
        for key in ("use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
            need(key, lambda v: not v, "False")
        need("interpolation_type", lambda v: v == "linear", "'linear'")
        need("timestep_type", lambda v: v == "discrete", "'discrete'")
        need("lambda_min_clipped", lambda v: v == -math.inf, "-inf")
        # diffusers' σ schedulers replace the zero terminal ᾱ by 2^-24 (σ ≈ 4096); ferrodiff's
        # refuse a schedule with σ = ∞ rather than sample from a made-up level.
        need("rescale_betas_zero_snr", lambda v: not v, "False for σ-space samplers (use DDIM or DDPM)")
        need(
            "algorithm_type",
            lambda v: v in ("dpmsolver++", "sde-dpmsolver++"),
            "'dpmsolver++' and 'sde-dpmsolver++'",
        )
        need("solver_type", lambda v: v in ("midpoint", "heun"), "'midpoint' and 'heun'")
    # Ignored: flow_shift and time_shift_type act only with use_flow_sigmas /
    # use_dynamic_shifting (refused above); DPMSolverMultistep's variance_type only says the
    # model outputs 2C channels, whose first half every ferrodiff sampler reads.


def scheduler_from_diffusers(
    config: Any, *, steps: int | None = None, sampler: str | None = None, **overrides: Any
) -> tuple[_core.Schedule, Any, str]:
    """``(schedule, sampler, prediction)`` for a diffusers scheduler config (a dict, a
    ``scheduler_config.json``, its folder, a pipeline folder or a diffusers scheduler object).

    DDPMScheduler -> ``fd.DDPM``, DDIMScheduler -> ``fd.DDIM``, EulerDiscreteScheduler ->
    ``fd.Euler``, EulerAncestralDiscreteScheduler -> ``fd.EulerAncestral``,
    HeunDiscreteScheduler -> ``fd.Heun``, DPMSolverMultistepScheduler -> ``fd.DPMSolver``, with
    every setting carried over (their ``from_diffusers_config``). ``sampler="DDIM"`` (any of
    those names) uses another sampler on the same training schedule, e.g. for a PNDMScheduler
    config; ``steps`` (default: all T for DDPM, 50 for DDIM, 25 for the σ samplers) and keyword
    ``overrides`` go to the sampler. ``prediction`` is ferrodiff's name of the model's
    parameterisation (``"epsilon"``, ``"x0"``, ``"v"``).
    """
    cfg = _scheduler_dict(config)
    cls = cfg.get("_class_name")
    if sampler is None:
        if cls not in SCHEDULERS:
            raise ValueError(
                f"the scheduler {cls!r} has no ferrodiff counterpart (ferrodiff maps {sorted(SCHEDULERS)}); "
                f"pass sampler= one of {sorted(SAMPLERS)} to sample its training schedule with another sampler"
            )
        sampler = SCHEDULERS[cls][0]
        known = set(SCHEDULERS[cls][1])
        unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
        if unknown:
            # diffusers drops config keys its class does not take, so they change nothing.
            warnings.warn(
                f"{cls} config keys {unknown} are not diffusers {DIFFUSERS_VERSION} options; ignored"
            )
    elif sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {sorted(SAMPLERS)}")
    _check_scheduler_options(cls or SAMPLERS[sampler], cfg)
    # The samplers' readers refuse options they do not implement; give them only what the
    # target class takes, as diffusers' from_config does for another scheduler class.
    target_keys = set(SCHEDULERS[SAMPLERS[sampler]][1])
    cfg = {k: v for k, v in cfg.items() if k in target_keys}
    kwargs: dict[str, Any] = dict(overrides)
    if steps is not None:
        kwargs["steps"] = steps
    built = getattr(_core, sampler).from_diffusers_config(_json_safe(cfg), **kwargs)
    return built.schedule, built, built.prediction


def _json_safe(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Drops non-finite numbers (diffusers' lambda_min_clipped = -inf means "absent")."""
    return {k: v for k, v in cfg.items() if not (isinstance(v, float) and not math.isfinite(v))}


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


@dataclass
class DiffusersPipeline:
    """The pieces of a diffusers pipeline folder ferrodiff can run."""

    pipeline_class: str
    #: The denoiser (unet/ or transformer/).
    unet: _core.Model
    schedule: _core.Schedule
    sampler: Any
    #: ferrodiff's name of the denoiser's parameterisation: "epsilon", "x0" or "v".
    prediction: str
    #: The first stage of a latent pipeline (vae/ or vqvae/), else None.
    vae: _core.Model | None = None
    #: Components that were not loaded (text encoders, tokenizers, safety checkers, ...).
    skipped: tuple[str, ...] = field(default_factory=tuple)


def pipeline_from_diffusers(
    folder: str | os.PathLike[str], *, steps: int | None = None, variant: str | None = None
) -> DiffusersPipeline:
    """Reads a diffusers pipeline folder (``model_index.json``; ``unet/`` or ``transformer/``,
    optionally ``vae/`` or ``vqvae/``, and ``scheduler/``)."""
    root = Path(folder)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{root} has no model_index.json: it is not a diffusers pipeline folder")
    index = json.loads(index_path.read_text())
    components = {
        k: v for k, v in index.items() if not k.startswith("_") and v is not None and v != [None, None]
    }
    denoiser = next((k for k in ("unet", "transformer") if k in components), None)
    if denoiser is None or "scheduler" not in components:
        raise ValueError(f"{index_path} names no unet/transformer and scheduler: {sorted(components)}")
    vae_key = next((k for k in ("vae", "vqvae") if k in components), None)
    used = {denoiser, "scheduler", vae_key} - {None}
    schedule, sampler, prediction = scheduler_from_diffusers(root / "scheduler", steps=steps)
    return DiffusersPipeline(
        pipeline_class=index.get("_class_name", ""),
        unet=from_diffusers(root, subfolder=denoiser, variant=variant),
        schedule=schedule,
        sampler=sampler,
        prediction=prediction,
        vae=from_diffusers(root, subfolder=vae_key, variant=variant) if vae_key else None,
        skipped=tuple(sorted(set(components) - used)),
    )
