"""`export_clip`: a Flax CLIP written as an HF CLIP directory loads in PyTorch `CLIPModel` with the same outputs, and
back into Flax bit-exactly (also with the conv stem, which PyTorch cannot load); export and loading are strict."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import traverse_util

import export_checks

from ladic_jax.encoders.checkpoint_files import read_safetensors
from ladic_jax.encoders.checkpoint_names import CheckpointMismatchError
from ladic_jax.encoders.clip import CLIP, CLIPConfig
from ladic_jax.encoders.export import export_clip
from ladic_jax.encoders.loading import load_pretrained
from ladic_jax.pretrained_paths import minilm_dir

F32_BOUND = 1e-4
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
CAPTIONS = ["a red circle", "a large blue square to the left of a small green triangle above it", "two shapes"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))


def _config(vocab_size: int = 99, eos_token_id: int = 98, stem: str = "patch") -> CLIPConfig:
    tiny = CLIPConfig.tiny()
    return dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, vocab_size=vocab_size, eos_token_id=eos_token_id),
                               vision=dataclasses.replace(tiny.vision, stem=stem))


def _params(config: CLIPConfig, seed: int = 0) -> dict:
    """Random values of the shapes of `CLIP(config)`'s parameters (no init: running it op by op takes ~20 s here):
    matrices ~ N(0, 0.2^2) (so that the outputs vary with the inputs), LayerNorm scales ~ 1, biases and vectors ~ 0,
    the logit scale ~ its init value; none exactly at an init value.
    """
    size = config.vision.image_size
    shapes = jax.eval_shape(CLIP(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32),
                            jnp.zeros((1, size, size, 3)))["params"]
    rng = np.random.default_rng(seed)
    center = {"scale": 1.0, "logit_scale": config.logit_scale_init}
    flat = {path: center.get(path[-1], 0.0) + (0.2 if len(leaf.shape) > 1 else 0.05) * rng.standard_normal(leaf.shape)
            for path, leaf in traverse_util.flatten_dict(shapes).items()}
    return traverse_util.unflatten_dict({path: jnp.asarray(value, jnp.float32) for path, value in flat.items()})


def _bert_config(tokenizer) -> CLIPConfig:
    return _config(vocab_size=len(tokenizer), eos_token_id=tokenizer.sep_token_id)





@pytest.fixture(scope="module")
def bert_export(tokenizer, tmp_path_factory):
    config = _bert_config(tokenizer)
    params = _params(config)
    directory = export_clip(params, config, tmp_path_factory.mktemp("clip_bert"), tokenizer=tokenizer,
                            image_mean=MEAN, image_std=STD)
    return directory, config, params


def _legacy_inputs():
    """eos_token_id = 2 (pre-#24773 configs): HF pools at the largest id, here 98 ending each text, then padding."""
    ids = np.array([[3, 10, 20, 98, 1, 1, 1], [3, 50, 60, 70, 80, 97, 98], [3, 98, 1, 1, 1, 1, 1]])
    return ids, (np.cumsum(ids == 98, axis=1) - (ids == 98) == 0).astype(np.int64)


@pytest.mark.parametrize("vocabulary", ["bert", "legacy_eos_2"])
def test_pytorch_clip_loads_the_export_and_matches(vocabulary, tokenizer, bert_export, tmp_path, parity):
    if vocabulary == "bert":
        directory, config, params = bert_export
        batch = tokenizer(CAPTIONS, padding=True, return_tensors="np")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        first_sep = (ids == tokenizer.sep_token_id).argmax(-1)
        assert (ids.argmax(-1) != first_sep).all()  # [SEP] is not the largest id: legacy pooling would differ
        assert (mask == 0).any()
    else:
        config = _config(eos_token_id=2)
        params = _params(config, seed=3)
        directory = export_clip(params, config, tmp_path)
        ids, mask = _legacy_inputs()
    model = transformers.CLIPModel.from_pretrained(str(directory)).eval()
    assert model.config.text_config.eos_token_id == config.text.eos_token_id
    hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert {k: v.shape for k, v in read_safetensors(directory / "model.safetensors").items()} == hf_shapes

    pixels = export_checks.pixels()
    with torch.no_grad():
        t_ids, t_mask, t_pixels = torch.tensor(ids), torch.tensor(mask), torch.tensor(pixels)
        ref_image = model.get_image_features(pixel_values=t_pixels).pooler_output.numpy()
        ref_text = model.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output.numpy()
        ref_logits = model(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pixels).logits_per_image.numpy()
    module = CLIP(config)
    features = jax.jit(lambda p, ids, mask, pixels: (  # jitted: running op by op is several times slower
        module.apply({"params": p}, pixels, method="get_image_features"),
        module.apply({"params": p}, ids, mask, method="get_text_features"),
        module.apply({"params": p}, ids, pixels, mask)))
    image, text, logits = features(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    name = f"exported CLIP tiny ({vocabulary})"
    parity(name, "get_image_features", image, ref_image, F32_BOUND)
    parity(name, "get_text_features", text, ref_text, F32_BOUND)
    parity(name, "logits_per_image", logits, ref_logits, F32_BOUND)


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_round_trip_is_bit_exact_for_clip_and_its_vision_tower(stem, tmp_path, caplog):
    config = _config(stem=stem)
    params = _params(config, seed=1)
    with caplog.at_level(logging.WARNING, logger="ladic_jax.encoders.export"):
        directory = export_clip(params, config, tmp_path / "out")
    assert directory == tmp_path / "out"
    assert ("transformers' CLIPModel cannot" in caplog.text) == (stem == "conv")
    pre = load_pretrained(directory)  # kind "clip" from config.json
    assert pre.kind == "clip" and pre.config == config
    export_checks.assert_identical(pre.params, params)
    vision = load_pretrained(directory, "clip_vision")
    assert vision.config == config.vision and vision.notes.outside_subtree > 0
    export_checks.assert_identical(vision.params, params["vision_model"])
    names = read_safetensors(directory / "model.safetensors")
    stem_names = sorted(n for n in names if ".stem." in n)
    if stem == "conv":
        assert json.loads((directory / "config.json").read_text())["vision_config"]["stem"] == "conv"
        assert stem_names[:4] == ["vision_model.embeddings.stem.0.conv.bias", "vision_model.embeddings.stem.0.conv.weight",
                                  "vision_model.embeddings.stem.0.norm.bias", "vision_model.embeddings.stem.0.norm.weight"]
        assert names["vision_model.embeddings.stem.0.conv.weight"].shape == (8, 3, 3, 3)  # (out, in, h, w)
        with pytest.raises(RuntimeError, match="mismatch"):  # HF's patch embedding cannot take the 1x1 projection
            transformers.CLIPModel.from_pretrained(str(directory))
    else:
        assert not stem_names and "stem" not in json.loads((directory / "config.json").read_text())["vision_config"]


def test_bf16_params_round_trip(tmp_path):
    config = _config()
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), _params(config, seed=2))
    directory = export_clip(params, config, tmp_path)
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    export_checks.assert_identical(load_pretrained(directory, "clip", param_dtype=jnp.bfloat16).params, params)


