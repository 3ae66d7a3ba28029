"""The diffuser against an independent float64 numpy implementation, plus its structural promises."""

import itertools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from ladic_jax.models import Diffuser, DiffuserConfig

D, WIDTH, COND, MAX_LEN = 16, 32, 24, 10
B, L, N = 3, 7, 5


def make_config(**overrides) -> DiffuserConfig:
    fields = dict(latent_dim=D, width=WIDTH, depth=2, num_heads=4, mlp_dim=64, max_len=MAX_LEN, cond_dim=COND)
    fields.update(overrides)
    return DiffuserConfig(**fields)


def make_inputs(seed=0, batch=B, length=L):
    ks = jax.random.split(jax.random.key(seed), 4)
    x_t = jax.random.normal(ks[0], (batch, length, D))
    sc = jax.random.normal(ks[1], (batch, length, D))
    t = jnp.array([0, 421, 999, 17, 250, 600][:batch], jnp.int32)
    img = jax.random.normal(ks[2], (batch, N, COND))
    return x_t, t, sc, img


def param_shapes(model, dtype=None):
    """The parameter tree's shapes/dtypes from tracing `init` (nothing is compiled or run)."""
    x_t, t, sc, img = make_inputs()
    return jax.eval_shape(model.init, jax.random.key(0), x_t, t, sc, img)


def random_params(model, seed=1):
    """Parameters with the module's own tree, filled from numpy: kernels N(0, 1/fan_in), LayerNorm scales
    1 + 0.1·N, biases/embeddings/null condition 0.1·N — so every parameter, including those initialised to 0/1,
    matters in the comparison. (Eager `init` compiles every initializer op separately; this avoids that.)"""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            value = rng.normal(size=leaf.shape) / math.sqrt(leaf.shape[0])
        elif name.endswith("['scale']"):
            value = 1 + 0.1 * rng.normal(size=leaf.shape)
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, param_shapes(model))


# ------------------------------------------------------------------------------------ numpy reference


def np_layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def np_gelu(x, exact):
    if exact:
        return 0.5 * x * (1 + erf(x / math.sqrt(2)))
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_attention(xq, xkv, p, heads):
    q, k, v = np_dense(xq, p["query"]), np_dense(xkv, p["key"]), np_dense(xkv, p["value"])
    b, lq, w = q.shape
    dh = w // heads
    q = q.reshape(b, lq, heads, dh)
    k = k.reshape(b, -1, heads, dh)
    v = v.reshape(b, -1, heads, dh)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    ctx = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, w)
    return np_dense(ctx, p["out"])


