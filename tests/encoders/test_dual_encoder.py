"""CLIP with a BERT text tower = HF `VisionTextDualEncoderModel` (CLIP vision + BERT text): our export loads in
PyTorch with the same features and logits, a PyTorch-saved one loads into ours with the same numbers, round trips are
bit-exact, loading and export are strict, "clip_vision" picks the vision tower, and MiniLM (with its pooler) fills the
text tower."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import traverse_util

import export_checks

from ladic_jax.encoders.bert import BertConfig
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


@pytest.fixture(scope="module")
def texts(tokenizer):
    batch = tokenizer(CAPTIONS, padding=True, return_tensors="np")
    assert (batch["attention_mask"] == 0).any()
    return batch["input_ids"], batch["attention_mask"]


def _config(vocab_size: int) -> CLIPConfig:
    """Tiny CLIP vision tower (32 wide) and a tiny BERT (24 wide, so that the towers differ), projection 16."""
    return dataclasses.replace(CLIPConfig.tiny(), text=BertConfig.tiny(vocab_size=vocab_size, hidden_size=24))


def _shapes(config: CLIPConfig) -> dict:
    size = config.vision.image_size
    return jax.eval_shape(CLIP(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32),
                          jnp.zeros((1, size, size, 3)))["params"]


def _params(config: CLIPConfig, seed: int = 0) -> dict:
    """Random values of `CLIP(config)`'s shapes, none at an init value: matrices ~ N(0, 0.2^2), scales ~ 1, else ~ 0."""
    rng = np.random.default_rng(seed)
    center = {"scale": 1.0, "logit_scale": config.logit_scale_init}
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(center.get(path[-1].key, 0.0) + (0.2 if len(leaf.shape) > 1 else 0.05)
                                       * rng.standard_normal(leaf.shape), jnp.float32), _shapes(config))





def _ours(config, params, ids, mask, pixels):
    """(image features, text features, logits_per_image) of our CLIP, jitted."""
    module = CLIP(config)
    run = jax.jit(lambda p, ids, mask, pixels: (
        module.apply({"params": p}, pixels, method="get_image_features"),
        module.apply({"params": p}, ids, mask, method="get_text_features"),
        module.apply({"params": p}, ids, pixels, mask)))
    return run(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels.transpose(0, 2, 3, 1)))


def _theirs(model, ids, mask, pixels):
    with torch.no_grad():
        t_ids, t_mask, t_pixels = torch.tensor(ids), torch.tensor(mask), torch.tensor(pixels)
        return (model.get_image_features(pixel_values=t_pixels).pooler_output.numpy(),
                model.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output.numpy(),
                model(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pixels).logits_per_image.numpy())


def _check(parity, name, ours, theirs) -> None:
    for quantity, a, b in zip(("get_image_features", "get_text_features", "logits_per_image"), ours, theirs):
        parity(name, quantity, a, b, F32_BOUND)


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    config = _config(len(tokenizer))
    params = _params(config)
    directory = export_clip(params, config, tmp_path_factory.mktemp("dual"), tokenizer=tokenizer,
                            image_mean=MEAN, image_std=STD)
    return directory, config, params


@pytest.fixture(scope="module")
def hf_saved(tokenizer, tmp_path_factory):
    """A tiny PyTorch VisionTextDualEncoderModel, every parameter perturbed, saved by transformers."""
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    text = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)
    hf_config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    model = transformers.VisionTextDualEncoderModel(hf_config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    directory = tmp_path_factory.mktemp("hf_dual")
    model.save_pretrained(directory)
    return directory, model


def test_pytorch_loads_the_export_and_matches(exported, texts, parity):
    directory, config, params = exported
    hf = json.loads((directory / "config.json").read_text())
    assert (hf["architectures"], hf["model_type"]) == (["VisionTextDualEncoderModel"], "vision-text-dual-encoder")
    model = transformers.VisionTextDualEncoderModel.from_pretrained(str(directory)).eval()
    assert type(model.text_model).__name__ == "BertModel" and type(model.vision_model).__name__ == "CLIPVisionModel"
    hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in read_safetensors(directory / "model.safetensors").items()} == hf_shapes
    ids, mask = texts
    _check(parity, "exported dual encoder tiny (BERT text)", _ours(config, params, ids, mask, export_checks.pixels()),
           _theirs(model, ids, mask, export_checks.pixels()))


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")  # MiniLM's tokenizer config sets one
def test_export_writes_tokenizer_and_processor(exported, tokenizer):
    directory, _, _ = exported
    processor = transformers.VisionTextDualEncoderProcessor.from_pretrained(str(directory))
    batch = processor(text=CAPTIONS, images=[np.full((48, 64, 3), 200, np.uint8)], padding=True, return_tensors="np")
    assert batch["input_ids"].tolist() == tokenizer(CAPTIONS, padding=True)["input_ids"]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert load_pretrained(directory).tokenizer is not None


@pytest.mark.parametrize("names", ["transformers5", "transformers4"])
def test_hf_saved_dual_encoder_loads_and_matches(names, hf_saved, texts, tmp_path, parity):
    directory, model = hf_saved
    if names == "transformers4":  # transformers 4 saved the CLIP vision tower under `vision_model.vision_model.`
        tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
        renamed = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in tensors.items()}
        (tmp_path / "config.json").write_text((directory / "config.json").read_text())
        safetensors.numpy.save_file(renamed, str(tmp_path / "model.safetensors"))
        directory = tmp_path
    pre = load_pretrained(directory)  # auto: vision-text-dual-encoder -> "clip"
    assert pre.kind == "clip" and pre.config.bert_text and pre.config.text.hidden_size == 24
    ids, mask = texts
    _check(parity, f"HF-saved dual encoder tiny ({names} names)", _ours(pre.config, pre.params, ids, mask, export_checks.pixels()),
           _theirs(model, ids, mask, export_checks.pixels()))
    if names == "transformers4":
        export_checks.assert_identical(pre.params, load_pretrained(hf_saved[0]).params)