def _export_error(params, config, tmp_path) -> str:
    with pytest.raises(CheckpointMismatchError) as info:
        export_clip(params, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing is written on error
    return str(info.value)


def test_export_names_missing_extra_and_misshaped_leaves(tmp_path):
    config = _config()
    params = _params(config)
    missing = jax.tree_util.tree_map(lambda x: x, params)
    del missing["text_model"]["final_layer_norm"]["bias"]
    assert "text_model/final_layer_norm/bias (32,)" in _export_error(missing, config, tmp_path)
    message = _export_error({**params, "logit_bias": jnp.zeros(())}, config, tmp_path)  # a SigLIP bias: caller drops it
    assert "extra parameters" in message and "logit_bias ()" in message
    misshaped = {**params, "visual_projection": {"kernel": jnp.zeros((32, 8))}}
    assert "visual_projection/kernel: shape (32, 8), expected (32, 16)" in _export_error(misshaped, config, tmp_path)
    conv = _config(stem="conv")  # a patch-stem tree does not fit a conv-stem config
    message = _export_error(params, conv, tmp_path)
    assert "vision_model/embeddings/stem_0/kernel" in message and "vision_model/embeddings/patch_embedding/kernel" in message


def test_export_rejects_non_clip_vision_and_inconsistent_inputs(tokenizer, tmp_path):
    config = _config()
    params = _params(config)
    blip_like = dataclasses.replace(config, vision=dataclasses.replace(config.vision, norm_all_tokens=True))
    with pytest.raises(ValueError, match="norm_all_tokens"):
        export_clip(params, blip_like, tmp_path / "a")
    with pytest.raises(ValueError, match="pools at eos_token_id=98, but the tokenizer ends a text with id 102"):
        export_clip(params, config, tmp_path / "b", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="both image_mean and image_std"):
        export_clip(params, config, tmp_path / "c", image_mean=MEAN)
    with pytest.raises(ValueError, match="image_std has 2 values"):
        export_clip(params, config, tmp_path / "d", image_mean=MEAN, image_std=STD[:2])
    assert not any((tmp_path / d).exists() for d in "abcd")


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_loading_an_edited_export_names_the_bad_tensor(stem, tmp_path):
    config = _config(stem=stem)
    directory = export_clip(_params(config), config, tmp_path / "out")
    victim = "vision_model.embeddings.stem.1.norm.weight" if stem == "conv" else "text_model.final_layer_norm.bias"
    tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    original = tensors.pop(victim)
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=f"missing tensors[^$]*{victim.replace('.', '[.]')} ->"):
        load_pretrained(directory, "clip")
    tensors[victim] = np.zeros(original.shape[0] + 1, np.float32)
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=f"{victim.replace('.', '[.]')}: checkpoint shape"):
        load_pretrained(directory, "clip")


def test_tokenizer_and_preprocessor_files_load_back(bert_export, tokenizer):
    directory, _, _ = bert_export
    reloaded = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert reloaded(CAPTIONS)["input_ids"] == tokenizer(CAPTIONS)["input_ids"]
    hf_text = json.loads((directory / "config.json").read_text())["text_config"]
    assert (hf_text["bos_token_id"], hf_text["eos_token_id"], hf_text["pad_token_id"]) == (101, 102, 0)
    assert load_pretrained(directory, "clip").tokenizer is not None
    processor = transformers.CLIPImageProcessor.from_pretrained(str(directory))
    assert tuple(processor.image_mean) == MEAN and tuple(processor.image_std) == STD
    image = np.full((48, 64, 3), 200, np.uint8)  # resized on its short side and centre-cropped to 32 x 32
    pixels = processor(images=image, return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    expected = (200 / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(pixels[0].mean(axis=(1, 2)), expected, atol=1e-4)