def np_time_table_row(t, width):
    """LaDiC release: PE[t, 2i] = sin(t·exp(-2i ln(10000)/width)), PE[t, 2i+1] = cos(same)."""
    pe = np.zeros(width)
    for i in range(width // 2):
        w = math.exp(-2 * i * math.log(10000.0) / width)
        pe[2 * i] = math.sin(t * w)
        pe[2 * i + 1] = math.cos(t * w)
    return pe


def np_time_features(t, dim):
    half = dim // 2
    w = np.exp(-math.log(10000.0) * np.arange(half) / half)
    return np.concatenate([np.cos(t * w), np.sin(t * w)])


def np_diffuser(params, cfg: DiffuserConfig, x_t, t, sc, img, null_mask=None):
    """Float64 forward written from the formulas (ladic_official.md for the official switches)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), flax.core.unfreeze(params))["params"]
    x_t, sc, img = (np.asarray(a, np.float64) for a in (x_t, sc, img))
    eps = cfg.layer_norm_eps
    if null_mask is not None:
        img = np.where(np.asarray(null_mask)[:, None, None], p["null_condition"][None, None, :], img)
    x = np.concatenate([x_t, sc], -1)
    if cfg.input_mode == "project":
        x = np_dense(x, p["input_proj"])
    if cfg.time_embed == "table_ln":
        temb = np.stack([np_layer_norm(np_time_table_row(int(tt), cfg.width), p["time_norm"], eps) for tt in t])
    else:
        feats = np.stack([np_time_features(int(tt), cfg.time_freq_dim) for tt in t])
        hid = np_dense(feats, p["time_mlp_in"])
        temb = np_dense(hid / (1 + np.exp(-hid)), p["time_mlp_out"])
    x = x + temb[:, None, :]
    h = np_layer_norm(x + p["position_embeddings"][: x.shape[1]], p["embed_norm"], eps)
    for i in range(cfg.depth):
        bp = p[f"block_{i}"]
        mlp = lambda y: np_dense(np_gelu(np_dense(y, bp["mlp"]["fc1"]), cfg.exact_gelu), bp["mlp"]["fc2"])
        if cfg.block_norm == "post":
            h = np_layer_norm(h + np_attention(h, h, bp["self_attn"], cfg.num_heads), bp["self_attn_norm"], eps)
            h = np_layer_norm(h + np_attention(h, img, bp["cross_attn"], cfg.num_heads), bp["cross_attn_norm"], eps)
            h = np_layer_norm(h + mlp(h), bp["mlp_norm"], eps)
        else:
            y = np_layer_norm(h, bp["self_attn_norm"], eps)
            h = h + np_attention(y, y, bp["self_attn"], cfg.num_heads)
            h = h + np_attention(np_layer_norm(h, bp["cross_attn_norm"], eps), img, bp["cross_attn"], cfg.num_heads)
            h = h + mlp(np_layer_norm(h, bp["mlp_norm"], eps))
    if cfg.block_norm == "pre":
        h = np_layer_norm(h, p["final_norm"], eps)
    return np_dense(h, p["output_proj"]) if cfg.output_mode == "project" else h[..., : cfg.latent_dim]


# ------------------------------------------------------------------------------------ tests

VARIANTS = list(itertools.product(("project", "concat"), ("mlp", "table_ln"), ("pre", "post"), ("project", "slice")))


@pytest.mark.parametrize("input_mode,time_embed,block_norm,output_mode", VARIANTS)
def test_every_variant_matches_numpy_reference(input_mode, time_embed, block_norm, output_mode):
    cfg = make_config(input_mode=input_mode, time_embed=time_embed, block_norm=block_norm, output_mode=output_mode,
                      exact_gelu=block_norm == "post")
    model = Diffuser(cfg)
    params = random_params(model)
    x_t, t, sc, img = make_inputs(seed=3)
    out = model.apply(params, x_t, t, sc, img)
    assert out.shape == (B, L, D) and out.dtype == jnp.float32
    # The mlp time embedding takes float32 sinusoids of t up to 999, whose arguments carry ~6e-5 of rounding;
    # the table_ln variants use a float64 table and match to 2e-5.
    atol = 1e-4 if time_embed == "mlp" else 2e-5
    np.testing.assert_allclose(np.asarray(out), np_diffuser(params, cfg, x_t, t, sc, img), atol=atol, rtol=1e-5)


def test_official_preset_matches_numpy_reference():
    """The release's semantics (concat input, table_ln time, post-LN BERT blocks with exact GELU and eps 1e-12,
    slice output), sized down; params read out by name; <= 1e-5."""
    cfg = DiffuserConfig.preset("official", latent_dim=D, cond_dim=COND, max_len=12, depth=2, num_heads=4, mlp_dim=64)
    assert (cfg.width, cfg.layer_norm_eps, cfg.input_mode, cfg.time_embed, cfg.block_norm, cfg.output_mode,
            cfg.exact_gelu) == (2 * D, 1e-12, "concat", "table_ln", "post", "slice", True)
    model = Diffuser(cfg)
    params = random_params(model, seed=5)
    x_t, t, sc, img = make_inputs(seed=4)
    out = np.asarray(model.apply(params, x_t, t, sc, img))
    ref = np_diffuser(params, cfg, x_t, t, sc, img)
    assert np.max(np.abs(out - ref)) <= 1e-5
    # Self-conditioning absent == zeros.
    out0 = np.asarray(model.apply(params, x_t, t, None, img))
    ref0 = np_diffuser(params, cfg, x_t, t, np.zeros(x_t.shape), img)
    assert np.max(np.abs(out0 - ref0)) <= 1e-5


def test_call_equals_denoise_of_condition():
    model = Diffuser(make_config())
    params = random_params(model)
    x_t, t, sc, img = make_inputs(seed=2)
    mask = jnp.array([False, True, False])
    direct = model.apply(params, x_t, t, sc, img, mask)
    cond = model.apply(params, img, mask, method=Diffuser.condition)
    assert len(cond) == 2 and cond[0][0].shape == (B, 4, WIDTH // 4, N) and cond[0][1].shape == (B, 4, N, WIDTH // 4)
    split = model.apply(params, x_t, t, sc, cond, method=Diffuser.denoise)
    np.testing.assert_array_equal(np.asarray(direct), np.asarray(split))


def test_null_mask_rows_ignore_the_image():
    model = Diffuser(make_config())
    params = random_params(model)
    x_t, t, sc, img = make_inputs(seed=2)
    other = jax.random.normal(jax.random.key(9), img.shape)
    mask = jnp.array([True, False, True])
    a = np.asarray(model.apply(params, x_t, t, sc, img, mask))
    b = np.asarray(model.apply(params, x_t, t, sc, other, mask))
    np.testing.assert_array_equal(a[mask], b[mask])
    assert np.abs(a[~mask] - b[~mask]).min(axis=-1).max() > 0  # every unmasked position changed
    assert np.all(np.abs(a[~mask] - b[~mask]).max(axis=(-1, -2)) > 1e-3)
    # Masked rows equal an explicit null-condition image, and the reference agrees.
    null_img = jnp.broadcast_to(params["params"]["null_condition"], img.shape)
    c = np.asarray(model.apply(params, x_t, t, sc, null_img))
    np.testing.assert_allclose(a[mask], c[mask], atol=1e-6)
    np.testing.assert_allclose(a, np_diffuser(params, model.config, x_t, t, sc, img, mask), atol=1e-4)


def test_attention_mixes_positions_and_inputs_matter():
    model = Diffuser(make_config())
    params = random_params(model)
    x_t, t, sc, img = make_inputs(seed=6)
    base = np.asarray(model.apply(params, x_t, t, sc, img))
    moved = np.asarray(model.apply(params, x_t.at[:, 0].add(1.0), t, sc, img))
    diff = np.abs(moved - base).max(axis=-1)  # (B, L)
    assert np.all(diff[:, 1:] > 1e-4), "changing position 0 must change every other position"
    assert np.abs(np.asarray(model.apply(params, x_t, t + 1, sc, img)) - base).max() > 1e-4
    assert np.abs(np.asarray(model.apply(params, x_t, t, None, img)) - base).max() > 1e-4


def test_dropout_respects_deterministic():
    model = Diffuser(make_config(dropout=0.3, attention_dropout=0.3))
    params = random_params(model)
    x_t, t, sc, img = make_inputs()
    det = model.apply(params, x_t, t, sc, img)
    det2 = model.apply(params, x_t, t, sc, img, deterministic=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(np.asarray(det), np.asarray(det2))
    r1 = model.apply(params, x_t, t, sc, img, deterministic=False, rngs={"dropout": jax.random.key(1)})
    r2 = model.apply(params, x_t, t, sc, img, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(r1) - np.asarray(det)).max() > 1e-3
    assert np.abs(np.asarray(r1) - np.asarray(r2)).max() > 1e-3


@pytest.mark.parametrize("official", [False, True])
def test_bfloat16_activations(official):
    cfg = (DiffuserConfig.preset("official", D, COND, MAX_LEN, depth=2, num_heads=4, mlp_dim=64) if official
           else make_config())
    params = random_params(Diffuser(cfg))
    x_t, t, sc, img = make_inputs()
    ref = np_diffuser(params, cfg, x_t, t, sc, img)
    bf16 = jax.jit(Diffuser(cfg, dtype=jnp.bfloat16).apply)(params, x_t, t, sc, img)
    assert bf16.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(bf16)))
    # bf16 keeps 8 bits of mantissa: agree within 10% of the output scale, and correlate tightly.
    assert np.abs(np.asarray(bf16) - ref).max() < 0.1 * np.abs(ref).max()
    assert np.corrcoef(np.asarray(bf16).ravel(), ref.ravel())[0, 1] > 0.999
    shapes = param_shapes(Diffuser(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(shapes))


def test_real_init_gives_a_working_model():
    """`init` itself (jitted once): the tree matches the traced shapes, outputs are finite and depend on x_t."""
    model = Diffuser(make_config())
    x_t, t, sc, img = make_inputs()
    params = jax.jit(model.init)(jax.random.key(0), x_t, t, sc, img)
    assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(lambda s: s.shape, param_shapes(model))
    out = np.asarray(model.apply(params, x_t, t, sc, img))
    assert out.shape == (B, L, D) and np.all(np.isfinite(out)) and out.std() > 1e-3


def test_jit_and_scan_with_cached_condition():
    model = Diffuser(make_config())
    params = random_params(model)
    x_t, t, sc, img = make_inputs()
    jitted = jax.jit(model.apply)(params, x_t, t, sc, img)
    np.testing.assert_allclose(np.asarray(jitted), np_diffuser(params, model.config, x_t, t, sc, img), atol=1e-4)

    @jax.jit
    def loop(params, x, img):
        cond = model.apply(params, img, None, method=Diffuser.condition)

        def body(carry, step):
            x, x0 = carry
            x0 = model.apply(params, x, jnp.full((x.shape[0],), step), x0, cond, method=Diffuser.denoise)
            return (x, x0), None

        (_, x0), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), jnp.array([999, 500, 0]))
        return x0

    out = loop(params, x_t, img)
    x0 = jnp.zeros_like(x_t)
    for step in (999, 500, 0):
        x0 = model.apply(params, x_t, jnp.full((B,), step), x0, img)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-5)


def _count(cfg):
    x = jnp.zeros((1, cfg.max_len, cfg.latent_dim))
    shapes = jax.eval_shape(
        lambda: Diffuser(cfg).init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), None, jnp.zeros((1, 4, cfg.cond_dim)))
    )
    return sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))


def test_parameter_counts():
    # base: 768 wide, 12 blocks, MLP 3072, latent 768, image tokens 768, 24 positions -> 116,002,560.
    w, m, d, c, nblocks, ln = 768, 3072, 768, 768, 12, 2 * 768
    attn = lambda kv_in: 2 * (w * w + w) + 2 * (kv_in * w + w)
    block = attn(w) + attn(c) + (w * m + m) + (m * w + w) + 3 * ln
    time_mlp = (256 * w + w) + (w * w + w)
    expected = nblocks * block + (2 * d * w + w) + 24 * w + time_mlp + 2 * ln + (w * d + d) + c
    assert expected == 116_002_560
    assert _count(DiffuserConfig.preset("base", latent_dim=768, cond_dim=768, max_len=24)) == expected
    # official: the release's diffuser tensors (ladic_official.md: hidden 1536, 12 layers, FFN 3072, cross k/v
    # from 768, 512 positions, embeddings LayerNorm, time LayerNorm; word embeddings unused) + our null condition.
    W, M, V = 1536, 3072, 768
    layer = 4 * (W * W + W) + 2 * (W * W + W) + 2 * (V * W + W) + (W * M + M) + (M * W + W) + 3 * 2 * W
    release = 12 * layer + 512 * W + 2 * W + 2 * W
    assert release == 312_532_992
    assert _count(DiffuserConfig.preset("official", latent_dim=768, cond_dim=768, max_len=512)) == release + 768


def test_parameter_names_and_kernel_layout():
    cfg = make_config(cond_dim=COND)
    shapes = jax.tree_util.tree_map(lambda s: s.shape, param_shapes(Diffuser(cfg)))["params"]
    assert shapes["block_0"]["self_attn"]["query"]["kernel"] == (WIDTH, WIDTH)
    assert shapes["block_1"]["cross_attn"]["key"]["kernel"] == (COND, WIDTH)
    assert shapes["block_1"]["cross_attn"]["value"]["kernel"] == (COND, WIDTH)
    assert shapes["block_0"]["mlp"]["fc1"]["kernel"] == (WIDTH, 64)
    assert shapes["block_0"]["mlp_norm"]["scale"] == (WIDTH,)
    assert shapes["position_embeddings"] == (MAX_LEN, WIDTH)
    assert shapes["null_condition"] == (COND,)
    assert set(shapes) == {"input_proj", "position_embeddings", "time_mlp_in", "time_mlp_out", "embed_norm",
                           "block_0", "block_1", "final_norm", "output_proj", "null_condition"}
    official = param_shapes(
        Diffuser(DiffuserConfig.preset("official", D, COND, MAX_LEN, depth=1, num_heads=4, mlp_dim=64))
    )["params"]
    assert set(official) == {"position_embeddings", "time_norm", "embed_norm", "block_0", "null_condition"}


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="width == 2 \\* latent_dim"):
        make_config(input_mode="concat", width=48, num_heads=4)
    with pytest.raises(ValueError, match="block_norm"):
        make_config(block_norm="sandwich")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        make_config(num_heads=5)
    with pytest.raises(ValueError, match="output_mode='slice' needs width >= latent_dim"):
        make_config(output_mode="slice", latent_dim=64)
    with pytest.raises(ValueError, match="DiffuserConfig.depth"):
        make_config(depth=0)
    with pytest.raises(ValueError, match="unknown diffuser preset 'huge'"):
        DiffuserConfig.preset("huge", D, COND, MAX_LEN)
    model = Diffuser(make_config())
    params = random_params(model)
    x_t, t, sc, img = make_inputs()
    with pytest.raises(ValueError, match="x_t must have shape"):
        model.apply(params, x_t[..., :8], t, None, img)
    with pytest.raises(ValueError, match="max_len"):
        model.apply(params, jnp.zeros((B, MAX_LEN + 1, D)), t, None, img)
    with pytest.raises(ValueError, match="image_tokens must have shape"):
        model.apply(params, x_t, t, sc, img[..., :8])
    with pytest.raises(ValueError, match="null_mask must be a bool array"):
        model.apply(params, x_t, t, sc, img, jnp.array([1, 0, 1]))
    with pytest.raises(ValueError, match="t must be integer timesteps"):
        model.apply(params, x_t, t.astype(jnp.float32), sc, img)
    with pytest.raises(ValueError, match="self_cond shape"):
        model.apply(params, x_t, t, sc[:, :3], img)


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_position_init_std_sets_the_initial_spread(std):
    """The position embeddings start as N(0, std²): the sample std of the 64x128 table is within 3%."""
    cfg = DiffuserConfig(latent_dim=D, width=128, depth=1, num_heads=4, mlp_dim=64, max_len=64, cond_dim=COND,
                         position_init_std=std)
    model = Diffuser(cfg)
    x_t, t, sc, img = make_inputs()
    table = np.asarray(jax.jit(model.init)(jax.random.key(0), x_t, t, sc, img)["params"]["position_embeddings"])
    assert table.shape == (64, 128)
    assert abs(table.std() / std - 1.0) < 0.03, table.std()
    assert abs(table.mean()) < 0.05 * std
