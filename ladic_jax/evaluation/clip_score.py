"""CLIP-based evaluation for every model family: CLIPScore, RefCLIPScore, retrieval recall, zero-shot accuracy.

    scorer = ClipScorer.load("openai/clip-vit-base-patch32")   # local directory or hub id; never downloads
    image_emb = scorer.image_embeddings(batch["image"], cfg.image_mean, cfg.image_std)
    scorer.scores(image_emb, captions, references)   # {"clip_score": ..., "ref_clip_score": ..., per image}

Definitions (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", §3 and
their released `clipscore.py`; DESIGN §8):

- CLIP-S(c, v) = w · max(cos(c, v), 0) with w = 2.5, where c is the text embedding of prompt + caption (prompt
  "A photo depicts ") and v the image embedding.
- RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(c, r), 0)). The reference term is the plain
  clipped cosine, *not* scaled by w (the paper's equation, and its code, which uses the unscaled max cosine). The
  references are embedded with the same prompt as the candidate, as in the released code. H-Mean(a, b) =
  2ab / (a + b), and 0 when a + b = 0.

Images come as the project's input pipeline makes them (NHWC float32, pixels in [0, 1] normalised with the
caller's mean/std at the caller's size). `clip_pixels` undoes that normalisation, resizes to the CLIP's input size
when it differs, and normalises with the CLIP's mean/std. The resize is `jax.image.resize(..., "bicubic")`: the
Keys cubic kernel with a = -0.5 on half-pixel centres, widened by the scale factor when downsampling
(antialiasing), taps outside the image dropped and the weights renormalised. That is PIL's BICUBIC, which HF's
CLIPImageProcessor uses (and torch's `interpolate(mode="bicubic", antialias=True)`); measured equal to both within
5e-7 here. The result is clipped to [0, 1], as PIL's 8-bit output saturates. Unlike the HF processor, the CLIP then
sees an image resized twice (original -> caller's size -> CLIP's size) and not rounded to 8 bits in between.

Every jitted function is built once per scorer and sees fixed shapes: batches are padded to `batch_size` (the last
real row repeated, its outputs dropped) and texts always to the text tower's `max_position_embeddings`, so one
compilation serves every batch (and a new caller image size recompiles only the pixel conversion).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ladic_jax.encoders import loading
from ladic_jax.sharding import to_host
from ladic_jax.encoders.clip import _LEGACY_EOS_TOKEN_ID, CLIPConfig

DEFAULT_PROMPT = "A photo depicts "
CLIP_SCORE_WEIGHT = 2.5  # w of Hessel et al.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _l2_normalize(x, axis: int = -1):
    xp = jnp if isinstance(x, jax.Array) else np
    x = x.astype(xp.float32)
    return x / xp.linalg.norm(x, axis=axis, keepdims=True)


def _channels(value, n: int, name: str) -> np.ndarray:
    """A scalar or a per-channel sequence -> float32 (n,)."""
    array = np.asarray(value, np.float32).reshape(-1)
    if array.size == 1:
        array = np.repeat(array, n)
    if array.shape != (n,):
        raise ValueError(f"{name} must be a scalar or {n} values (one per channel), got {value!r}")
    return array


def clip_pixels(images: jax.Array, mean, std, *, size: int, clip_mean, clip_std) -> jax.Array:
    """Caller-normalised NHWC images -> the CLIP's input: (x·std + mean), bicubic resize to size x size when the
    size differs (then clipped to [0, 1]), then (x - clip_mean) / clip_std. See the module docstring."""
    x = images.astype(jnp.float32) * std + mean
    if x.shape[1:3] != (size, size):
        x = jnp.clip(jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bicubic"), 0.0, 1.0)
    return (x - clip_mean) / clip_std


def _in_batches(fn, arrays: tuple[np.ndarray, ...], batch_size: int) -> np.ndarray:
    """fn(*chunks) over chunks of `batch_size` rows, the last padded by repeating its last row."""
    n = arrays[0].shape[0]
    outputs = []
    for start in range(0, n, batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        pad = batch_size - chunk[0].shape[0]
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) if pad else c for c in chunk]
        outputs.append(to_host(fn(*chunk))[:batch_size - pad])
    return np.concatenate(outputs)


class ClipScorer:
    """A Flax CLIP with its tokenizer and image preprocessing, for scoring captions (see the module docstring).

    Args:
      module, params, config: the `CLIP` module, its parameters and `CLIPConfig` (e.g. from `load_pretrained`).
      tokenizer: the HF tokenizer matching the text tower.
      image_mean, image_std: the CLIP's per-channel normalisation (of pixels in [0, 1]).
      prompt: prepended to every text embedded with `prompt=True`.
      batch_size: the fixed batch every jitted call sees.
    """

    def __init__(self, module: nn.Module, params: Any, config: CLIPConfig, tokenizer: Any,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD, *,
                 prompt: str = DEFAULT_PROMPT, batch_size: int = 64):
        if not isinstance(config, CLIPConfig):
            raise TypeError(f"config must be a CLIPConfig, got {type(config).__name__}")
        if tokenizer is None:
            raise ValueError("ClipScorer needs the CLIP's tokenizer, got None")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.module, self.params, self.config, self.tokenizer = module, params, config, tokenizer
        self.prompt, self.batch_size = prompt, int(batch_size)
        self.image_size = config.vision.image_size
        channels = config.vision.num_channels
        self.image_mean = _channels(image_mean, channels, "image_mean")
        self.image_std = _channels(image_std, channels, "image_std")
        # CLIP's text context is 77; a BERT's 512 positions would only pad captions further.
        self.max_length = min(config.text.max_position_embeddings, 77)

        def to_pixels(images, mean, std):
            return clip_pixels(images, mean, std, size=self.image_size, clip_mean=self.image_mean,
                               clip_std=self.image_std)

        def embed_pixels(params, pixels):
            return _l2_normalize(module.apply({"params": params}, pixels, method="get_image_features"))

        def embed_texts(params, ids, mask):
            return _l2_normalize(module.apply({"params": params}, ids, mask, method="get_text_features"))

        # Two functions, so that a new caller image size compiles only the conversion, not the vision tower again.
        self._to_pixels = jax.jit(to_pixels)
        self._embed_pixels = jax.jit(embed_pixels)
        self._embed_texts = jax.jit(embed_texts)

    @classmethod
    def load(cls, name_or_dir: str | Path, *, prompt: str = DEFAULT_PROMPT, batch_size: int = 64,
             dtype: jnp.dtype = jnp.float32) -> "ClipScorer":
        """From a local HF CLIP directory or a hub id in the local HF cache (never downloads). The mean/std come from
        the directory's preprocessor_config.json when present, else OpenAI CLIP's."""
        pre = loading.load_pretrained(name_or_dir, "clip", dtype=dtype)
        if pre.tokenizer is None:
            raise ValueError(f"{pre.notes.source} has no tokenizer files; ClipScorer needs the CLIP's tokenizer")
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        processor_file = Path(pre.notes.source) / "preprocessor_config.json"
        if processor_file.exists():
            processor = json.loads(processor_file.read_text())
            if processor.get("do_normalize", True):
                mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
            else:
                mean, std = 0.0, 1.0
        return cls(pre.module, pre.params, pre.config, pre.tokenizer, mean, std, prompt=prompt,
                   batch_size=batch_size)

    @property
    def embedding_dim(self) -> int:
        return self.config.projection_dim

    # ------------------------------------------------------------------------------------------ embeddings

    def image_embeddings(self, images: np.ndarray, mean, std) -> np.ndarray:
        """L2-normalised image embeddings (N, D) of NHWC images normalised with the caller's `mean`/`std`."""
        images = np.asarray(images, np.float32)
        channels = self.config.vision.num_channels
        if images.ndim != 4 or images.shape[-1] != channels:
            raise ValueError(f"images must be NHWC with {channels} channels, got shape {images.shape}")
        if not len(images):
            return np.zeros((0, self.embedding_dim), np.float32)
        mean, std = _channels(mean, channels, "mean"), _channels(std, channels, "std")
        embed = lambda x: self._embed_pixels(self.params, self._to_pixels(x, mean, std))  # noqa: E731
        return _in_batches(embed, (images,), self.batch_size)

    def image_embeddings_on_device(self, images: jax.Array, mean, std) -> jax.Array:
        """Like `image_embeddings`, for a (global, sharded) batch already on the devices: no host round trip,
        no padding; the result is sharded like the batch."""
        channels = self.config.vision.num_channels
        mean, std = _channels(mean, channels, "mean"), _channels(std, channels, "std")
        return self._embed_pixels(self.params, self._to_pixels(images, mean, std))

    def tokenize(self, texts: Sequence[str], prompt: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), int32 (M, max_position_embeddings): [prompt +] text, padded and truncated so that the token
        the text tower pools at is the last one kept (raises otherwise, e.g. when the config's eos_token_id is not
        the tokenizer's end token)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str")
        texts = [self.prompt + t if prompt else t for t in texts]
        encoded = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_attention_mask=True)
        ids = np.asarray(encoded["input_ids"], np.int32).reshape(len(texts), -1)
        mask = np.asarray(encoded["attention_mask"], np.int32).reshape(len(texts), -1)
        if ids.shape[1] != self.max_length:
            raise ValueError(f"the tokenizer returned length {ids.shape[1]}, expected {self.max_length}")
        if self.config.bert_text:  # a BERT tower pools at position 0 ([CLS]), whatever the length
            return ids, mask
        # The tower's pooling rule (clip.py), checked against the last attended position of every row.
        eos = self.config.text.eos_token_id
        pooled = ids.argmax(1) if eos == _LEGACY_EOS_TOKEN_ID else (ids == eos).argmax(1)
        bad = np.flatnonzero(pooled != mask.sum(1) - 1)
        if bad.size:
            i = bad[0]
            raise ValueError(
                f"text {i} ({texts[i]!r:.80}): the text tower would pool at position {pooled[i]} (token "
                f"{ids[i, pooled[i]]}) but the text ends at position {mask[i].sum() - 1} (token "
                f"{ids[i, mask[i].sum() - 1]}); does the config's eos_token_id ({eos}) match the tokenizer's end "
                "token, and does the tokenizer add it after truncation?")
        return ids, mask

    def text_embeddings(self, texts: Sequence[str], prompt: bool = True) -> np.ndarray:
        """L2-normalised text embeddings (M, D); the scorer's prompt is prepended when `prompt` is true."""
        if not len(texts):
            return np.zeros((0, self.embedding_dim), np.float32)
        ids, mask = self.tokenize(texts, prompt)
        return _in_batches(lambda i, m: self._embed_texts(self.params, i, m), (ids, mask), self.batch_size)

    # ------------------------------------------------------------------------------------------ scores

    def scores(self, image_emb: np.ndarray, candidates: Sequence[str],
               references: Sequence[Sequence[str]] | None = None) -> dict:
        """CLIPScore (and RefCLIPScore with `references`) of one candidate caption per image.

        Returns `clip_score` (mean over images, float) and `clip_score_per_image` (N,), and with references
        `ref_clip_score` and `ref_clip_score_per_image`. Definitions in the module docstring.
        """
        image_emb = _l2_normalize(np.asarray(image_emb))
        n = image_emb.shape[0]
        if n == 0 or len(candidates) != n:
            raise ValueError(f"need one candidate per image and at least one image: {n} images, "
                             f"{len(candidates)} candidates")
        candidate_emb = self.text_embeddings(candidates)
        per_image = CLIP_SCORE_WEIGHT * np.maximum(np.sum(image_emb * candidate_emb, axis=1), 0.0)
        result = {"clip_score": float(per_image.mean()), "clip_score_per_image": per_image}
        if references is None:
            return result
        if len(references) != n or any(isinstance(r, str) or not len(r) for r in references):
            raise ValueError(f"references must be {n} non-empty lists of str, one per image")
        owner = np.repeat(np.arange(n), [len(r) for r in references])
        reference_emb = self.text_embeddings([r for refs in references for r in refs])
        best = np.full(n, -np.inf, np.float32)
        np.maximum.at(best, owner, np.sum(candidate_emb[owner] * reference_emb, axis=1))
        ref_term = np.maximum(best, 0.0)
        total = per_image + ref_term
        harmonic = np.divide(2 * per_image * ref_term, total, out=np.zeros_like(total), where=total > 0)
        result.update(ref_clip_score=float(harmonic.mean()), ref_clip_score_per_image=harmonic)
        return result


