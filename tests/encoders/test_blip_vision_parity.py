"""Flax ViT (BLIP variant) vs HF PyTorch `BlipVisionModel` on tiny random checkpoints.

Covers: two image sizes (different position-table lengths, as 224 vs 384 px), the vision tower picked out of a
`BlipForConditionalGeneration` checkpoint, the same weights under timm names (the layout of the released LaDiC
checkpoint's `visual_encoder.`), bf16, and the full-size BLIP ViT-B/16 shapes at 224 and 384 px.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

from ladic_jax.encoders.loading import load_pretrained
from ladic_jax.encoders.vit import ViT, ViTConfig

F32_BOUND = 1e-4
# bf16 activations (float32 params) vs the float32 HF model, relative to the largest reference value: bf16 keeps
# 8 significant bits (one rounding = 2^-9 relative), compounding over the layers. Measured worst ~1.4e-2.
BF16_RELATIVE_BOUND = 3e-2
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=8)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _pixels(size: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(size).standard_normal((batch, 3, size, size)).astype(np.float32)


def _run_hf(model, pixels: np.ndarray):
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _compare(parity, name, pre, pixels, reference, bound=F32_BOUND, relative=False):
    states, last, pooled = reference
    ours_last, ours_pooled, ours_states = pre.module.apply(
        {"params": pre.params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), return_all=True)
    for i, (ours, theirs) in enumerate(zip(ours_states, states)):
        parity(name, f"hidden_states[{i}]", ours, theirs, bound, relative=relative)
    parity(name, "last_hidden_state", ours_last, last, bound, relative=relative)
    parity(name, "pooler_output", ours_pooled, pooled, bound, relative=relative)


@pytest.fixture(scope="module", params=[32, 48], ids=["32px", "48px"])
def blip_vision(request, tmp_path_factory):
    size = request.param
    torch.manual_seed(size)
    model = transformers.BlipVisionModel(transformers.BlipVisionConfig(image_size=size, **VISION)).eval()
    _perturb(model, size + 1)
    directory = tmp_path_factory.mktemp(f"blip_vision_{size}")
    model.save_pretrained(directory)
    pixels = _pixels(size)
    return directory, model, pixels, _run_hf(model, pixels)


def test_blip_vision_matches_hf(blip_vision, parity):
    directory, model, pixels, reference = blip_vision
    pre = load_pretrained(directory)  # config.json model_type blip_vision_model -> kind blip_vision
    config = pre.config
    assert pre.kind == "blip_vision" and not config.pre_norm and config.patch_bias and config.norm_all_tokens
    assert pre.params["embeddings"]["position_embedding"].shape == (config.num_tokens, 32)
    _compare(parity, f"BlipVisionModel tiny {config.image_size}px", pre, pixels, reference)


def test_blip_vision_bf16(blip_vision, parity):
    directory, _, pixels, reference = blip_vision
    pre = load_pretrained(directory, "blip_vision", dtype=jnp.bfloat16)
    _compare(parity, f"BlipVisionModel tiny bf16 {pre.config.image_size}px", pre, pixels, reference, BF16_RELATIVE_BOUND,
             relative=True)


def _timm_name(hf_name: str) -> str:
    """HF BlipVisionModel name -> timm VisionTransformer name (written here independently of the loader's table)."""
    name = hf_name
    for old, new in [
        ("embeddings.class_embedding", "cls_token"),
        ("embeddings.position_embedding", "pos_embed"),
        ("embeddings.patch_embedding", "patch_embed.proj"),
        ("encoder.layers.", "blocks."),
        ("layer_norm1", "norm1"),
        ("layer_norm2", "norm2"),
        ("self_attn.qkv", "attn.qkv"),
        ("self_attn.projection", "attn.proj"),
        ("post_layernorm", "norm"),
    ]:
        name = name.replace(old, new)
    return name


def test_blip_vision_from_timm_names_under_a_prefix(blip_vision, tmp_path, parity):
    """A .bin with timm names under `visual_encoder.` and no config.json (the released LaDiC layout)."""
    _, model, pixels, reference = blip_vision
    state = {"visual_encoder." + _timm_name(k): v.clone() for k, v in model.state_dict().items()}
    state["diffuser.unrelated.weight"] = torch.zeros(3)  # outside the subtree: not read, not an error
    torch.save(state, tmp_path / "pytorch_model.bin")
    config = ViTConfig.from_hf(model.config)
    pre = load_pretrained(tmp_path, "blip_vision", subtree="visual_encoder.", config=config)
    assert pre.notes.outside_subtree == 1
    _compare(parity, f"BLIP vision timm names {config.image_size}px", pre, pixels, reference)


def test_blip_vision_picked_from_blip_for_conditional_generation(tmp_path, parity):
    torch.manual_seed(7)
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                encoder_hidden_size=32, max_position_embeddings=32, bos_token_id=97, sep_token_id=98,
                pad_token_id=0)
    config = transformers.BlipConfig(vision_config=dict(image_size=32, **VISION), text_config=text,
                                     projection_dim=16)
    model = transformers.BlipForConditionalGeneration(config).eval()
    _perturb(model, 8)
    model.save_pretrained(tmp_path)
    pixels = _pixels(32, batch=3)
    reference = _run_hf(model.vision_model, pixels)
    for kind in ("auto", "blip_vision"):
        pre = load_pretrained(tmp_path, kind)
        assert pre.kind == "blip_vision" and pre.notes.subtree == "vision_model."
        assert pre.notes.outside_subtree > 0  # the text decoder
        _compare(parity, "BLIP vision from BlipForConditionalGeneration", pre, pixels, reference)


@pytest.mark.parametrize("size,tokens", [(224, 197), (384, 577)])
def test_full_size_blip_vit_b16_shapes(size, tokens):
    assert ViTConfig.from_hf(transformers.BlipVisionConfig(image_size=size)) == ViTConfig.blip_b16(size)
    module = ViT(ViTConfig.blip_b16(size))
    pixels = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels)
    assert params["params"]["embeddings"]["position_embedding"].shape == (tokens, 768)
    last, pooled = jax.eval_shape(module.apply, params, pixels)
    assert last.shape == (2, tokens, 768) and pooled.shape == (2, 768)
    with torch.device("meta"):
        hf_model = transformers.BlipVisionModel(transformers.BlipVisionConfig(image_size=size))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    assert n_params == sum(p.numel() for p in hf_model.parameters())
