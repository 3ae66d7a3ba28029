"""A small VQ-VAE (van den Oord et al. 2017): the image tokenizer of the discrete family on data for which no
pretrained VQGAN exists (the embedded shapes data; DESIGN §10).

    encoder:  [Conv 4x4 stride 2 -> ReLU] per entry of ``channels``  (64 px -> 8 px for three entries)
              -> ``num_res_blocks`` residual blocks (ReLU, Conv 3x3, ReLU, Conv 1x1)
              -> Conv 1x1 to ``embed_dim``                        = z, (B, h, w, embed_dim)
    quantise: codes = nearest codebook entry (``models.vq``), z_q = codebook[codes]
    decoder:  Conv 3x3 -> residual blocks -> [ConvTranspose 4x4 stride 2 -> ReLU] mirrored, the last to 3
              channels without activation (the input pipeline's normalisation)

The codebook is learned by EMA of the assigned encoder vectors (``codebook_update="ema"``; its statistics
``cluster_size``/``embed_sum`` are parameters the optimizer leaves alone) or by gradient through the
codebook loss ||sg(z) - z_q||² (``"gradient"``); the encoder always gets the straight-through gradient
and the commitment loss β·||z - sg(z_q)||².

Parameters: ``encoder/...``, ``decoder/...``, ``quantizer/{codebook,cluster_size,embed_sum}``.

Exported by ``ladic-convert vqvae`` as a directory of ``vqvae.json`` (the fields of ``VQVAEConfig`` and
the image normalisation) and ``model.safetensors`` (parameters by path); ``load_vqvae`` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ladic_jax.models import vq

CODEBOOK_UPDATES = ("ema", "gradient")
CONFIG_FILE, WEIGHTS_FILE = "vqvae.json", "model.safetensors"


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Sizes of the VQ-VAE. ``channels``: one stride-2 stage each (the code grid is image_size / 2^len)."""
    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    embed_dim: int = 32
    num_codes: int = 256
    codebook_update: str = "ema"

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        for name in ("embed_dim", "num_codes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"VQVAEConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"VQVAEConfig.channels must be positive ints, one per stride-2 stage, got {self.channels}")
        if not isinstance(self.num_res_blocks, int) or self.num_res_blocks < 0:
            raise ValueError(f"VQVAEConfig.num_res_blocks must be an int >= 0, got {self.num_res_blocks!r}")
        if self.codebook_update not in CODEBOOK_UPDATES:
            raise ValueError(f"VQVAEConfig.codebook_update must be one of {CODEBOOK_UPDATES}, got {self.codebook_update!r}")

    @property
    def downsampling(self) -> int:
        return 2 ** len(self.channels)


class ResBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.channels, (3, 3), name="conv3")(nn.relu(x))
        return x + nn.Conv(x.shape[-1], (1, 1), name="conv1")(nn.relu(h))


class Encoder(nn.Module):
    config: VQVAEConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        for i, ch in enumerate(c.channels):
            x = nn.relu(nn.Conv(ch, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), name=f"down_{i}")(x))
        for i in range(c.num_res_blocks):
            x = ResBlock(c.channels[-1], name=f"res_{i}")(x)
        return nn.Conv(c.embed_dim, (1, 1), name="to_embed")(nn.relu(x))


class Decoder(nn.Module):
    config: VQVAEConfig

    @nn.compact
    def __call__(self, z):
        c = self.config
        x = nn.Conv(c.channels[-1], (3, 3), name="from_embed")(z)
        for i in range(c.num_res_blocks):
            x = ResBlock(c.channels[-1], name=f"res_{i}")(x)
        x = nn.relu(x)
        outs = list(reversed(c.channels[:-1])) + [3]
        for i, ch in enumerate(outs):
            x = nn.ConvTranspose(ch, (4, 4), strides=(2, 2), padding="SAME", name=f"up_{i}")(x)
            if i < len(outs) - 1:
                x = nn.relu(x)
        return x


class Quantizer(nn.Module):
    config: VQVAEConfig

    def setup(self):
        k, d = self.config.num_codes, self.config.embed_dim
        self.codebook = self.param("codebook", nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), (k, d))
        # EMA statistics (unused by the "gradient" update; kept so that both layouts are one).
        self.cluster_size = self.param("cluster_size", nn.initializers.ones, (k,))
        self.embed_sum = self.param("embed_sum", lambda key, s: self.codebook, (k, d))

    def __call__(self, z):
        codes = vq.nearest_codes(z, self.codebook)
        return codes, jnp.take(self.codebook, codes, axis=0)

    def statistics(self):
        return self.cluster_size, self.embed_sum


class VQVAE(nn.Module):
    config: VQVAEConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.quantizer = Quantizer(self.config)
        self.decoder = Decoder(self.config)

    def encode(self, images):
        """z (B, h, w, embed_dim) before quantisation."""
        return self.encoder(images)

    def codes(self, images):
        """The image's codes (B, h, w) int32."""
        return self.quantizer(self.encoder(images))[0]

    def decode_codes(self, codes):
        return self.decoder(jnp.take(self.quantizer.codebook, codes, axis=0))

    def statistics(self):
        return self.quantizer.statistics()

    def __call__(self, images):
        """(z, codes, z_q, reconstruction through the straight-through estimator)."""
        z = self.encoder(images)
        codes, z_q = self.quantizer(z)
        return z, codes, z_q, self.decoder(vq.straight_through(z, z_q))


# ------------------------------------------------------------------------------------------------ files


def save_vqvae(out_dir: str, config: VQVAEConfig, params: Any, *, image_size: int,
               image_mean: Sequence[float], image_std: Sequence[float]) -> Path:
    """Writes ``vqvae.json`` and ``model.safetensors`` (parameters by path) into out_dir."""
    from safetensors.numpy import save_file

    from ladic_jax.sharding import path_str
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = {path_str(p): np.ascontiguousarray(np.asarray(v, np.float32))
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    save_file(flat, str(out / WEIGHTS_FILE))
    meta = dict(dataclasses.asdict(config), image_size=int(image_size), image_mean=list(image_mean),
                image_std=list(image_std))
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def is_vqvae_dir(path: str) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_vqvae(path: str) -> tuple[VQVAEConfig, dict, dict]:
    """(config, params, preprocessing {image_size, image_mean, image_std}) from a ``save_vqvae`` directory."""
    from safetensors.numpy import load_file

    root = Path(path)
    cfg_file, weights = root / CONFIG_FILE, root / WEIGHTS_FILE
    for f, what in ((cfg_file, "the VQ-VAE's sizes"), (weights, "its parameters")):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found; a VQ-VAE directory (written by `ladic-convert vqvae`) holds "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE} ({what})")
    meta = json.loads(cfg_file.read_text())
    pre = {k: meta.pop(k) for k in ("image_size", "image_mean", "image_std")}
    try:
        config = VQVAEConfig(**meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    params: dict = {}
    for name, value in load_file(str(weights)).items():
        node = params
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    expected = jax.eval_shape(lambda: VQVAE(config).init(
        jax.random.key(0), jnp.zeros((1, pre["image_size"], pre["image_size"], 3)))["params"])
    got = jax.tree.map(lambda a: a.shape, params)
    want = jax.tree.map(lambda a: a.shape, expected)
    if got != want:
        raise ValueError(f"{weights}: parameters do not match the sizes of {cfg_file}")
    return config, params, pre