# ---------------------------------------------------------------------------------------------- retrieval


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
                     ks: Sequence[int] = (1, 5)) -> dict:
    """Image-to-text and text-to-image recall@k by cosine similarity.

    `text_image[j]` is the index of text j's image. An image is right at k if one of its texts ranks in the top k
    (averaged over the images that have texts); a text is right at k if its image ranks in the top k.

    Ties count against the model: the rank of the right answer is 1 + the number of *wrong* items scoring >= it
    (for an image, >= its best-scoring own text). A constant model thus ranks every right answer last and gets
    recall@k = 0 whenever there are at least k wrong items.

    Returns `i2t_recall@k` and `t2i_recall@k` for each k. Uses an (N, M) float32 similarity matrix.
    """
    image_emb, text_emb = _l2_normalize(np.asarray(image_emb)), _l2_normalize(np.asarray(text_emb))
    text_image = np.asarray(text_image)
    n, m = image_emb.shape[0], text_emb.shape[0]
    if text_image.shape != (m,) or not np.issubdtype(text_image.dtype, np.integer):
        raise ValueError(f"text_image must be {m} integer image indices, got {text_image.dtype}{text_image.shape}")
    if m == 0 or text_image.min() < 0 or text_image.max() >= n:
        raise ValueError(f"text_image must hold indices in [0, {n}) for at least one text")
    similarity = image_emb @ text_emb.T
    own = text_image[None, :] == np.arange(n)[:, None]  # (N, M): text j belongs to image i

    has_text = own.any(1)
    best_own = np.where(own, similarity, -np.inf).max(1, keepdims=True)
    i2t_rank = 1 + ((similarity >= best_own) & ~own).sum(1)[has_text]
    true_score = similarity[text_image, np.arange(m)]
    t2i_rank = (similarity >= true_score[None, :]).sum(0)  # counts the true image itself once
    result = {}
    for k in ks:
        result[f"i2t_recall@{k}"] = float(np.mean(i2t_rank <= k))
        result[f"t2i_recall@{k}"] = float(np.mean(t2i_rank <= k))
    return result


