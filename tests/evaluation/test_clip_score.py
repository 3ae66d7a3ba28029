"""CLIP-based evaluation vs a tiny random HF PyTorch `CLIPModel` saved with its tokenizer and image processor.

Scores are checked against the closed form (Hessel et al. 2021) computed from the PyTorch model's own
`get_image_features` / `get_text_features`; the image conversion against PIL's bicubic resize done by hand; the
truncation rule with a BERT WordPiece tokenizer (MiniLM's) and a CLIP byte-level BPE tokenizer built here; retrieval
recall and zero-shot accuracy on hand-made embeddings with known ranks. Each measured max |diff| is printed as a
`PARITY` line (`pytest -s`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import pre_tokenizers

from ladic_jax.encoders.clip import CLIP
from ladic_jax.evaluation.clip_score import ClipScorer, clip_pixels, retrieval_recall, zero_shot_accuracy
from ladic_jax.pretrained_paths import minilm_dir

BOUND = 1e-4
SIZE, MAX_LENGTH, BATCH = 32, 16, 4
CLIP_MEAN, CLIP_STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
PROMPT = "A photo depicts "
LONG = "a dog and a cat sit on a red sofa next to a window while rain falls on the garden outside"


def _check(quantity: str, ours, reference, bound: float = BOUND) -> float:
    diff = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64))))
    print(f"PARITY clip_score {quantity:40s} {diff:.3e}  (bound {bound:.0e})")
    assert diff <= bound, f"{quantity}: max|diff| {diff:.3e} > {bound:.0e}"
    return diff


def _clip_bpe_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A tiny CLIP byte-level BPE tokenizer: the 256 byte symbols (alone and word-final), a few merges, and
    <|startoftext|>, <|endoftext|> as the two largest ids, as in openai's vocabulary."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = [("a", "t</w>"), ("c", "at</w>"), ("p", "h"), ("ph", "o"), ("o", "n</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _save_tiny_clip(directory, tokenizer, eos_token_id: int, seed: int) -> transformers.CLIPModel:
    """A random CLIPModel (weights perturbed away from init) saved with `tokenizer` and a preprocessor config."""
    torch.manual_seed(seed)
    text = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id or tokenizer.bos_token_id)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=SIZE, patch_size=8)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    transformers.CLIPImageProcessor(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                                    size={"shortest_edge": SIZE},
                                    crop_size={"height": SIZE, "width": SIZE}).save_pretrained(directory)
    return model


def _torch_text(model, tokenizer, texts) -> np.ndarray:
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(input_ids=encoded["input_ids"],
                                           attention_mask=encoded["attention_mask"]).pooler_output.numpy()
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def _torch_image(model, pixels_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        features = model.get_image_features(
            pixel_values=torch.tensor(pixels_nhwc.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def _pil_bicubic(raw: np.ndarray, size: int) -> np.ndarray:
    """PIL's BICUBIC resize of float images, channel by channel (what HF's CLIPImageProcessor applies)."""
    return np.stack([np.stack([np.asarray(Image.fromarray(image[:, :, c], "F").resize((size, size), Image.BICUBIC))
                               for c in range(image.shape[2])], -1) for image in raw])


@pytest.fixture(scope="module")
def bert_clip(tmp_path_factory):
    """(scorer, torch model, tokenizer, directory): a tiny CLIP whose text tower uses MiniLM's WordPiece vocabulary."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    directory = tmp_path_factory.mktemp("clip_bert")
    model = _save_tiny_clip(directory, tokenizer, tokenizer.sep_token_id, seed=0)
    return ClipScorer.load(directory, batch_size=BATCH), model, tokenizer, directory


