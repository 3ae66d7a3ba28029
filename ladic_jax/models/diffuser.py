"""The LaDiC diffuser: a transformer that predicts clean text latents x̂0 from noisy ones and image tokens.

Each block is self-attention over the L text positions, cross-attention from the text (queries) to the image
tokens (keys/values), then an MLP. The model takes the noisy latent x_t, the self-conditioning estimate x̂0 of
the previous step (zeros when absent) and the timestep, and returns x̂0.

Two families of choices are switches in `DiffuserConfig`:

| switch        | default (paper / good practice)           | `official` (LaDiC release, BLIP "MED" BERT)            |
|---------------|-------------------------------------------|--------------------------------------------------------|
| `input_mode`  | `project`: Dense([x_t; x̂0]) -> width      | `concat`: [x_t; x̂0] is the hidden state (width = 2D)   |
| `time_embed`  | `mlp`: sinusoid -> Dense -> SiLU -> Dense | `table_ln`: fixed sinusoid table row, then LayerNorm   |
| `block_norm`  | `pre`: pre-LayerNorm blocks + final norm  | `post`: BERT post-LayerNorm (eps 1e-12, exact GELU)    |
| `output_mode` | `project`: Dense(width -> D)              | `slice`: the first D channels of the last hidden state |

Either way the embedding is ``h = embed_norm(input + time + position)`` (the release's order:
``LayerNorm(concat + time_layer_norm(PE[t]) + position_embeddings)``), followed by dropout.

Classifier-free guidance uses a learned null condition: a (cond_dim,) vector that replaces every image token of
the examples whose ``null_mask`` is True. (The release instead feeds an all-zero image through its ViT; to
reproduce that, pass the ViT tokens of a zero image with ``null_mask`` False.)

Sampling cost: `Diffuser.condition` computes every block's cross-attention keys and values once per image;
`Diffuser.denoise` reuses them at every step. ``__call__`` is ``denoise(condition(...))``.

Parameter layout (kernels of Dense layers are (in, out); attention projections are plain Dense layers with
kernels (in, heads * head_dim), heads contiguous in the output axis, as in HF BERT):

    input_proj/{kernel,bias}                         (2D, width)       [input_mode=project]
    position_embeddings                              (max_len, width)
    time_mlp_in, time_mlp_out /{kernel,bias}                           [time_embed=mlp]
    time_norm/{scale,bias}                           (width,)          [time_embed=table_ln]
    embed_norm/{scale,bias}                          (width,)
    block_{i}/self_attn/{query,key,value,out}/{kernel,bias}   (width, width)
    block_{i}/self_attn_norm/{scale,bias}
    block_{i}/cross_attn/{query,out}/{kernel,bias}            (width, width)
    block_{i}/cross_attn/{key,value}/{kernel,bias}            (cond_dim, width)
    block_{i}/cross_attn_norm/{scale,bias}
    block_{i}/mlp/fc1 (width, mlp_dim), block_{i}/mlp/fc2 (mlp_dim, width)
    block_{i}/mlp_norm/{scale,bias}
    final_norm/{scale,bias}                                            [block_norm=pre]
    output_proj/{kernel,bias}                        (width, D)        [output_mode=project]
    null_condition                                   (cond_dim,)

Release tensor -> parameter (transpose torch Linear weights): ``diffuser.embeddings.position_embeddings`` ->
``position_embeddings``; ``diffuser.embeddings.LayerNorm`` -> ``embed_norm``; ``time_layer_norm`` ->
``time_norm``; per layer N: ``attention.self.{query,key,value}`` -> ``block_N/self_attn/{query,key,value}``,
``attention.output.dense`` -> ``self_attn/out``, ``attention.output.LayerNorm`` -> ``self_attn_norm``,
``crossattention.*`` likewise -> ``cross_attn``/``cross_attn_norm``, ``intermediate.dense`` -> ``mlp/fc1``,
``output.dense`` -> ``mlp/fc2``, ``output.LayerNorm`` -> ``mlp_norm``. ``null_condition`` has no counterpart.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
CrossKV = tuple[tuple[jax.Array, jax.Array], ...]
"""Per block, the cross-attention (keys, values), each (B, N, heads, head_dim): the output of `condition`."""

INPUT_MODES = ("project", "concat")
TIME_EMBEDS = ("mlp", "table_ln")
BLOCK_NORMS = ("pre", "post")
OUTPUT_MODES = ("project", "slice")

_SIZES = {
    # CPU demo: a few million parameters.
    "tiny": dict(width=256, depth=3, num_heads=4, mlp_dim=1024),
    "small": dict(width=512, depth=6, num_heads=8, mlp_dim=2048),
    # The paper (table 7): 12 blocks, hidden 768, FFN 3072, 16 attention heads.
    "base": dict(width=768, depth=12, num_heads=16, mlp_dim=3072),
}
PRESETS = tuple(_SIZES) + ("official",)


@dataclasses.dataclass(frozen=True)
class DiffuserConfig:
    """Sizes and variant switches of the diffuser (see the module docstring for the switches).

    Attributes:
      latent_dim: D, the width of the diffused text latent.
      width: hidden size of the transformer.
      depth: number of blocks.
      num_heads: attention heads (self and cross); must divide `width`.
      mlp_dim: hidden size of each block's MLP.
      max_len: number of learned position embeddings (the longest sequence accepted).
      cond_dim: width of the image tokens.
      dropout: dropout on the embedding and on each sublayer's output.
      attention_dropout: dropout on attention probabilities.
      layer_norm_eps: epsilon of every LayerNorm.
      num_timesteps: T, the rows of the `table_ln` time table.
      exact_gelu: erf GELU (BERT) rather than the tanh approximation.
      time_freq_dim: number of sinusoidal features fed to the `mlp` time embedding.
      position_init_std: standard deviation of the initial position embeddings (BERT: 0.02).
    """

    latent_dim: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    max_len: int
    cond_dim: int
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-6
    num_timesteps: int = 1000
    input_mode: str = "project"
    time_embed: str = "mlp"
    block_norm: str = "pre"
    output_mode: str = "project"
    exact_gelu: bool = True
    time_freq_dim: int = 256
    position_init_std: float = 0.02

    def __post_init__(self):
        for name in ("latent_dim", "width", "depth", "num_heads", "mlp_dim", "max_len", "cond_dim",
                     "num_timesteps", "time_freq_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"DiffuserConfig.{name} must be a positive integer, got {value!r}")
        for name, value, choices in (
            ("input_mode", self.input_mode, INPUT_MODES),
            ("time_embed", self.time_embed, TIME_EMBEDS),
            ("block_norm", self.block_norm, BLOCK_NORMS),
            ("output_mode", self.output_mode, OUTPUT_MODES),
        ):
            if value not in choices:
                raise ValueError(f"DiffuserConfig.{name} must be one of {choices}, got {value!r}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"DiffuserConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.width % self.num_heads:
            raise ValueError(f"DiffuserConfig.width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if self.input_mode == "concat" and self.width != 2 * self.latent_dim:
            raise ValueError(
                f"input_mode='concat' needs width == 2 * latent_dim = {2 * self.latent_dim}, got width {self.width}"
            )
        if self.output_mode == "slice" and self.width < self.latent_dim:
            raise ValueError(f"output_mode='slice' needs width >= latent_dim ({self.latent_dim}), got {self.width}")
        if self.time_embed == "table_ln" and self.width % 2:
            raise ValueError(f"time_embed='table_ln' needs an even width, got {self.width}")
        if self.time_freq_dim % 2:
            raise ValueError(f"DiffuserConfig.time_freq_dim must be even, got {self.time_freq_dim}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def preset(cls, name: str, latent_dim: int, cond_dim: int, max_len: int, **overrides) -> "DiffuserConfig":
        """A named size: ``tiny`` (256 wide, 3 blocks; CPU demo), ``small`` (512, 6), ``base`` (paper: 768 wide,
        12 blocks, 16 heads, MLP 3072), or ``official`` (the LaDiC release: width 2·latent_dim, 12 post-LN BERT
        blocks, 16 heads, MLP 3072, eps 1e-12, concat input, table_ln time, slice output; its checkpoint has
        max_len 512). Any field can be overridden by keyword."""
        if name in _SIZES:
            fields = dict(_SIZES[name])
        elif name == "official":
            fields = dict(
                width=2 * latent_dim, depth=12, num_heads=16, mlp_dim=3072, layer_norm_eps=1e-12,
                input_mode="concat", time_embed="table_ln", block_norm="post", output_mode="slice",
            )
        else:
            raise ValueError(f"unknown diffuser preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields.update(latent_dim=latent_dim, cond_dim=cond_dim, max_len=max_len)
        fields.update(overrides)
        return cls(**fields)


@functools.lru_cache(maxsize=8)
def sinusoid_table(num_positions: int, width: int) -> np.ndarray:
    """Interleaved sinusoid table (num_positions, width), float64: PE[t, 2i] = sin(t·ω_i), PE[t, 2i+1] =
    cos(t·ω_i), ω_i = exp(-2i·ln(10000) / width). Built in float64 because t·ω for t near 1000 loses ~1e-4 of
    its value in float32."""
    t = np.arange(num_positions, dtype=np.float64)[:, None]
    omega = np.exp(-np.arange(0, width, 2, dtype=np.float64) * math.log(10000.0) / width)
    table = np.empty((num_positions, width), np.float64)
    table[:, 0::2] = np.sin(t * omega)
    table[:, 1::2] = np.cos(t * omega)
    table.flags.writeable = False  # shared through the cache
    return table


def sinusoid_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """[cos(t·ω_i), sin(t·ω_i)] for ω_i = max_period^(-i / (dim/2)), i < dim/2: (B,) -> (B, dim) float32."""
    half = dim // 2
    omega = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * omega[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Attention(nn.Module):
    """Multi-head attention whose keys/values can be computed separately (and cached) with `key_value`.

    Keys are kept as (B, heads, head_dim, N) and values as (B, heads, N, head_dim): the layouts the two
    attention products read without a transpose, so that keys/values computed once (an image's, for every
    denoising step; a decoder's cache) are not transposed again at every call. Measured on the release-size
    sampler step (8 rows x 24 tokens against 197 image tokens, 16 heads): the per-step transposes of the
    cached (B, N, heads, head_dim) keys/values took ~40 % of its time.
    """

    num_heads: int
    width: int
    dropout: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        dense = functools.partial(nn.Dense, self.width, dtype=self.dtype, param_dtype=self.param_dtype)
        self.query = dense(name="query")
        self.key = dense(name="key")
        self.value = dense(name="value")
        self.out = dense(name="out")
        self.attn_dropout = nn.Dropout(self.dropout)

    def _split(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[:-1] + (self.num_heads, self.width // self.num_heads))

    def key_value(self, source: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Projects source tokens (B, N, in) to keys (B, heads, head_dim, N) and values (B, heads, N, head_dim)."""
        return (jnp.transpose(self._split(self.key(source)), (0, 2, 3, 1)),
                jnp.transpose(self._split(self.value(source)), (0, 2, 1, 3)))

    def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array], deterministic: bool,
                 mask: jax.Array | None = None) -> jax.Array:
        """Queries from x (B, L, width) attend over kv (from ``key_value``); returns the output projection
        (B, L, width). ``mask``: bool, broadcastable to (B, heads, L, N), True where a query may attend to a key."""
        keys, values = kv
        head_dim = self.width // self.num_heads
        q = self._split(self.query(x)) / jnp.sqrt(head_dim).astype(self.dtype)
        logits = jnp.einsum("blhd,bhdn->bhln", q, keys.astype(self.dtype)).astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        probs = self.attn_dropout(probs, deterministic=deterministic)
        ctx = jnp.einsum("bhln,bhnd->blhd", probs, values.astype(self.dtype))
        return self.out(ctx.reshape(ctx.shape[:-2] + (self.width,)))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    mlp_dim: int
    width: int
    exact_gelu: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = nn.gelu(x, approximate=not self.exact_gelu)
        return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


