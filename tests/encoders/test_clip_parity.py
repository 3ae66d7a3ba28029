"""Flax CLIP vs HF PyTorch `CLIPModel` / `CLIPVisionModel` on tiny random checkpoints.

Compared: every hidden state of both towers, pooled outputs, projected features (`get_*_features`), the normalised
`image_embeds` / `text_embeds` and `logits_per_image`; the vision tower picked out of a full CLIP checkpoint; the
legacy (eos_token_id = 2) argmax pooling; bf16 activations.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

from ladic_jax.encoders.clip import CLIP, CLIPConfig
from ladic_jax.encoders.loading import load_pretrained
from ladic_jax.encoders.vit import ViTConfig

F32_BOUND = 1e-4
# bf16 activations (float32 params) vs the float32 HF model, relative to the largest reference value: bf16 keeps
# 8 significant bits (one rounding = 2^-9 relative), compounding over the layers. Measured worst ~1.4e-2.
BF16_RELATIVE_BOUND = 3e-2
# EOS is deliberately not the largest id (BOS is), so pooling at the first EOS differs from the legacy argmax rule.
EOS, BOS, PAD = 60, 97, 1


def _perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _text_config(eos_token_id: int = EOS) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, eos_token_id=eos_token_id, bos_token_id=BOS, pad_token_id=PAD,
    )


def _vision_config() -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=8)


def _text_inputs():
    """Three captions of different lengths: BOS, tokens, EOS, then padding (PAD, or EOS as openai's tokenizer pads)."""
    rng = np.random.default_rng(0)
    length = 12
    ids = np.full((3, length), PAD, np.int64)
    mask = np.zeros((3, length), np.int64)
    for row, (n, pad) in enumerate([(10, PAD), (5, EOS), (7, PAD)]):
        ids[row, 0] = BOS
        ids[row, 1:n + 1] = rng.integers(2, EOS, size=n)
        ids[row, n + 1] = EOS
        ids[row, n + 2:] = pad
        mask[row, :n + 2] = 1
    return ids, mask


def _pixels(batch: int = 2, size: int = 32) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(np.float32)


def _nhwc(pixels_nchw: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=_text_config().to_dict(), vision_config=_vision_config().to_dict(),
                                     projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    _perturb(model, 1)
    directory = tmp_path_factory.mktemp("clip")
    model.save_pretrained(directory)
    ids, mask = _text_inputs()
    pixels = _pixels()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels))
        image_features = model.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output
        text_features = model.get_text_features(input_ids=torch.tensor(ids),
                                                attention_mask=torch.tensor(mask)).pooler_output
        # The towers on their own: CLIPModel's outputs carry the *projected* features in `pooler_output`.
        t = model.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
        v = model.vision_model(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    reference = dict(
        logits_per_image=out.logits_per_image.numpy(), image_embeds=out.image_embeds.numpy(),
        text_embeds=out.text_embeds.numpy(), image_features=image_features.numpy(),
        text_features=text_features.numpy(),
        text_states=[h.numpy() for h in t.hidden_states], text_last=t.last_hidden_state.numpy(),
        text_pooled=t.pooler_output.numpy(),
        vision_states=[h.numpy() for h in v.hidden_states], vision_last=v.last_hidden_state.numpy(),
        vision_pooled=v.pooler_output.numpy(),
    )
    return directory, (ids, mask, pixels), reference


def test_clip_towers_features_and_logits_match_hf(clip_checkpoint, parity):
    directory, (ids, mask, pixels), ref = clip_checkpoint
    pre = load_pretrained(directory)  # kind inferred from config.json: "clip"
    assert pre.kind == "clip" and isinstance(pre.module, CLIP)
    assert pre.config.text.eos_token_id == EOS
    variables = {"params": pre.params}
    model = "CLIP tiny"

    def text_tower(module, ids, mask):
        return module.text_model(ids, mask, return_all=True)

    last, pooled, states = pre.module.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method=text_tower)
    for i, (ours, theirs) in enumerate(zip(states, ref["text_states"])):
        parity(model, f"text hidden_states[{i}]", ours, theirs, F32_BOUND, mask)
    parity(model, "text last_hidden_state", last, ref["text_last"], F32_BOUND, mask)
    parity(model, "text pooler_output (EOS)", pooled, ref["text_pooled"], F32_BOUND)

    def vision_tower(module, pixels):
        return module.vision_model(pixels, return_all=True)

    last, pooled, states = pre.module.apply(variables, _nhwc(pixels), method=vision_tower)
    for i, (ours, theirs) in enumerate(zip(states, ref["vision_states"])):
        parity(model, f"vision hidden_states[{i}]", ours, theirs, F32_BOUND)
    parity(model, "vision last_hidden_state", last, ref["vision_last"], F32_BOUND)
    parity(model, "vision pooler_output", pooled, ref["vision_pooled"], F32_BOUND)

    image_features = pre.module.apply(variables, _nhwc(pixels), method="get_image_features")
    text_features = pre.module.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method="get_text_features")
    parity(model, "get_image_features", image_features, ref["image_features"], F32_BOUND)
    parity(model, "get_text_features", text_features, ref["text_features"], F32_BOUND)
    normalise = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
    parity(model, "image_embeds (normalised)", normalise(image_features), ref["image_embeds"], F32_BOUND)
    parity(model, "text_embeds (normalised)", normalise(text_features), ref["text_embeds"], F32_BOUND)
    logits = pre.module.apply(variables, jnp.asarray(ids), _nhwc(pixels), jnp.asarray(mask))
    assert logits.shape == (2, 3)
    parity(model, "logits_per_image", logits, ref["logits_per_image"], F32_BOUND)