def zero_shot_accuracy(image_emb: np.ndarray, class_prompt_emb: Sequence[np.ndarray], labels: np.ndarray) -> float:
    """Zero-shot classification accuracy: each class is the normalised mean of its prompts' normalised embeddings,
    the prediction the class of highest cosine. Ties count against the model: an image is right only if its class
    scores strictly higher than every other class."""
    if not len(class_prompt_emb) or any(np.asarray(p).ndim != 2 or not len(p) for p in class_prompt_emb):
        raise ValueError("class_prompt_emb must be a non-empty list of (n_prompts, D) arrays, n_prompts >= 1")
    classes = _l2_normalize(np.stack([_l2_normalize(np.asarray(p)).mean(0) for p in class_prompt_emb]))
    labels = np.asarray(labels)
    image_emb = _l2_normalize(np.asarray(image_emb))
    if labels.shape != (image_emb.shape[0],) or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be one int class index per image ({image_emb.shape[0]}), got "
                         f"{labels.dtype}{labels.shape}")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"labels must lie in [0, {len(classes)})")
    similarity = image_emb @ classes.T
    true_score = similarity[np.arange(len(labels)), labels]
    return float(np.mean((similarity >= true_score[:, None]).sum(1) == 1))


# ---------------------------------------------------------------------------------------------- in evaluations


