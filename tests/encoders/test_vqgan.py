"""Flax VQGAN encoder vs diffusers' PyTorch `VQModel` on tiny random checkpoints saved with `save_pretrained`.

Compared: the pre-quantisation latents (`VQModel.encode(x).latents`, after quant_conv) and the code indices (the
argmin over the codebook, both as diffusers' `VectorQuantizer` returns it and recomputed in float64); the old
attention names; the loader's errors for a missing directory / file / tensor, a mis-shaped tensor and unsupported
configs.
"""

from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ladic_jax.encoders.checkpoint_files import read_safetensors, write_safetensors  # noqa: E402
from ladic_jax.encoders.checkpoint_names import CheckpointMismatchError  # noqa: E402
from ladic_jax.encoders.vqgan import WEIGHTS_FILE, VQGANConfig, VQGANEncoder, load_vqgan  # noqa: E402

F32_BOUND = 1e-4
# A code may legitimately differ from the reference only where the two nearest codebook entries are this close
# (squared distances, relative to the distance): float32 rounding of z can then flip the argmin.
NEAR_TIE = 1e-4

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=8,
            num_vq_embeddings=32, vq_embed_dim=8, sample_size=32)
# Three blocks (two downsamplings), two resnets per block, a width change inside a block, attention in the last
# down block (as the taming conversions have at their lowest resolution), no mid attention.
DEEPER = dict(down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
              block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=4, latent_channels=4,
              num_vq_embeddings=16, vq_embed_dim=6, sample_size=32, mid_block_add_attention=False)


def _build(sizes: dict, seed: int) -> "diffusers.VQModel":
    """A random VQModel with perturbed norms/biases and a codebook spread over its own latents (diverse codes)."""
    torch.manual_seed(seed)
    n = len(sizes["block_out_channels"])
    sizes = {"down_block_types": ("DownEncoderBlock2D",) * n, **sizes}
    model = diffusers.VQModel(up_block_types=("UpDecoderBlock2D",) * n, **sizes).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
        # Codebook entries near latents of other random images, so that many codes are used.
        probe = torch.rand((4, 3, 32, 32), generator=generator) * 2 - 1
        latents = model.encode(probe).latents.permute(0, 2, 3, 1).reshape(-1, model.config.vq_embed_dim)
        pick = torch.randperm(latents.shape[0], generator=generator)[:model.config.num_vq_embeddings]
        codebook = latents[pick] + 0.05 * latents.std() * torch.randn(latents[pick].shape, generator=generator)
        model.quantize.embedding.weight.copy_(codebook)
    return model


@pytest.fixture(scope="module", params=["tiny", "deeper"])
def vqgan(request, tmp_path_factory):
    sizes = TINY if request.param == "tiny" else DEEPER
    model = _build(sizes, seed=0 if request.param == "tiny" else 10)
    directory = tmp_path_factory.mktemp(f"vqgan_{request.param}")
    model.save_pretrained(directory)
    assert (directory / WEIGHTS_FILE).exists()
    return request.param, model, directory


def _images(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=(2, 32, 32, 3)).astype(np.float32)


def test_latents_and_codes_match_diffusers(vqgan, parity):
    label, model, directory = vqgan
    config, params = load_vqgan(directory)
    assert config.block_out_channels == tuple(model.config.block_out_channels)
    assert config.vq_embed_dim == model.config.vq_embed_dim
    images = _images()
    encoder = VQGANEncoder(config)
    ours = np.asarray(encoder.apply({"params": params}, jnp.asarray(images)))
    codes = np.asarray(encoder.apply({"params": params}, jnp.asarray(images), method=VQGANEncoder.codes))

    with torch.no_grad():
        latents = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latents  # pre-quantisation
        _, _, (_, _, diffusers_codes) = model.quantize(latents)
    reference = latents.permute(0, 2, 3, 1).numpy()
    side = 32 // config.downsample_factor
    assert ours.shape == reference.shape == (2, side, side, config.vq_embed_dim)
    parity(f"VQGAN encoder ({label})", "pre-quant latents", ours, reference, F32_BOUND)

    assert codes.shape == (2, side, side) and codes.dtype == np.int32
    diffusers_codes = diffusers_codes.reshape(2, side, side).numpy()
    codebook = model.quantize.embedding.weight.detach().double()
    distances = torch.cdist(torch.from_numpy(reference).double().reshape(-1, config.vq_embed_dim), codebook) ** 2
    argmin = distances.argmin(-1).reshape(2, side, side).numpy()
    assert (argmin == diffusers_codes).all()
    assert len(np.unique(argmin)) > 4, "test codebook too degenerate to check the lookup"
    top2 = torch.topk(distances, 2, largest=False).values.numpy()
    near_tie = ((top2[:, 1] - top2[:, 0]) <= NEAR_TIE * np.maximum(top2[:, 1], 1e-12)).reshape(2, side, side)
    differing = codes != argmin
    print(f"VQGAN codes ({label}): {differing.sum()} of {codes.size} differ from the float64 argmin, "
          f"{near_tie.sum()} positions are near-ties")
    assert not (differing & ~near_tie).any(), f"codes differ away from near-ties at {np.argwhere(differing)}"

    # The codebook vectors of the codes are diffusers' quantised latents.
    with torch.no_grad():
        quantised = model.quantize(latents)[0].permute(0, 2, 3, 1).numpy()
    vectors = np.asarray(encoder.apply({"params": params}, jnp.asarray(codes), method=VQGANEncoder.codebook_vectors))
    same = ~differing
    np.testing.assert_allclose(vectors[same], quantised[same], rtol=0, atol=1e-5)