class DiffuserBlock(nn.Module):
    """Self-attention, cross-attention to the (pre-projected) image keys/values, MLP; pre- or post-LN."""

    config: DiffuserConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        attn = functools.partial(
            Attention, c.num_heads, c.width, c.attention_dropout, dtype=self.dtype, param_dtype=self.param_dtype
        )
        norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.self_attn = attn(name="self_attn")
        self.self_attn_norm = norm(name="self_attn_norm")
        self.cross_attn = attn(name="cross_attn")
        self.cross_attn_norm = norm(name="cross_attn_norm")
        self.mlp = Mlp(c.mlp_dim, c.width, c.exact_gelu, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")
        self.mlp_norm = norm(name="mlp_norm")
        self.drop = nn.Dropout(c.dropout)

    def cross_key_value(self, cond_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """This block's cross-attention keys and values for image tokens (B, N, cond_dim)."""
        return self.cross_attn.key_value(cond_tokens)

    def self_key_value(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The self-attention keys and values of the block input h (B, L, width): what a key/value cache of an
        autoregressive decoder stores per position."""
        return self.self_attn.key_value(self.self_attn_norm(h) if self.config.block_norm == "pre" else h)

    def __call__(self, h: jax.Array, cross_kv: tuple[jax.Array, jax.Array], deterministic: bool,
                 self_kv: tuple[jax.Array, jax.Array] | None = None, mask: jax.Array | None = None) -> jax.Array:
        """One block. ``self_kv``: the self-attention keys/values (default: ``self_key_value(h)``; an
        autoregressive decoder passes its cache); ``mask`` restricts the self-attention (e.g. causal)."""
        drop = functools.partial(self.drop, deterministic=deterministic)
        pre = self.config.block_norm == "pre"
        y = self.self_attn_norm(h) if pre else h
        kv = self.self_attn.key_value(y) if self_kv is None else self_kv
        if pre:
            h = h + drop(self.self_attn(y, kv, deterministic, mask))
            h = h + drop(self.cross_attn(self.cross_attn_norm(h), cross_kv, deterministic))
            return h + drop(self.mlp(self.mlp_norm(h)))
        h = self.self_attn_norm(h + drop(self.self_attn(h, kv, deterministic, mask)))
        h = self.cross_attn_norm(h + drop(self.cross_attn(h, cross_kv, deterministic)))
        return self.mlp_norm(h + drop(self.mlp(h)))


class Diffuser(nn.Module):
    """x̂0 = f(x_t, t, self-conditioning, image tokens); see the module docstring.

    Attributes:
      config: sizes and switches.
      dtype: activation dtype (e.g. bfloat16); attention softmax and the returned x̂0 are float32.
      param_dtype: parameter dtype.
    """

    config: DiffuserConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        if c.input_mode == "project":
            self.input_proj = dense(c.width, name="input_proj")
        self.position_embeddings = self.param(
            "position_embeddings", nn.initializers.normal(c.position_init_std), (c.max_len, c.width),
            self.param_dtype
        )
        if c.time_embed == "mlp":
            self.time_mlp_in = dense(c.width, name="time_mlp_in")
            self.time_mlp_out = dense(c.width, name="time_mlp_out")
        else:
            self.time_norm = norm(name="time_norm")
        self.embed_norm = norm(name="embed_norm")
        self.embed_dropout = nn.Dropout(c.dropout)
        self.blocks = [
            DiffuserBlock(c, dtype=self.dtype, param_dtype=self.param_dtype, name=f"block_{i}") for i in range(c.depth)
        ]
        if c.block_norm == "pre":
            self.final_norm = norm(name="final_norm")
        if c.output_mode == "project":
            self.output_proj = dense(c.latent_dim, name="output_proj")
        self.null_condition = self.param(
            "null_condition", nn.initializers.normal(0.02), (c.cond_dim,), self.param_dtype
        )

    # ------------------------------------------------------------------------------------------ condition

    def condition(self, image_tokens: jax.Array, null_mask: jax.Array | None = None) -> CrossKV:
        """Every block's cross-attention keys/values for image tokens (B, N, cond_dim), computed once.

        Rows where ``null_mask`` (B,) bool is True use the learned null condition instead of their tokens. For
        classifier-free guidance, call it once on ``[tokens; tokens]`` with mask ``[False; True]`` and denoise
        ``[x_t; x_t]`` at every step.
        """
        c = self.config
        if image_tokens.ndim != 3 or image_tokens.shape[-1] != c.cond_dim:
            raise ValueError(f"image_tokens must have shape (batch, tokens, {c.cond_dim}), got {image_tokens.shape}")
        tokens = image_tokens.astype(self.dtype)
        if null_mask is not None:
            null_mask = jnp.asarray(null_mask)
            if null_mask.shape != (image_tokens.shape[0],) or null_mask.dtype != jnp.bool_:
                raise ValueError(
                    f"null_mask must be a bool array of shape ({image_tokens.shape[0]},), "
                    f"got {null_mask.dtype} {null_mask.shape}"
                )
            null = jnp.broadcast_to(self.null_condition.astype(self.dtype), tokens.shape)
            tokens = jnp.where(null_mask[:, None, None], null, tokens)
        return tuple(block.cross_key_value(tokens) for block in self.blocks)

    # ------------------------------------------------------------------------------------------ denoise

    def _time_embedding(self, t: jax.Array) -> jax.Array:
        c = self.config
        if c.time_embed == "mlp":
            e = self.time_mlp_in(sinusoid_features(t, c.time_freq_dim).astype(self.dtype))
            return self.time_mlp_out(nn.silu(e))
        table = jnp.asarray(sinusoid_table(c.num_timesteps, c.width), jnp.float32)
        return self.time_norm(table[jnp.clip(t, 0, c.num_timesteps - 1)].astype(self.dtype))

    def denoise(
        self,
        x_t: jax.Array,
        t: jax.Array,
        self_cond: jax.Array | None,
        cond: CrossKV,
        deterministic: bool = True,
    ) -> jax.Array:
        """x̂0 (B, L, D) float32 from x_t (B, L, D), int timesteps t (B,) (or scalar), the self-conditioning
        estimate (B, L, D) or None (zeros), and `cond` from `condition`. Timesteps outside 0..T-1 are
        clipped by the `table_ln` embedding."""
        c = self.config
        if x_t.ndim != 3 or x_t.shape[-1] != c.latent_dim:
            raise ValueError(f"x_t must have shape (batch, length, {c.latent_dim}), got {x_t.shape}")
        batch, length, _ = x_t.shape
        if length > c.max_len:
            raise ValueError(f"x_t has length {length}, more than the diffuser's max_len {c.max_len}")
        if self_cond is None:
            self_cond = jnp.zeros_like(x_t)
        elif self_cond.shape != x_t.shape:
            raise ValueError(f"self_cond shape {self_cond.shape} must equal x_t shape {x_t.shape}")
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.integer) or t.ndim > 1 or (t.ndim == 1 and t.shape[0] != batch):
            raise ValueError(f"t must be integer timesteps of shape ({batch},) or a scalar, got {t.dtype} {t.shape}")
        if len(cond) != c.depth or cond[0][0].shape[0] != batch:
            raise ValueError(
                f"cond must hold {c.depth} blocks' keys/values for batch {batch} (from Diffuser.condition), "
                f"got {len(cond)} blocks, batch {cond[0][0].shape[0] if len(cond) else None}"
            )
        t = jnp.broadcast_to(t, (batch,))

        x = jnp.concatenate([x_t, self_cond], axis=-1).astype(self.dtype)
        if c.input_mode == "project":
            x = self.input_proj(x)
        x = x + self._time_embedding(t)[:, None, :]
        h = self.embed_norm(x + self.position_embeddings[:length].astype(self.dtype))
        h = self.embed_dropout(h, deterministic=deterministic)
        for block, kv in zip(self.blocks, cond):
            h = block(h, kv, deterministic)
        if c.block_norm == "pre":
            h = self.final_norm(h)
        out = self.output_proj(h) if c.output_mode == "project" else h[..., : c.latent_dim]
        return out.astype(jnp.float32)

    def __call__(
        self,
        x_t: jax.Array,
        t: jax.Array,
        self_cond: jax.Array | None,
        image_tokens: jax.Array,
        null_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """``denoise(x_t, t, self_cond, condition(image_tokens, null_mask))``; use it to `init` (it touches every
        parameter; with ``null_mask`` None the null condition is still created by `setup`)."""
        return self.denoise(x_t, t, self_cond, self.condition(image_tokens, null_mask), deterministic)
