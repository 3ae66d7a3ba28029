"""The encoder half of a pretrained VQGAN (encoder, quant_conv, codebook lookup), for MC-Diffusion's image codes.

MC-Diffusion conditions its captioner on the discrete codes a taming-transformers VQGAN gives an image (32x32 codes
from 256 px). This module reproduces the numerics of diffusers' `VQModel` up to the codebook lookup; the decoder
(and `post_quant_conv`) is not implemented, since only the codes are needed.

    config, params = load_vqgan("/path/to/vqgan")             # a diffusers VQModel directory, see below
    encoder = VQGANEncoder(config)
    z = encoder.apply({"params": params}, images)              # (B, H, W, 3) in [-1, 1] -> (B, H/f, W/f, D)
    codes = encoder.apply({"params": params}, images, method=VQGANEncoder.codes)      # (B, H/f, W/f) int32

with f = 2 ** (len(block_out_channels) - 1) and D = vq_embed_dim. `z` is what diffusers' `VQModel.encode(x).latents`
returns: the encoder output after `quant_conv`, before quantisation (no `scaling_factor` is applied there, and
`force_upcast` is a pipeline hint that `encode` ignores). `codes` are the indices of the nearest codebook entries
(squared Euclidean, `ladic_jax.models.vq.nearest_codes`), the same argmin as diffusers' `VectorQuantizer`, whose
`legacy` flag changes only its training loss. `codebook_vectors(codes)` maps codes back to codebook vectors.

Accepted checkpoint: a local directory as written by diffusers' `VQModel.save_pretrained`, holding `config.json`
and the weights as a single `diffusion_pytorch_model.safetensors` (PyTorch `.bin` weights are not read: re-save them
with `save_pretrained(..., safe_serialization=True)`). Of its tensors only `encoder.*`, `quant_conv.*` and
`quantize.embedding.weight` are read; the decoder side (`decoder.*`, `post_quant_conv.*`) is skipped. Mid-block
attention weights under the old diffusers names (`query`, `key`, `value`, `proj_attn`) are accepted in place of
`to_q`, `to_k`, `to_v`, `to_out.0`, as diffusers itself does.

A taming-transformers VQGAN `.ckpt` (a Lightning checkpoint whose state dict uses taming's own layer names) must
first be converted to that layout. The diffusers repository ships conversion scripts for this under its `scripts/`
directory (e.g. `convert_vq_diffusion_to_diffusers.py`, whose VQ-VAE is a taming VQGAN): they build a `VQModel` from
the taming `ddconfig` (`ch` * `ch_mult` -> `block_out_channels`, `num_res_blocks` -> `layers_per_block`,
`z_channels` -> `latent_channels`, `n_embed` / `embed_dim` -> `num_vq_embeddings` / `vq_embed_dim`), rename (and
for the attention, reshape) the tensors, and save with `save_pretrained`. This package does not convert `.ckpt`
files itself.

Supported configs (`VQGANConfig.from_dict` rejects the rest, naming the field): down blocks `DownEncoderBlock2D`
or `AttnDownEncoderBlock2D` (the same with a one-head self-attention after each resnet; the taming conversions use
it for the levels listed in taming's `attn_resolutions`, e.g. the last level of the f8 and f16 VQGANs), activation
SiLU (`"silu"` or `"swish"`), GroupNorm, and a mid block of resnet - attention - resnet (or resnet - resnet with
`mid_block_add_attention: false`). This covers diffusers' default `VQModel` and the taming f8 / f16 conversions.
`norm_type` concerns only the decoder and is not checked.

Parameter tree (torch names in brackets): `conv_in`, `down_blocks_{i}/resnets_{j}/{norm1, conv1, norm2, conv2,
conv_shortcut}` [`encoder.down_blocks.{i}.resnets.{j}.*`], `down_blocks_{i}/attentions_{j}/...` (attention
blocks only) [`encoder.down_blocks.{i}.attentions.{j}.*`], `down_blocks_{i}/downsample`
[`encoder.down_blocks.{i}.downsamplers.0.conv`], `mid_block/resnets_{0,1}/...`, `mid_block/attention/{group_norm,
to_q, to_k, to_v, to_out}`, `conv_norm_out`, `conv_out`, `quant_conv`, and `codebook` (K, D)
[`quantize.embedding.weight`].
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ladic_jax.encoders import checkpoint_names as names
from ladic_jax.encoders.checkpoint_files import read_safetensors
from ladic_jax.models.vq import nearest_codes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SUPPORTED_DOWN_BLOCKS = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
SUPPORTED_ACTIVATIONS = ("silu", "swish")  # both are SiLU in diffusers
SUPPORTED_CLASSES = ("VQModel",)
_EPS = 1e-6  # diffusers' Encoder fixes every GroupNorm epsilon (resnets, attention, output norm) to 1e-6


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """The encoder-side fields of a diffusers `VQModel` config; defaults are `VQModel.__init__`'s.

    `vq_embed_dim=None` means `latent_channels`, as in diffusers.
    """

    in_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    latent_channels: int = 3
    num_vq_embeddings: int = 256
    vq_embed_dim: int | None = None
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    act_fn: str = "silu"
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
        if self.vq_embed_dim is None:
            object.__setattr__(self, "vq_embed_dim", int(self.latent_channels))
        for name in ("in_channels", "layers_per_block", "norm_num_groups", "latent_channels", "num_vq_embeddings",
                     "vq_embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"VQGANConfig.{name} must be a positive integer, got {value!r}")
        if not self.block_out_channels or any(c <= 0 for c in self.block_out_channels):
            raise ValueError(
                f"VQGANConfig.block_out_channels must be a non-empty list of positive widths, "
                f"got {list(self.block_out_channels)}"
            )
        bad = [t for t in self.down_block_types if t not in SUPPORTED_DOWN_BLOCKS]
        if bad:
            raise ValueError(
                f"VQGANConfig.down_block_types={list(self.down_block_types)} has unsupported block types {bad}; "
                f"supported: {list(SUPPORTED_DOWN_BLOCKS)}"
            )
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(
                f"VQGANConfig.down_block_types has {len(self.down_block_types)} entries but block_out_channels has "
                f"{len(self.block_out_channels)}; they must match"
            )
        if self.act_fn not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"VQGANConfig.act_fn={self.act_fn!r} is not supported; supported: {list(SUPPORTED_ACTIVATIONS)}"
            )
        if not isinstance(self.mid_block_add_attention, bool):
            raise ValueError(
                f"VQGANConfig.mid_block_add_attention must be true or false, got {self.mid_block_add_attention!r}"
            )
        not_divisible = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if not_divisible:
            raise ValueError(
                f"VQGANConfig.norm_num_groups={self.norm_num_groups} does not divide block_out_channels "
                f"{not_divisible} (GroupNorm needs whole groups)"
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side: every down block but the last halves the resolution."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "VQGANConfig":
        """From a diffusers `VQModel` config.json (a dict); decoder-only and pipeline fields are ignored.

        Missing fields take `VQModel`'s defaults, as `VQModel.from_config` would. Raises `ValueError` naming the
        field and the supported values when the config describes an encoder this module does not implement.
        """
        class_name = config.get("_class_name")
        if class_name is not None and class_name not in SUPPORTED_CLASSES:
            raise ValueError(
                f"config _class_name={class_name!r} is not supported; supported: {list(SUPPORTED_CLASSES)} "
                "(a diffusers VQModel)"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        if "act_fn" in kwargs and isinstance(kwargs["act_fn"], str):
            kwargs["act_fn"] = kwargs["act_fn"].lower()  # diffusers' get_activation is case-insensitive
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- module


class _Blocks:
    """Layer constructors sharing the module's dtypes."""

    def __init__(self, config: VQGANConfig, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.groups = config.norm_num_groups
        self.dtype, self.param_dtype = dtype, param_dtype

    def norm(self, name: str) -> nn.GroupNorm:
        # Two-pass variance (use_fast_variance=False), the way torch computes GroupNorm statistics.
        return nn.GroupNorm(num_groups=self.groups, epsilon=_EPS, use_fast_variance=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)

    def conv(self, features: int, kernel: int, name: str, stride: int = 1, padding: Any = "SAME_TORCH") -> nn.Conv:
        if padding == "SAME_TORCH":  # torch's padding=kernel//2 on every side
            padding = ((kernel // 2, kernel // 2),) * 2
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name)

    def dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, plus the input (through a 1x1 conv when the width changes)."""

    config: VQGANConfig
    out_channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = _Blocks(self.config, self.dtype, self.param_dtype)
        h = nn.silu(layers.norm("norm1")(x))
        h = layers.conv(self.out_channels, 3, "conv1")(h)
        h = nn.silu(layers.norm("norm2")(h))
        h = layers.conv(self.out_channels, 3, "conv2")(h)  # (dropout is 0 at inference)
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, 1, "conv_shortcut")(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """One-head self-attention over all h*w positions, on a GroupNorm-ed input, added back to the input."""

    config: VQGANConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = _Blocks(self.config, self.dtype, self.param_dtype)
        batch, height, width, channels = x.shape
        h = layers.norm("group_norm")(x).reshape(batch, height * width, channels)
        q = layers.dense(channels, "to_q")(h)
        k = layers.dense(channels, "to_k")(h)
        v = layers.dense(channels, "to_v")(h)
        scores = jnp.einsum("bqc,bkc->bqk", q, k) / jnp.sqrt(jnp.asarray(channels, q.dtype))
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = layers.dense(channels, "to_out")(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x + out.reshape(batch, height, width, channels)


class DownBlock(nn.Module):
    """`layers_per_block` resnets (each followed by self-attention if `attention`), then (except in the last block)
    a stride-2 conv after padding right/bottom by 1."""

    config: VQGANConfig
    out_channels: int
    downsample: bool
    attention: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.config.layers_per_block):
            x = ResnetBlock(self.config, self.out_channels, self.dtype, self.param_dtype, name=f"resnets_{j}")(x)
            if self.attention:
                x = SpatialSelfAttention(self.config, self.dtype, self.param_dtype, name=f"attentions_{j}")(x)
        if self.downsample:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # asymmetric: nothing on the top/left
            x = _Blocks(self.config, self.dtype, self.param_dtype).conv(
                self.out_channels, 3, "downsample", stride=2, padding="VALID")(x)
        return x


class MidBlock(nn.Module):
    """resnet, attention (unless `mid_block_add_attention` is false), resnet; all at the last block's width."""

    config: VQGANConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = self.config.block_out_channels[-1]
        x = ResnetBlock(self.config, width, self.dtype, self.param_dtype, name="resnets_0")(x)
        if self.config.mid_block_add_attention:
            x = SpatialSelfAttention(self.config, self.dtype, self.param_dtype, name="attention")(x)
        return ResnetBlock(self.config, width, self.dtype, self.param_dtype, name="resnets_1")(x)


class VQGANEncoder(nn.Module):
    """NHWC images in [-1, 1] -> pre-quantisation vectors (B, h, w, vq_embed_dim); `codes` gives their code indices.

    See the module docstring. The codebook is the parameter `codebook` (num_vq_embeddings, vq_embed_dim).
    """

    config: VQGANConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        layers = _Blocks(c, self.dtype, self.param_dtype)
        self.conv_in = layers.conv(c.block_out_channels[0], 3, "conv_in")
        self.down_blocks = [
            DownBlock(c, width, i < len(c.block_out_channels) - 1, kind == "AttnDownEncoderBlock2D", self.dtype,
                      self.param_dtype)
            for i, (width, kind) in enumerate(zip(c.block_out_channels, c.down_block_types))
        ]
        self.mid_block = MidBlock(c, self.dtype, self.param_dtype)
        self.conv_norm_out = layers.norm("conv_norm_out")
        self.conv_out = layers.conv(c.latent_channels, 3, "conv_out")
        self.quant_conv = layers.conv(c.vq_embed_dim, 1, "quant_conv")
        k = c.num_vq_embeddings
        # diffusers initialises its codebook uniformly in [-1/K, 1/K]; pretrained weights replace it.
        self.codebook = self.param(
            "codebook", lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k),
            (k, c.vq_embed_dim), self.param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, in_channels) in [-1, 1] -> (B, H/f, W/f, vq_embed_dim), = diffusers `encode().latents`."""
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.in_channels:
            raise ValueError(
                f"images must be NHWC (batch, height, width, {c.in_channels}) in [-1, 1], got shape {images.shape}"
            )
        x = self.conv_in(images.astype(self.dtype))
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        x = self.conv_out(nn.silu(self.conv_norm_out(x)))  # diffusers applies SiLU here whatever act_fn says
        return self.quant_conv(x)

    def codes_from_latents(self, latents: jax.Array) -> jax.Array:
        """Index of the nearest codebook entry for each vector of `latents` (..., vq_embed_dim): (...) int32."""
        return nearest_codes(latents, self.codebook)

    def codes(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, in_channels) in [-1, 1] -> codes (B, H/f, W/f) int32 in [0, num_vq_embeddings)."""
        return self.codes_from_latents(self(images))

    def codebook_vectors(self, codes: jax.Array) -> jax.Array:
        """codes (...) int -> their codebook vectors (..., vq_embed_dim), i.e. the quantised latents."""
        return jnp.take(self.codebook, codes, axis=0).astype(self.dtype)


# ---------------------------------------------------------------------------------------------- loading

_ENCODER = "encoder."
# Old diffusers names of the attention projections, read when the current ones are absent (as diffusers does).
_OLD_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
# Everything outside the encoder side is skipped: the decoder, post_quant_conv, and any other extra.
_NOT_ENCODER = ((r"^(?!encoder\.|quant_conv\.|quantize\.)", "not part of the encoder (decoder side)"),)


def _resnet_rows(source: str, target: str, in_channels: int, out_channels: int) -> list:
    rows = [("norm", f"{source}.norm1", f"{target}/norm1"), ("conv", f"{source}.conv1", f"{target}/conv1"),
            ("norm", f"{source}.norm2", f"{target}/norm2"), ("conv", f"{source}.conv2", f"{target}/conv2")]
    if in_channels != out_channels:
        rows.append(("conv", f"{source}.conv_shortcut", f"{target}/conv_shortcut"))
    return rows


def _attention_rules(source: str, target: str) -> list[names.Rule]:
    """GroupNorm and q/k/v/out projections of one attention block, with the old diffusers names as fallbacks."""
    rules = names.expand([("norm", f"{source}.group_norm", f"{target}/group_norm")])
    for new, old in _OLD_ATTENTION_NAMES.items():
        for rule in names.expand([("dense", f"{source}.{new}", f"{target}/{new.split('.')[0]}")]):
            suffix = rule.source.rsplit(".", 1)[1]
            rules.append(dataclasses.replace(rule, fallback=f"{source}.{old}.{suffix}"))
    return rules


def vqgan_rules(config: VQGANConfig) -> list[names.Rule]:
    """Checkpoint name -> Flax path rules of the encoder side of a diffusers `VQModel` state dict."""
    rows = [("conv", _ENCODER + "conv_in", "conv_in")]
    attention_rules: list[names.Rule] = []
    width = config.block_out_channels[0]
    last = len(config.block_out_channels) - 1
    for i, out in enumerate(config.block_out_channels):
        for j in range(config.layers_per_block):
            rows += _resnet_rows(f"{_ENCODER}down_blocks.{i}.resnets.{j}", f"down_blocks_{i}/resnets_{j}",
                                 width, out)
            width = out
            if config.down_block_types[i] == "AttnDownEncoderBlock2D":
                attention_rules += _attention_rules(f"{_ENCODER}down_blocks.{i}.attentions.{j}",
                                                    f"down_blocks_{i}/attentions_{j}")
        if i < last:
            rows.append(("conv", f"{_ENCODER}down_blocks.{i}.downsamplers.0.conv", f"down_blocks_{i}/downsample"))
    for j in range(2):
        rows += _resnet_rows(f"{_ENCODER}mid_block.resnets.{j}", f"mid_block/resnets_{j}", width, width)
    rows += [("norm", _ENCODER + "conv_norm_out", "conv_norm_out"), ("conv", _ENCODER + "conv_out", "conv_out"),
             ("conv", "quant_conv", "quant_conv")]
    rules = names.expand(rows) + attention_rules
    if config.mid_block_add_attention:
        rules += _attention_rules(f"{_ENCODER}mid_block.attentions.0", "mid_block/attention")
    rules.append(names.Rule("quantize.embedding.weight", "codebook"))
    return rules


def load_vqgan(path: str | Path, *, param_dtype: jnp.dtype = jnp.float32) -> tuple[VQGANConfig, dict]:
    """Reads a local diffusers `VQModel` directory (config.json + diffusion_pytorch_model.safetensors).

    Returns `(config, params)` for `VQGANEncoder(config).apply({"params": params}, images)`. Raises
    `FileNotFoundError` naming the directory or file that is missing, `ValueError` for an unsupported config, and
    `CheckpointMismatchError` (a `ValueError`) naming every missing, unexpected or mis-shaped encoder tensor.
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"VQGAN checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} is a file; pass the diffusers VQModel directory holding {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(a taming-transformers .ckpt must be converted first, see ladic_jax.encoders.vqgan)"
        )
    present = sorted(p.name for p in directory.iterdir())
    hint = " (it has a vqvae/ subdirectory: pass that)" if (directory / "vqvae").is_dir() else ""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing{hint}; the directory holds {present}")
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{weights_path} is missing{hint}: the VQGAN loader reads only {WEIGHTS_FILE} (re-save .bin weights with "
            f"diffusers' save_pretrained(safe_serialization=True)); the directory holds {present}"
        )
    try:
        raw_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    try:
        config = VQGANConfig.from_dict(raw_config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: {error}") from error

    tensors = read_safetensors(weights_path)
    module = VQGANEncoder(config)
    size = config.downsample_factor
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, size, size, config.in_channels)))["params"]
    template = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}
    conversion = names.convert_checkpoint(
        tensors, vqgan_rules(config), template, ignore=_NOT_ENCODER,
        description=f"VQGAN checkpoint {weights_path}",
    )
    params = traverse_util.unflatten_dict(
        {tuple(k.split("/")): jnp.asarray(np.asarray(v, dtype=np.float32), dtype=param_dtype)
         for k, v in conversion.params.items()}
    )
    return config, params