def evaluate_captions(scorer: ClipScorer, image_emb: np.ndarray, records: list[dict], *, dataset: str,
                      model_metrics: bool = False) -> dict:
    """The CLIP part of an evaluation (``Evaluator.run``): CLIPScore and RefCLIPScore of the captions, also
    written per caption record (``clip_score``); with ``model_metrics``, the scoring CLIP's own retrieval
    recall@1/5 between the images and their reference captions (``clip_i2t_recall@1``, ...) and, on the
    synthetic shapes data, its zero-shot probe accuracies (``clip_zero_shot_<probe>``,
    ``shapes_semantics.zero_shot_probes``). Retrieval and probes embed texts without the prompt, as the
    texts a CLIP is trained on."""
    captions = [r["caption"] for r in records]
    references = [r["references"] for r in records]
    scores = scorer.scores(image_emb, captions, references if all(references) else None)
    out = {k: v for k, v in scores.items() if not k.endswith("_per_image")}
    for r, value in zip(records, scores["clip_score_per_image"]):
        r["clip_score"] = float(value)
    if not model_metrics:
        return out
    texts = [t for refs in references for t in refs]
    owner = np.repeat(np.arange(len(records)), [len(refs) for refs in references])
    if texts:
        recall = retrieval_recall(image_emb, scorer.text_embeddings(texts, prompt=False), owner)
        out.update({f"clip_{k}": v for k, v in recall.items()})
    from ladic_jax.evaluation import shapes_semantics
    ids = [r["image_id"] for r in records]
    found = shapes_semantics.scenes_for_dataset(dataset, ids)
    if found is not None:
        row = {image_id: i for i, image_id in enumerate(ids)}
        for probe in shapes_semantics.zero_shot_probes(found[0]):
            if not probe.labels:
                continue
            rows = [row[i] for i in probe.labels]
            flat = scorer.text_embeddings([t for p in probe.prompts for t in p], prompt=False)
            prompts = np.split(flat, np.cumsum([len(p) for p in probe.prompts])[:-1])
            out[f"clip_zero_shot_{probe.name}"] = zero_shot_accuracy(
                image_emb[rows], prompts, np.asarray(list(probe.labels.values())))
    return out