def test_old_attention_names_and_no_decoder(tmp_path):
    """Old diffusers attention names (down and mid blocks) are read instead of to_q/...; decoder tensors are not
    needed."""
    model = _build({**DEEPER, "mid_block_add_attention": True}, seed=5)
    model.save_pretrained(tmp_path / "new")
    tensors = read_safetensors(tmp_path / "new" / WEIGHTS_FILE)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for name, value in tensors.items():
        if name.startswith(("decoder.", "post_quant_conv.")):
            continue
        for new, previous in renames.items():
            name = re.sub(rf"(attentions\.\d+)\.{re.escape(new)}\.", rf"\1.{previous}.", name)
        old[name] = np.array(value)
    assert sum(".proj_attn.weight" in n for n in old) == 3  # two in the last down block, one in the mid block
    assert not any(".to_q." in n for n in old)
    (tmp_path / "old").mkdir()
    shutil.copy(tmp_path / "new" / "config.json", tmp_path / "old" / "config.json")
    write_safetensors(tmp_path / "old" / WEIGHTS_FILE, old)
    _, expected = load_vqgan(tmp_path / "new")
    _, params = load_vqgan(tmp_path / "old")
    a, b = traverse_util.flatten_dict(expected), traverse_util.flatten_dict(params)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vqgan_errors")
    _build(TINY, seed=7).save_pretrained(directory)
    return directory


def _copy_with(saved, target, edit_tensors=None, edit_config=None):
    target.mkdir()
    config = json.loads((saved / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (target / "config.json").write_text(json.dumps(config))
    tensors = {k: np.array(v) for k, v in read_safetensors(saved / WEIGHTS_FILE).items()}
    if edit_tensors:
        edit_tensors(tensors)
    write_safetensors(target / WEIGHTS_FILE, tensors)
    return target


def test_missing_directory_and_files(saved_tiny, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"directory {missing} does not exist"):
        load_vqgan(missing)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(saved_tiny / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match=f"{no_weights / WEIGHTS_FILE} is missing"):
        load_vqgan(no_weights)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(saved_tiny / WEIGHTS_FILE, no_config / WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match=f"{no_config / 'config.json'} is missing"):
        load_vqgan(no_config)
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_vqgan(saved_tiny / WEIGHTS_FILE)


def test_missing_tensor_and_wrong_shape_are_named(saved_tiny, tmp_path):
    name = "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    dropped = _copy_with(saved_tiny, tmp_path / "dropped", edit_tensors=lambda t: t.pop(name))
    with pytest.raises(CheckpointMismatchError, match="missing tensors") as error:
        load_vqgan(dropped)
    assert name in str(error.value) and str(dropped / WEIGHTS_FILE) in str(error.value)

    codebook = "quantize.embedding.weight"

    def wrong_shape(tensors):
        tensors[codebook] = tensors[codebook][:, :5].copy()

    reshaped = _copy_with(saved_tiny, tmp_path / "reshaped", edit_tensors=wrong_shape)
    with pytest.raises(CheckpointMismatchError, match="shape mismatches") as error:
        load_vqgan(reshaped)
    assert f"{codebook}: checkpoint shape (32, 5)" in str(error.value) and "parameter codebook has shape (32, 8)" \
        in str(error.value)

    def extra(tensors):
        tensors["encoder.mystery.weight"] = np.zeros(3, np.float32)

    unexpected = _copy_with(saved_tiny, tmp_path / "unexpected", edit_tensors=extra)
    with pytest.raises(CheckpointMismatchError, match=r"unused tensors[\s\S]*encoder\.mystery\.weight"):
        load_vqgan(unexpected)


@pytest.mark.parametrize("field, value, message", [
    ("down_block_types", ["DownEncoderBlock2D", "SkipDownBlock2D"],
     r"down_block_types=.*unsupported block types \['SkipDownBlock2D'\]; "
     r"supported: \['DownEncoderBlock2D', 'AttnDownEncoderBlock2D'\]"),
    ("act_fn", "gelu", r"act_fn='gelu' is not supported; supported: \['silu', 'swish'\]"),
    ("norm_num_groups", 12, r"norm_num_groups=12 does not divide block_out_channels \[32, 64\]"),
    ("_class_name", "AutoencoderKL", r"_class_name='AutoencoderKL' is not supported; supported: \['VQModel'\]"),
])
def test_unsupported_config_is_rejected(saved_tiny, tmp_path, field, value, message):
    directory = _copy_with(saved_tiny, tmp_path / "bad", edit_config=lambda c: c.__setitem__(field, value))
    with pytest.raises(ValueError, match=message) as error:
        load_vqgan(directory)
    assert str(directory / "config.json") in str(error.value)


def test_config_defaults_follow_diffusers():
    config = VQGANConfig.from_dict({"_class_name": "VQModel", "latent_channels": 4, "act_fn": "SiLU",
                                    "scaling_factor": 0.5, "force_upcast": True, "norm_type": "spatial"})
    assert config.vq_embed_dim == 4 and config.act_fn == "silu" and config.downsample_factor == 1
    assert VQGANConfig(block_out_channels=[128, 128, 256, 256, 512], norm_num_groups=32,
                       down_block_types=["DownEncoderBlock2D"] * 5).downsample_factor == 16
