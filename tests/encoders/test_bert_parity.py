"""Flax BERT / DistilBERT vs HF PyTorch on tiny random checkpoints: every layer, MLM logits, split halves, bf16.

The HF models are built with transformers + torch (seeded), every parameter is perturbed away from its init value
(so LayerNorm scales and zero biases are really tested), saved to disk, loaded back with `load_pretrained`, and
both run on the same padded batch. Only unpadded positions are compared.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest
import torch
import transformers

from ladic_jax.encoders.bert import BertConfig
from ladic_jax.encoders.loading import load_pretrained

F32_BOUND = 1e-4
# bf16 activations (float32 params) vs the float32 HF model, relative to the largest reference value: bf16 keeps
# 8 significant bits (one rounding = 2^-9 relative), compounding over the layers. Measured worst ~1.4e-2.
BF16_RELATIVE_BOUND = 3e-2
NUM_LAYERS = 3


def _perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _inputs(batch: int = 3, length: int = 10, vocab: int = 99):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    mask[1, -3:] = 0
    mask[2, -6:] = 0
    ids[mask == 0] = 0
    token_types = rng.integers(0, 2, size=(batch, length)).astype(np.int64)
    return ids, mask, token_types


def _save_bin(model: torch.nn.Module, directory, rename=None) -> None:
    """Old-style checkpoint: config.json + pytorch_model.bin holding the full state dict (tied tensors included)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(directory / "config.json"))
    state = {(rename(k) if rename else k): v.clone() for k, v in model.state_dict().items()}
    torch.save(state, directory / "pytorch_model.bin")


@pytest.fixture(scope="module")
def bert_checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=NUM_LAYERS, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, type_vocab_size=2,
    )
    model = transformers.BertForMaskedLM(config).eval()
    _perturb(model, 1)
    root = tmp_path_factory.mktemp("bert")
    model.save_pretrained(root / "safetensors")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    _save_bin(model, root / "bin")
    _save_bin(model, root / "old_names",
              rename=lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"))
    ids, mask, types = _inputs()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types), output_hidden_states=True)
    reference = dict(states=[h.numpy() for h in out.hidden_states], logits=out.logits.numpy())
    return root, model, (ids, mask, types), reference