def test_scores_match_torch_closed_form(bert_clip):
    scorer, model, tokenizer, _ = bert_clip
    assert scorer.prompt == PROMPT and scorer.image_size == SIZE
    np.testing.assert_allclose(scorer.image_mean, CLIP_MEAN, rtol=1e-6)  # read from preprocessor_config.json
    raw = np.random.default_rng(0).random((5, SIZE, SIZE, 3), dtype=np.float32)  # 5 > BATCH: two padded batches
    image_emb = scorer.image_embeddings((raw - 0.5) / 0.5, 0.5, 0.5)
    reference_images = _torch_image(model, (raw - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD))
    _check("image embeddings (same size)", image_emb, reference_images)

    candidates = ["a cat on a sofa", "two dogs", LONG, "", "a red window"]
    references = [["a cat sleeping", "a sofa"], ["dogs playing"], ["a dog and a cat", "rain", LONG], ["a photo"],
                  ["a window"]]
    ours = scorer.scores(image_emb, candidates, references)
    candidate_emb = _torch_text(model, tokenizer, [PROMPT + c for c in candidates])
    _check("candidate text embeddings", scorer.text_embeddings(candidates), candidate_emb)
    cosine = np.sum(reference_images * candidate_emb, axis=1)
    clip_s = 2.5 * np.maximum(cosine, 0)
    ref_cos = np.array([max(float(candidate_emb[i] @ _torch_text(model, tokenizer, [PROMPT + r for r in refs])[k])
                            for k in range(len(refs))) for i, refs in enumerate(references)])
    ref_term = np.maximum(ref_cos, 0)
    ref_clip_s = 2 * clip_s * ref_term / (clip_s + ref_term)
    _check("clip_score per image", ours["clip_score_per_image"], clip_s)
    _check("ref_clip_score per image", ours["ref_clip_score_per_image"], ref_clip_s)
    _check("clip_score / ref_clip_score means", [ours["clip_score"], ours["ref_clip_score"]],
           [clip_s.mean(), ref_clip_s.mean()])
    assert set(scorer.scores(image_emb, candidates)) == {"clip_score", "clip_score_per_image"}


def test_negative_cosine_scores_zero(bert_clip):
    scorer = bert_clip[0]
    text = scorer.text_embeddings(["a cat on a sofa"])  # with the prompt, as scores() embeds candidates
    result = scorer.scores(np.concatenate([-text, text]), ["a cat on a sofa"] * 2, [["two dogs"], ["two dogs"]])
    assert result["clip_score_per_image"][0] == 0.0 and result["ref_clip_score_per_image"][0] == 0.0
    _check("clip_score of the candidate's own embedding", result["clip_score_per_image"][1], 2.5, 1e-5)


