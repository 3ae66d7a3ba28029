"""Importing the LaDiC authors' released PyTorch checkpoint as a ladic_jax run directory.

    convert_official("pytorch_model.bin", "LaDiC/datasets", "runs/official", config)

``config`` is the ``official`` model variant (configs/ladic_official.py). The release's
``pytorch_model.bin`` is the state dict of its whole model; it is read with
``torch.load(weights_only=True)`` and mapped strictly, by the table below, onto the variant's
parameters: every tensor is used or explicitly ignored, and a missing, mis-shaped or unknown tensor
stops the conversion naming it. The per-channel latent mean and std come from the two files the
authors ship beside their code (``datasets/{mean,std}_emb_split.pickle``, saved with ``torch.save``).

The result is an ordinary run directory (``config.json`` + an orbax checkpoint of step 0 with a fresh
optimizer state), so ``ladic-eval``, ``ladic-caption`` and ``ladic-train`` (fine-tuning) work on it.

| release prefix | parameters | table |
|---|---|---|
| ``space_encoder.`` (BERT embeddings + layers 0..5) | ``text/`` | BERT names (``checkpoint_names``) |
| ``lm_head.predictions.`` (untied MLM head) | ``text/mlm_head/`` | BERT head names |
| ``visual_encoder.`` (timm BLIP ViT-B/16) | ``image/`` | ``TIMM_VIT`` |
| ``diffuser.`` (BLIP "MED" BERT) and ``time_layer_norm`` | ``diffuser/`` | ``RELEASE_DIFFUSER`` |
| ``space_decoder.``, ``diffuser.embeddings.word_embeddings``, ``*.position_ids`` | -- | ignored (unused by the release's forward) |

``diffuser/null_condition`` has no counterpart (the release guides against a zero image) and is set to
zeros; ``latent_mean``/``latent_std`` come from the statistics files.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ladic_jax import checkpoint as ckpt_lib
from ladic_jax import trainer
from ladic_jax.data import text as text_lib
from ladic_jax.encoders import checkpoint_names as names
from ladic_jax.encoders.checkpoint_files import read_safetensors, read_torch_bin
from ladic_jax.sharding import path_str

# The release's diffuser (under ``diffuser.``) -> the ``Diffuser`` of the ``official`` preset.
RELEASE_DIFFUSER: tuple[names.Row, ...] = (
    ("param", "embeddings.position_embeddings.weight", "position_embeddings"),
    ("norm", "embeddings.LayerNorm", "embed_norm"),
    ("dense", "encoder.layer.{i}.attention.self.query", "block_{i}/self_attn/query"),
    ("dense", "encoder.layer.{i}.attention.self.key", "block_{i}/self_attn/key"),
    ("dense", "encoder.layer.{i}.attention.self.value", "block_{i}/self_attn/value"),
    ("dense", "encoder.layer.{i}.attention.output.dense", "block_{i}/self_attn/out"),
    ("norm", "encoder.layer.{i}.attention.output.LayerNorm", "block_{i}/self_attn_norm"),
    ("dense", "encoder.layer.{i}.crossattention.self.query", "block_{i}/cross_attn/query"),
    ("dense", "encoder.layer.{i}.crossattention.self.key", "block_{i}/cross_attn/key"),
    ("dense", "encoder.layer.{i}.crossattention.self.value", "block_{i}/cross_attn/value"),
    ("dense", "encoder.layer.{i}.crossattention.output.dense", "block_{i}/cross_attn/out"),
    ("norm", "encoder.layer.{i}.crossattention.output.LayerNorm", "block_{i}/cross_attn_norm"),
    ("dense", "encoder.layer.{i}.intermediate.dense", "block_{i}/mlp/fc1"),
    ("dense", "encoder.layer.{i}.output.dense", "block_{i}/mlp/fc2"),
    ("norm", "encoder.layer.{i}.output.LayerNorm", "block_{i}/mlp_norm"),
)

RELEASE_IGNORED: tuple[tuple[str, str], ...] = names.BUFFERS + (
    (r"^space_decoder\.", "the release's upper BERT half: its forward skips its embeddings and every layer"),
    (r"^diffuser\.embeddings\.word_embeddings\.", "the release feeds the diffuser embeddings, never token ids"),
)
# HF BERT ties `predictions.bias` to `predictions.decoder.bias`; the forward (nn.Linear) reads the latter.
RELEASE_DUPLICATES = (("lm_head.predictions.bias", "lm_head.predictions.decoder.bias",
                       "the release's forward adds the decoder's own bias"),)

STATS_FILES = {"latent_mean": "mean_emb_split.pickle", "latent_std": "std_emb_split.pickle"}
NOT_IN_RELEASE = {"diffuser/null_condition": "zeros (unused: the release guides against a zero image)"}


def release_rules(text_layers: int, vit_layers: int, diffuser_layers: int) -> list[names.Rule]:
    """The strict name table for a release checkpoint with these layer counts."""
    text = dict(source_prefix="space_encoder.", target_prefix="text/")
    return (names.expand(names.BERT_EMBEDDINGS, **text)
            + names.expand(names.BERT_TOKEN_TYPES, **text)
            + names.expand(names.BERT_LAYERS, text_layers, **text)
            + names.expand(names.BERT_HEAD, source_prefix="lm_head.predictions.", target_prefix="text/")
            + names.expand(names.TIMM_VIT, vit_layers, source_prefix="visual_encoder.", target_prefix="image/")
            + names.expand(RELEASE_DIFFUSER, diffuser_layers, source_prefix="diffuser.", target_prefix="diffuser/")
            + names.expand((("norm", "time_layer_norm", "time_norm"),), target_prefix="diffuser/"))


def read_release(path: str | Path) -> dict[str, np.ndarray]:
    """The release's tensors by name: a ``torch.save``d state dict (``weights_only=True``) or safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return read_torch_bin(path)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # not a zip/pickle, or refused objects
        raise ValueError(f"--checkpoint {path} could not be read as a PyTorch state dict "
                         f"(torch.load, weights_only=True): {type(e).__name__}: {e}") from e