def test_round_trips_are_bit_exact(exported, hf_saved, tmp_path):
    directory, config, params = exported
    pre = load_pretrained(directory, "clip")
    assert pre.config == config
    export_checks.assert_identical(pre.params, params)
    hf_dir, _ = hf_saved  # HF file -> ours -> export: the same tensors under the same names
    loaded = load_pretrained(hf_dir)
    again = read_safetensors(export_clip(loaded.params, loaded.config, tmp_path / "again") / "model.safetensors")
    original = read_safetensors(hf_dir / "model.safetensors")
    assert sorted(again) == sorted(original)
    assert all(np.array_equal(again[n], original[n]) for n in original)


def test_clip_vision_picks_the_vision_tower(exported, hf_saved):
    directory, config, params = exported
    vision = load_pretrained(directory, "clip_vision")
    assert vision.config == config.vision and vision.notes.subtree == "vision_model."
    export_checks.assert_identical(vision.params, params["vision_model"])
    hf_vision = load_pretrained(hf_saved[0], "clip_vision")
    export_checks.assert_identical(hf_vision.params, load_pretrained(hf_saved[0]).params["vision_model"])


def test_loading_names_the_missing_or_misshaped_tensor(exported, tmp_path):
    directory, _, _ = exported
    tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    victim = "text_model.pooler.dense.bias"
    original = tensors.pop(victim)
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors[^$]*text_model[.]pooler[.]dense[.]bias ->"):
        load_pretrained(tmp_path)
    tensors[victim] = np.zeros(original.shape[0] + 1, np.float32)
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"text_model[.]pooler[.]dense[.]bias: checkpoint shape \(25,\)"):
        load_pretrained(tmp_path)


def test_export_names_missing_and_extra_leaves(exported, tmp_path):
    _, config, params = exported
    missing = jax.tree_util.tree_map(lambda x: x, params)
    del missing["text_model"]["pooler"]
    with_head = {**params, "text_model": {**params["text_model"], "mlm_head": {"decoder": {"bias": jnp.zeros(3)}}}}
    for bad, expected in ((missing, "text_model/pooler/kernel (24, 24)"), (with_head, "text_model/mlm_head/decoder/bias")):
        with pytest.raises(CheckpointMismatchError, match="VisionTextDualEncoderModel") as info:
            export_clip(bad, config, tmp_path / "out")
        assert expected in str(info.value)
    assert not (tmp_path / "out").exists()


def test_configs_round_trip_and_reject_other_towers(hf_saved):
    hf = transformers.VisionTextDualEncoderConfig.from_pretrained(str(hf_saved[0]))
    config = CLIPConfig.from_hf(hf)
    assert config == CLIPConfig.from_hf(hf.to_dict()) and config.text == BertConfig.from_hf(hf.text_config)
    vit = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(transformers.ViTConfig(), hf.text_config)
    with pytest.raises(ValueError, match="text/vision model_types are \\('bert', 'vit'\\)"):
        CLIPConfig.from_hf(vit)
    with pytest.raises(ValueError, match="model_type 'bert'"):
        dataclasses.replace(config, text=BertConfig.distilbert_base())


def test_minilm_fills_the_text_tower_with_its_pooler(texts, parity):
    """The API: a CLIP whose text tower is MiniLM, its params from `load_pretrained(minilm, "bert", pooler=True)`."""
    minilm = load_pretrained(minilm_dir(), "bert", pooler=True)
    assert [n.split(" ")[0] for n in minilm.notes.initialised] == ["mlm"]  # the pooler is MiniLM's own
    assert not any(n.startswith("pooler.") for n in minilm.notes.ignored)
    plain = load_pretrained(minilm_dir(), "bert")  # not asked for: ignored, as before
    assert "pooler" not in plain.params and any(n.startswith("pooler.dense.weight") for n in plain.notes.ignored)

    config = dataclasses.replace(CLIPConfig.tiny(), text=minilm.config)
    params = _params(config)
    text_tower = {k: v for k, v in minilm.params.items() if k != "mlm_head"}
    assert jax.tree_util.tree_structure(text_tower) == jax.tree_util.tree_structure(params["text_model"])
    params = {**params, "text_model": text_tower}
    ids, mask = texts
    ours = CLIP(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), method="get_text_features")
    reference = transformers.BertModel.from_pretrained(str(minilm_dir())).eval()
    with torch.no_grad():
        pooled = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output.numpy()
    expected = pooled @ np.asarray(params["text_projection"]["kernel"])
    parity("MiniLM-L6 text tower in CLIP", "get_text_features", ours, expected, F32_BOUND)


def test_pooler_initialised_when_the_checkpoint_has_none(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertConfig(vocab_size=99, hidden_size=24, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=37, max_position_embeddings=64)
    transformers.BertForMaskedLM(hf).save_pretrained(tmp_path)  # has no pooler
    pre = load_pretrained(tmp_path, "bert", pooler=True)
    assert [n.split(" ")[0] for n in pre.notes.initialised] == ["pooler"]
    np.testing.assert_array_equal(pre.params["pooler"]["kernel"], np.eye(24))
    with pytest.raises(ValueError, match="pooler=True applies to kinds"):
        load_pretrained(tmp_path, "clip_vision", pooler=True)