def test_clip_bf16(clip_checkpoint, parity):
    directory, (ids, mask, pixels), ref = clip_checkpoint
    pre = load_pretrained(directory, "clip", dtype=jnp.bfloat16)
    variables = {"params": pre.params}
    image_features = pre.module.apply(variables, _nhwc(pixels), method="get_image_features")
    assert image_features.dtype == jnp.bfloat16
    text_features = pre.module.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method="get_text_features")
    parity("CLIP tiny bf16", "get_image_features", image_features, ref["image_features"], BF16_RELATIVE_BOUND, relative=True)
    parity("CLIP tiny bf16", "get_text_features", text_features, ref["text_features"], BF16_RELATIVE_BOUND, relative=True)
    logits = pre.module.apply(variables, jnp.asarray(ids), _nhwc(pixels), jnp.asarray(mask))
    parity("CLIP tiny bf16", "logits_per_image", logits, ref["logits_per_image"], BF16_RELATIVE_BOUND, relative=True)


@pytest.mark.parametrize("subtree", [None, "vision_model.", "vision_model"])
def test_vision_tower_picked_from_full_clip(clip_checkpoint, subtree, parity):
    directory, (_, _, pixels), ref = clip_checkpoint
    pre = load_pretrained(directory, "clip_vision", subtree=subtree)
    assert pre.notes.subtree == "vision_model."
    assert pre.notes.outside_subtree > 0  # the text tower, projections and logit scale are not read
    last, pooled = pre.module.apply({"params": pre.params}, _nhwc(pixels))
    parity("CLIP vision from CLIPModel", "last_hidden_state", last, ref["vision_last"], F32_BOUND)
    parity("CLIP vision from CLIPModel", "pooler_output", pooled, ref["vision_pooled"], F32_BOUND)


def test_clip_vision_model_checkpoint(tmp_path, parity):
    torch.manual_seed(2)
    model = transformers.CLIPVisionModel(_vision_config()).eval()
    _perturb(model, 3)
    model.save_pretrained(tmp_path)
    pixels = _pixels(3)
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    pre = load_pretrained(tmp_path)
    assert pre.kind == "clip_vision" and pre.config.pre_norm and not pre.config.patch_bias
    last, pooled, states = pre.module.apply({"params": pre.params}, _nhwc(pixels), return_all=True)
    for i, (ours, theirs) in enumerate(zip(states, out.hidden_states)):
        parity("CLIPVisionModel tiny", f"hidden_states[{i}]", ours, theirs.numpy(), F32_BOUND)
    parity("CLIPVisionModel tiny", "last_hidden_state", last, out.last_hidden_state.numpy(), F32_BOUND)
    parity("CLIPVisionModel tiny", "pooler_output", pooled, out.pooler_output.numpy(), F32_BOUND)


def test_legacy_eos_id_pools_at_largest_token_id(tmp_path, parity):
    """Configs with eos_token_id == 2 pool at argmax(input_ids), as transformers keeps for old checkpoints."""
    torch.manual_seed(4)
    config = transformers.CLIPConfig(text_config=_text_config(eos_token_id=2).to_dict(),
                                     vision_config=_vision_config().to_dict(), projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    _perturb(model, 5)
    model.save_pretrained(tmp_path)
    ids, mask = _text_inputs()
    ids[ids == BOS] = 3  # as in old CLIP vocabularies, the end-of-text token (here 98) is the largest id
    ids[ids == EOS] = 98
    ids[ids == 2] = 4
    assert not (ids == 2).any()  # so pooling at "the first id 2" would pick position 0 instead
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output
    pre = load_pretrained(tmp_path, "clip")
    assert pre.config.text.eos_token_id == 2
    ours = pre.module.apply({"params": pre.params}, jnp.asarray(ids), jnp.asarray(mask), method="get_text_features")
    parity("CLIP tiny legacy eos=2", "get_text_features", ours, ref.numpy(), F32_BOUND)


def test_clip_config_from_hf_defaults_and_shapes():
    hf = transformers.CLIPConfig()
    config = CLIPConfig.from_hf(hf)
    assert config.vision == ViTConfig.clip_b32() and config.text.eos_token_id == hf.text_config.eos_token_id
    assert config == CLIPConfig()
    module = CLIP(config)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32),
                            jnp.zeros((1, 224, 224, 3)))["params"]
    assert shapes["vision_model"]["embeddings"]["position_embedding"].shape == (50, 768)
    assert shapes["text_projection"]["kernel"].shape == (512, 512)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    with torch.device("meta"):  # parameter count without allocating the 151M weights
        hf_model = transformers.CLIPModel(transformers.CLIPConfig())
    assert n_params == sum(p.numel() for p in hf_model.parameters())


def test_vit_rejects_nchw_or_wrong_size():
    config = ViTConfig.tiny("clip")
    from ladic_jax.encoders.vit import ViT

    with pytest.raises(ValueError, match="NHWC"):
        ViT(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="NHWC"):
        ViT(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)))