def read_stats(stats_dir: str | Path, dim: int) -> dict[str, np.ndarray]:
    """``latent_mean`` and ``latent_std`` (dim,) float32 from the release's two ``torch.save``d tensors."""
    import torch

    out = {}
    for param, filename in STATS_FILES.items():
        path = Path(stats_dir) / filename
        if not path.is_file():
            raise FileNotFoundError(f"--stats_dir {stats_dir}: {filename} not found (the release ships it as "
                                    f"datasets/{filename})")
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path} could not be read (torch.load, weights_only=True): "
                             f"{type(e).__name__}: {e}") from e
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path} holds a {type(value).__name__}, expected a tensor of shape ({dim},)")
        array = value.detach().cpu().to(torch.float32).numpy()
        if array.ndim > 1 and array.size == array.shape[-1]:  # (1, D) or (1, 1, D)
            array = array.reshape(-1)
        if array.shape != (dim,):
            raise ValueError(f"{path} has shape {tuple(value.shape)}, the model's latent needs ({dim},)")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{path} holds non-finite values")
        if param == "latent_std" and np.any(array <= 0):
            raise ValueError(f"{path}: {int(np.sum(array <= 0))} channel(s) have std <= 0; the latent "
                             "divides by it")
        out[param] = array
    return out


def release_params(tensors: dict[str, np.ndarray], template: dict[str, tuple[int, ...]], family
                   ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Flat parameters ("text/layers_0/...") from the release's tensors, strictly; and what was ignored.

    Raises ``CheckpointMismatchError`` naming every missing, unused or mis-shaped tensor.
    """
    rules = release_rules(family.text_config.num_layers, family.image_config.num_layers,
                          family.diffuser_config.depth)
    conversion = names.convert_checkpoint(
        tensors, rules, template, ignore=RELEASE_IGNORED, duplicates=RELEASE_DUPLICATES,
        allow_uncovered=tuple(STATS_FILES) + tuple(NOT_IN_RELEASE),
        description="the LaDiC release checkpoint")
    return dict(conversion.params), conversion.ignored


def convert_official(checkpoint: str | Path, stats_dir: str | Path, workdir: str, config) -> dict:
    """Writes ``workdir/config.json`` and ``workdir/checkpoints/0`` from the release; returns a summary.

    Checks first, writing nothing otherwise, that the run's tokenizer (``config.input.tokenizer``, stored in
    its config.json as given) loads: the converted run needs it to encode and decode every caption; a
    ``TokenizerError`` (a ValueError) names it and how to give another.
    """
    ck_dir = os.path.join(workdir, "checkpoints")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} is a file; give a new directory for the converted run")
    if os.path.isdir(ck_dir) and os.listdir(ck_dir):
        raise ValueError(f"--workdir {workdir} already holds checkpoints; convert into a new directory")
    try:
        text_lib.load_tokenizer(config.input.tokenizer)
    except text_lib.TokenizerError as e:
        raise text_lib.TokenizerError(f"{e} (the converted run needs it to encode and decode captions; nothing "
                                      "was written)") from e
    sk = trainer.skeleton(config)
    family = sk.family
    abstract = sk.abstract_state["params"]
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    template = {path_str(p): tuple(a.shape) for p, a in leaves}

    tensors = read_release(checkpoint)
    flat, ignored = release_params(tensors, template, family)
    flat.update(read_stats(stats_dir, family.text_config.hidden_size))
    for name in NOT_IN_RELEASE:
        flat[name] = np.zeros(template[name], np.float32)
    del tensors

    def put(path, a):
        return jax.device_put(np.asarray(flat.pop(path_str(path)), dtype=a.dtype), a.sharding)

    params = jax.tree_util.tree_map_with_path(put, abstract)
    if flat:  # every parameter is filled above; anything left is a table naming a non-parameter
        raise AssertionError(f"internal: converted tensors without a parameter: {sorted(flat)}")
    opt_state = jax.jit(sk.tx.init, out_shardings=sk.state_shardings["opt_state"])(params)
    rep = sk.state_shardings["step"]
    state = {"step": jax.device_put(jnp.int32(0), rep), "params": params, "opt_state": opt_state,
             "rng": jax.device_put(jax.random.split(jax.random.key(config.seed))[1], rep)}
    summary = {"step": 0, "examples_seen": 0, "converted_from": str(Path(checkpoint).resolve()),
               "stats_dir": str(Path(stats_dir).resolve()), "ignored": ignored,
               "not_in_release": [f"{k}: {v}" for k, v in NOT_IN_RELEASE.items()]}
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ckpt_lib.Checkpointer(ck_dir, keep=config.checkpoint.keep)
    checkpointer.save(0, state, summary)
    checkpointer.wait()
    checkpointer.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        with open(os.path.join(workdir, "converted_from.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