@pytest.mark.parametrize("variant", ["safetensors", "sharded", "bin", "old_names"])
def test_bert_every_layer_and_logits_match_hf(bert_checkpoints, variant, parity):
    root, _, (ids, mask, types), ref = bert_checkpoints
    if variant == "sharded":
        assert (root / "sharded" / "model.safetensors.index.json").exists()
    pre = load_pretrained(root / variant, "bert")
    assert pre.notes.initialised == []
    variables = {"params": pre.params}
    hidden = pre.module.apply(variables, jnp.asarray(ids), jnp.asarray(types), method="embed")
    final, states = pre.module.apply(variables, hidden, jnp.asarray(mask), return_all=True, method="encode")
    assert len(states) == NUM_LAYERS + 1
    for i, (ours, theirs) in enumerate(zip(states, ref["states"])):
        parity(f"BERT tiny ({variant})", f"hidden_states[{i}]", ours, theirs, F32_BOUND, mask)
    logits = pre.module.apply(variables, final, method="mlm_logits")
    parity(f"BERT tiny ({variant})", "mlm logits", logits, ref["logits"], F32_BOUND, mask)
    full = pre.module.apply(variables, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    parity(f"BERT tiny ({variant})", "__call__ mlm logits", full, ref["logits"], F32_BOUND, mask)


def test_bert_decoder_source_recorded(bert_checkpoints):
    """Tied safetensors lack the decoder weight (copied from the embeddings); the .bin stores it and it is read."""
    root, model, _, _ = bert_checkpoints
    tied = load_pretrained(root / "safetensors", "bert")
    assert sorted(f.split(" <- ")[0] for f in tied.notes.fallbacks) == ["mlm_head/decoder/bias", "mlm_head/decoder/kernel"]
    from_bin = load_pretrained(root / "bin", "bert")
    assert from_bin.notes.fallbacks == []
    assert any("cls.predictions.bias (duplicate of cls.predictions.decoder.bias)" in n for n in from_bin.notes.ignored)
    np.testing.assert_array_equal(
        np.asarray(from_bin.params["mlm_head"]["decoder"]["kernel"]),
        model.cls.predictions.decoder.weight.detach().numpy().T,
    )
    assert len(load_pretrained(root / "old_names", "bert").notes.renamed) == 2 * (2 * NUM_LAYERS + 2)


@pytest.mark.parametrize("split", range(0, NUM_LAYERS + 1))
def test_bert_split_halves_equal_full_hf_forward(bert_checkpoints, split, parity):
    root, _, (ids, mask, types), ref = bert_checkpoints
    pre = load_pretrained(root / "safetensors", "bert")
    variables = {"params": pre.params}
    hidden = pre.module.apply(variables, jnp.asarray(ids), jnp.asarray(types), method="embed")
    latent = pre.module.apply(variables, hidden, jnp.asarray(mask), 0, split, method="encode")
    parity("BERT tiny split", f"latent after layer {split}", latent, ref["states"][split], F32_BOUND, mask)
    upper = pre.module.apply(variables, latent, jnp.asarray(mask), split, method="encode")
    logits = pre.module.apply(variables, upper, method="mlm_logits")
    parity("BERT tiny split", f"logits via split at {split}", logits, ref["logits"], F32_BOUND, mask)


def test_bert_untied_head_uses_checkpoint_decoder(tmp_path, parity):
    torch.manual_seed(3)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.BertForMaskedLM(config).eval()
    _perturb(model, 4)
    assert not torch.equal(model.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight)
    model.save_pretrained(tmp_path)
    pre = load_pretrained(tmp_path, "bert")
    assert pre.notes.fallbacks == []
    assert any(n.startswith("cls.predictions.bias (differs from cls.predictions.decoder.bias") for n in pre.notes.ignored)
    ids, mask, types = _inputs()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types)).logits.numpy()
    ours = pre.module.apply({"params": pre.params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    parity("BERT tiny untied head", "mlm logits", ours, ref, F32_BOUND, mask)


def test_bert_bf16_activations(bert_checkpoints, parity):
    root, _, (ids, mask, types), ref = bert_checkpoints
    pre = load_pretrained(root / "safetensors", "bert", dtype=jnp.bfloat16)
    variables = {"params": pre.params}
    assert pre.params["layers_0"]["attention"]["query"]["kernel"].dtype == jnp.float32
    hidden = pre.module.apply(variables, jnp.asarray(ids), jnp.asarray(types), method="embed")
    final = pre.module.apply(variables, hidden, jnp.asarray(mask), method="encode")
    logits = pre.module.apply(variables, final, method="mlm_logits")
    assert final.dtype == jnp.bfloat16 and logits.dtype == jnp.bfloat16
    parity("BERT tiny bf16", "last hidden state", final, ref["states"][-1], BF16_RELATIVE_BOUND, mask, relative=True)
    parity("BERT tiny bf16", "mlm logits", logits, ref["logits"], BF16_RELATIVE_BOUND, mask, relative=True)
    pre16 = load_pretrained(root / "safetensors", "bert", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert pre16.params["layers_0"]["attention"]["query"]["kernel"].dtype == jnp.bfloat16
    logits16 = pre16.module.apply({"params": pre16.params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    parity("BERT tiny bf16 params", "mlm logits", logits16, ref["logits"], BF16_RELATIVE_BOUND, mask, relative=True)


@pytest.fixture(scope="module")
def distilbert_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=NUM_LAYERS, n_heads=4, hidden_dim=37,
                                           max_position_embeddings=64)
    model = transformers.DistilBertForMaskedLM(config).eval()
    _perturb(model, 2)
    root = tmp_path_factory.mktemp("distilbert")
    model.save_pretrained(root / "safetensors")
    _save_bin(model, root / "bin")
    ids, mask, _ = _inputs()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    return root, (ids, mask), dict(states=[h.numpy() for h in out.hidden_states], logits=out.logits.numpy())


@pytest.mark.parametrize("variant,kind", [("safetensors", "distilbert"), ("bin", "auto"), ("safetensors", "bert")])
def test_distilbert_every_layer_and_logits_match_hf(distilbert_checkpoint, variant, kind, parity):
    root, (ids, mask), ref = distilbert_checkpoint
    pre = load_pretrained(root / variant, kind)
    assert pre.config.type_vocab_size == 0 and pre.config.model_type == "distilbert"
    assert "token_type_embeddings" not in pre.params["embeddings"]
    variables = {"params": pre.params}
    hidden = pre.module.apply(variables, jnp.asarray(ids), method="embed")
    final, states = pre.module.apply(variables, hidden, jnp.asarray(mask), return_all=True, method="encode")
    for i, (ours, theirs) in enumerate(zip(states, ref["states"])):
        parity(f"DistilBERT tiny ({variant})", f"hidden_states[{i}]", ours, theirs, F32_BOUND, mask)
    logits = pre.module.apply(variables, final, method="mlm_logits")
    parity(f"DistilBERT tiny ({variant})", "mlm logits", logits, ref["logits"], F32_BOUND, mask)


def test_distilbert_bf16(distilbert_checkpoint, parity):
    root, (ids, mask), ref = distilbert_checkpoint
    pre = load_pretrained(root / "safetensors", "distilbert", dtype=jnp.bfloat16)
    logits = pre.module.apply({"params": pre.params}, jnp.asarray(ids), jnp.asarray(mask))
    parity("DistilBERT tiny bf16", "mlm logits", logits, ref["logits"], BF16_RELATIVE_BOUND, mask, relative=True)


def test_config_from_hf_matches_named_constructors():
    assert BertConfig.from_hf(transformers.BertConfig()) == BertConfig.base()
    assert BertConfig.from_hf(transformers.DistilBertConfig()) == BertConfig.distilbert_base()
    with pytest.raises(ValueError, match="model_type"):
        BertConfig.from_hf(transformers.CLIPTextConfig())
    with pytest.raises(ValueError, match="num_heads"):
        BertConfig(hidden_size=30, num_heads=4)


def test_encode_rejects_bad_layer_range_and_token_types(bert_checkpoints):
    root, _, (ids, mask, _), _ = bert_checkpoints
    pre = load_pretrained(root / "safetensors", "bert")
    variables = {"params": pre.params}
    hidden = pre.module.apply(variables, jnp.asarray(ids), method="embed")
    with pytest.raises(ValueError, match="layer range"):
        pre.module.apply(variables, hidden, jnp.asarray(mask), 2, 1, method="encode")
    with pytest.raises(ValueError, match="layer range"):
        pre.module.apply(variables, hidden, jnp.asarray(mask), 0, NUM_LAYERS + 1, method="encode")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pre.module.apply(variables, jnp.zeros((1, 65), jnp.int32), method="embed")


def test_mlm_logits_for_a_subset_of_token_ids(bert_checkpoints, parity):
    root, _, (ids, mask, types), ref = bert_checkpoints
    pre = load_pretrained(root / "safetensors", "bert")
    variables = {"params": pre.params}
    hidden = pre.module.apply(variables, jnp.asarray(ids), jnp.asarray(types), method="embed")
    final = pre.module.apply(variables, hidden, jnp.asarray(mask), method="encode")
    subset = np.array([5, 0, 98, 17, 17])
    logits = pre.module.apply(variables, final, jnp.asarray(subset), method="mlm_logits")
    assert logits.shape == ids.shape + (len(subset),)
    parity("BERT tiny vocab subset", "mlm logits of 5 chosen ids", logits, ref["logits"][..., subset], F32_BOUND, mask)