@pytest.mark.parametrize("caller_size", [48, 24], ids=["downsample", "upsample"])
def test_images_at_other_size_and_normalisation(bert_clip, caller_size):
    scorer, model, _, directory = bert_clip
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    raw = np.random.default_rng(1).random((3, caller_size, caller_size, 3), dtype=np.float32)
    # jax.image.resize's bicubic is PIL's and torch's antialiased bicubic: checked on the raw images.
    resized = jax.image.resize(jnp.asarray(raw), (3, SIZE, SIZE, 3), "bicubic")
    _check(f"jax.image.resize vs PIL {caller_size}->{SIZE}", resized, _pil_bicubic(raw, SIZE), 1e-5)
    torch_resized = torch.nn.functional.interpolate(torch.tensor(raw).permute(0, 3, 1, 2), size=(SIZE, SIZE),
                                                    mode="bicubic", antialias=True, align_corners=False)
    _check(f"jax.image.resize vs torch {caller_size}->{SIZE}", resized, torch_resized.permute(0, 2, 3, 1), 1e-5)
    to_clip = jax.jit(clip_pixels, static_argnames="size")
    by_hand = (np.clip(_pil_bicubic(raw, SIZE), 0, 1) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    pixels = to_clip(jnp.asarray((raw - mean) / std), mean, std, size=SIZE, clip_mean=np.float32(CLIP_MEAN),
                         clip_std=np.float32(CLIP_STD))
    _check(f"CLIP pixels from {caller_size} px", pixels, by_hand, 1e-5)
    _check(f"image embeddings from {caller_size} px", scorer.image_embeddings((raw - mean) / std, mean, std),
           _torch_image(model, by_hand))
    # HF's own processor resizes the 8-bit image with PIL, rounding (and clipping) to 8 bits after each of its two
    # separable passes. On a smooth image nothing overshoots, and it agrees with ours to about one 8-bit level.
    grid = np.linspace(0, 4, caller_size, dtype=np.float32)
    smooth = 0.5 + 0.3 * np.sin(grid)[:, None, None] * np.cos(0.7 * grid)[None, :, None] * np.float32([1, 0.5, -1])
    smooth8 = np.round(smooth * 255).astype(np.uint8)[None]
    processor = transformers.CLIPImageProcessor.from_pretrained(directory)
    hf = processor(images=list(smooth8), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = to_clip(jnp.asarray((smooth8 / np.float32(255) - mean) / std), mean, std, size=SIZE,
                       clip_mean=scorer.image_mean, clip_std=scorer.image_std)
    _check(f"CLIP pixels vs HF CLIPImageProcessor {caller_size} px", ours, hf, 1.5 / 255 / min(CLIP_STD))


@pytest.mark.parametrize("kind", ["wordpiece", "clip_bpe", "clip_bpe_legacy_eos"])
def test_truncation_keeps_the_pooled_end_token(bert_clip, tmp_path, kind):
    if kind == "wordpiece":
        scorer, model, tokenizer, _ = bert_clip
        end = tokenizer.sep_token_id
    else:  # eos_token_id 2: transformers' legacy rule, pooling at the largest id (<|endoftext|> here)
        tokenizer = _clip_bpe_tokenizer()
        end = tokenizer.eos_token_id
        model = _save_tiny_clip(tmp_path, tokenizer, 2 if kind.endswith("legacy_eos") else end, seed=3)
        scorer = ClipScorer.load(tmp_path, batch_size=BATCH)
    texts = [LONG, "a cat", "on"]
    ids, mask = scorer.tokenize(texts)
    assert ids.shape == (3, MAX_LENGTH) and mask[0].all()  # the long text fills the window...
    last = mask.sum(1) - 1
    assert (ids[np.arange(3), last] == end).all()  # ...and every row still ends with the end token
    _check(f"text embeddings, {kind} tokenizer", scorer.text_embeddings(texts),
           _torch_text(model, tokenizer, [PROMPT + t for t in texts]))


def test_mismatched_end_token_is_refused(bert_clip):
    scorer = bert_clip[0]
    config = dataclasses.replace(scorer.config, text=dataclasses.replace(scorer.config.text, eos_token_id=5))
    wrong = ClipScorer(CLIP(config), scorer.params, config, scorer.tokenizer, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="eos_token_id"):
        wrong.text_embeddings(["a cat"])


def test_retrieval_recall_known_ranks():
    e1, e2, e3 = np.eye(3, dtype=np.float32)
    images = np.stack([e1, e2, e3])
    # Texts (owner image): t0 = e1 (0), t1 = e2 (0), t2 = e1 (1), t3 = e3 (2). Similarities, rows = images:
    #   I0: [1, 0, 1, 0]  best own text t0 = 1, wrong t2 ties at 1 -> rank 2 (the tie counts against)
    #   I1: [0, 1, 0, 0]  own t2 = 0, wrong t0, t1, t3 all >= 0     -> rank 4
    #   I2: [0, 0, 0, 1]  own t3 = 1                                 -> rank 1
    # Texts: t0 rank 1; t1 (own I0 = 0; I1 = 1, I2 = 0 tie) rank 3; t2 (own I1 = 0; I0 = 1, I2 = 0) rank 3; t3 rank 1.
    texts = np.stack([e1, e2, e1, e3])
    result = retrieval_recall(images, texts, np.array([0, 0, 1, 2]), ks=(1, 2, 3, 4))
    expected = {"i2t_recall@1": 1 / 3, "i2t_recall@2": 2 / 3, "i2t_recall@3": 2 / 3, "i2t_recall@4": 1.0,
                "t2i_recall@1": 0.5, "t2i_recall@2": 0.5, "t2i_recall@3": 1.0, "t2i_recall@4": 1.0}
    assert result == pytest.approx(expected)
    # A constant model gets nothing while there are at least k wrong candidates.
    constant = retrieval_recall(np.ones((3, 2)), np.ones((4, 2)), np.array([0, 0, 1, 2]), ks=(1, 2))
    assert constant == {"i2t_recall@1": 0.0, "i2t_recall@2": 0.0, "t2i_recall@1": 0.0, "t2i_recall@2": 0.0}
    with pytest.raises(ValueError, match="indices"):
        retrieval_recall(images, texts, np.array([0, 0, 1, 3]))


def test_zero_shot_accuracy():
    e1, e2, e3 = np.eye(3, dtype=np.float32)
    # Class 0 prompts 10·e1 and e2: the normalised mean of the *normalised* prompts is (e1 + e2)/√2 (a raw mean
    # would point near e1 and claim image 0). Class 1 = e3, class 2 = e1.
    classes = [np.stack([10 * e1, e2]), e3[None], e1[None]]
    images = np.stack([e1 + 0.3 * e2, e3, e2])  # cosines: image 0 -> class 2 (1 > 1.3/√2), 1 -> 1, 2 -> 0
    labels = np.array([2, 1, 0])
    assert zero_shot_accuracy(images, classes, labels) == 1.0
    # A fourth class identical to class 1 ties with it on image 1: the tie counts against the model.
    assert zero_shot_accuracy(images, classes + [np.stack([e3, e3])], labels) == pytest.approx(2 / 3)
    assert zero_shot_accuracy(images, classes, np.array([0, 1, 0])) == pytest.approx(2 / 3)
