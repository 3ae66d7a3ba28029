"""``vqvae``: the image tokenizer of the discrete family, trained on the data by the one trainer.

Not a captioner: the evaluator reconstructs the evaluation images (``Family.evaluation = "reconstruction"``)
and reports the pixel error, PSNR and codebook use, with a sheet of originals above reconstructions.

Loss = ||x̂ - x||² (mean over pixels, the input's normalisation) + β·||z - sg(z_q)||² (commitment), plus
||sg(z) - z_q||² when the codebook is learned by gradient. With the EMA update (the default), the step
hands the new codebook and its statistics to the trainer (``base.STATE_UPDATES``); they must be frozen in
``config.optim.frozen``. Before the first step, ``prepare`` sets the codebook to encoder outputs of the
first training batches, so that every code starts where data is (fewer dead codes than a random init).

Config (``config.model``): the fields of ``models.vqvae.VQVAEConfig`` (channels, num_res_blocks, embed_dim,
num_codes, codebook_update), ``commitment`` (β, 0.25 in the paper), ``ema_decay`` (0.99) and
``dead_code_threshold`` (EMA: codes whose decayed count falls below it restart at a random encoder vector of
the batch; 0 = never).
"""

from __future__ import annotations

import re
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ladic_jax import config as config_lib
from ladic_jax.families import base
from ladic_jax.models import vq
from ladic_jax.models.vqvae import VQVAE, VQVAEConfig
from ladic_jax.sharding import to_host

_FIELDS = ("channels", "num_res_blocks", "embed_dim", "num_codes", "codebook_update")
_EMA_STATE = ("quantizer/codebook", "quantizer/cluster_size", "quantizer/embed_sum")


def vqvae_config(model_cfg) -> VQVAEConfig:
    kw = {k: (tuple(model_cfg[k]) if k == "channels" else model_cfg[k]) for k in _FIELDS if k in model_cfg}
    try:
        return VQVAEConfig(**kw)
    except ValueError as e:
        raise config_lib.ConfigError(str(e).replace("VQVAEConfig.", "config.model.")) from None


@base.register
class VQVAEFamily(base.Family):
    name = "vqvae"
    evaluation = "reconstruction"

    def __init__(self, config):
        super().__init__(config)
        self.vq_config = vqvae_config(config.model)
        c = config_lib
        c.require_nonnegative(config, "model.commitment")
        decay = c.get_field(config, "model.ema_decay")
        c.check(isinstance(decay, float) and 0 < decay < 1, "config.model.ema_decay", f"must be in (0, 1), got {decay!r}")
        size, down = config.input.image_size, self.vq_config.downsampling
        c.check(size % down == 0, "config.model.channels",
                f"has {len(self.vq_config.channels)} stride-2 stages (/{down}), which do not divide "
                f"config.input.image_size={size}")
        if self.vq_config.codebook_update == "ema":
            frozen = list(config.optim.get("frozen", []))
            for name in _EMA_STATE:
                c.check(any(re.search(p, name) for p in frozen), "config.optim.frozen",
                        f"must match {name}: with the EMA codebook update it is set by the step, not the optimizer")
        self.module = VQVAE(self.vq_config)
        self.num_codes = self.vq_config.num_codes

    def _apply(self, params, *args, method=None, **kw):
        return self.module.apply({"params": params}, *args, method=method, **kw)

    def init(self, rng, batch):
        return self.module.init(rng, jnp.zeros(batch["image"].shape, jnp.float32))["params"]

    def prepare(self, params, train_batches: Iterator[dict[str, jax.Array]]):
        """Codebook <- encoder outputs of the first training batches (random distinct ones)."""
        k = self.vq_config.num_codes
        encode = jax.jit(lambda p, x: self._apply(p, x, method=VQVAE.encode))
        vectors, n = [], 0
        for batch in train_batches:
            z = np.asarray(to_host(encode(params, batch["image"]))).reshape(-1, self.vq_config.embed_dim)
            vectors.append(z)
            n += len(z)
            if n >= 4 * k:
                break
        z = np.concatenate(vectors)
        rng = np.random.default_rng(self.config.seed)
        pick = rng.choice(len(z), size=k, replace=len(z) < k)
        codebook = z[pick].astype(np.float32)
        return ({"quantizer/codebook": codebook, "quantizer/embed_sum": codebook,
                 "quantizer/cluster_size": np.ones(k, np.float32)},
                [f"vqvae: codebook of {k} initialised from {len(z)} encoder vectors of the first training batches"])

    def loss(self, params, batch, rng, train=True):
        x = batch["image"]
        z, codes, z_q, recon = self._apply(params, x)
        recon_mse = jnp.mean(jnp.square(recon - x))
        commit = jnp.mean(jnp.square(z - jax.lax.stop_gradient(z_q)))
        loss = recon_mse + self.config.model.commitment * commit
        usage = vq.codebook_usage(codes, self.vq_config.num_codes)
        metrics = {"recon_mse": recon_mse, "commitment": commit, "codebook_used": usage["used"],
                   "codebook_perplexity": usage["perplexity"]}
        if self.vq_config.codebook_update == "gradient":
            loss = loss + jnp.mean(jnp.square(jax.lax.stop_gradient(z) - z_q))
        elif train:
            cluster_size, embed_sum = self._apply(params, method=VQVAE.statistics)
            z_sg = jax.lax.stop_gradient(z)
            cluster_size, embed_sum, codebook = vq.ema_update(cluster_size, embed_sum, z_sg, codes,
                                                              self.config.model.ema_decay)
            threshold = self.config.model.get("dead_code_threshold", 0.0)
            if threshold:
                cluster_size, embed_sum, codebook, n_dead = vq.restart_dead(cluster_size, embed_sum, codebook,
                                                                            z_sg, rng, threshold)
                metrics["codes_restarted"] = n_dead.astype(jnp.float32)
            metrics[base.STATE_UPDATES] = {"quantizer/cluster_size": cluster_size, "quantizer/embed_sum": embed_sum,
                                           "quantizer/codebook": codebook}
        return loss, metrics

    def reconstruct(self, params, batch):
        codes = self._apply(params, batch["image"], method=VQVAE.codes)
        return {"image": self._apply(params, codes, method=VQVAE.decode_codes),
                "codes": codes.reshape(codes.shape[0], -1)}
