"""HF (and timm) checkpoint names -> Flax parameter paths, as readable tables.

Each table row is `(rule, checkpoint name, Flax path)`; `{i}` stands for the layer index. The rule says how the
PyTorch tensor(s) become Flax leaves:

| rule | checkpoint tensors | Flax leaves | conversion |
|---|---|---|---|
| `dense` | `NAME.weight`, `NAME.bias` | `PATH/kernel`, `PATH/bias` | weight (out, in) transposed to (in, out) |
| `dense_nobias` | `NAME.weight` | `PATH/kernel` | transposed |
| `norm` | `NAME.weight`, `NAME.bias` | `PATH/scale`, `PATH/bias` | as is |
| `embed` | `NAME.weight` | `PATH/embedding` | as is |
| `param` | `NAME` | `PATH` | leading singleton axes dropped ((1, 1, D) -> (D,)) |
| `conv` / `conv_nobias` | `NAME.weight` (+ `NAME.bias`) | `PATH/kernel` (+ `PATH/bias`) | (out, in, h, w) -> (h, w, in, out) |
| `qkv` | fused `NAME.weight` (3D, D), `NAME.bias` (3D) | `PATH/{query,key,value}/{kernel,bias}` | rows split in thirds (q, k, v), then transposed |

`expand` turns a table into `Rule`s (one per Flax leaf); `convert_checkpoint` applies them strictly, and
`export_checkpoint` runs them backwards (Flax leaves -> checkpoint tensors, each conversion's inverse is defined
next to it; the fused `qkv` rule has none).
Names of old checkpoints using `LayerNorm.gamma` / `LayerNorm.beta` are renamed to `.weight` / `.bias` first
(`normalise_names`).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

Convert = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
Invert = Callable[[np.ndarray], np.ndarray]
Row = tuple[str, str, str]

# ---------------------------------------------------------------------------------------------- conversions


def _keep(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return x


def _keep_back(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return x.T if x.ndim == 2 else x  # a non-matrix is left as is, to be reported as a shape mismatch


def _transpose_back(x: np.ndarray) -> np.ndarray:
    return x.T


def _conv_kernel(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x


def _conv_kernel_back(x: np.ndarray) -> np.ndarray:
    return x.transpose(3, 2, 0, 1)  # (h, w, in, out) -> (out, in, h, w)


def _drop_leading_ones(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    extra = x.ndim - len(shape)
    if extra > 0 and x.shape[:extra] == (1,) * extra:
        return x.reshape(x.shape[extra:])
    return x


def _drop_leading_ones_back(x: np.ndarray) -> np.ndarray:
    # Written in the Flax shape, which is HF's for CLIP/BLIP ((D,), (N, D), ()); timm's (1, N, D) is not an export
    # target.
    return x


# conversion -> its inverse (Flax leaf -> checkpoint tensor), for `export_checkpoint`.
_INVERSES: dict[Convert, Invert] = {
    _keep: _keep_back, _transpose: _transpose_back, _conv_kernel: _conv_kernel_back,
    _drop_leading_ones: _drop_leading_ones_back,
}


def _qkv_part(part: int, weight: bool) -> Convert:
    def convert(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if x.shape[0] % 3:
            return x  # reported as a shape mismatch
        third = x.shape[0] // 3
        piece = x[part * third:(part + 1) * third]
        return piece.T if weight and piece.ndim == 2 else piece
    return convert


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Flax leaf filled from one checkpoint tensor (or from `fallback` when `source` is absent)."""

    source: str
    target: str
    convert: Convert = _keep
    fallback: str | None = None

    def export(self, value: np.ndarray) -> np.ndarray:
        """The checkpoint tensor `source` for the Flax leaf value: the inverse of `convert`."""
        inverse = _INVERSES.get(self.convert)
        if inverse is None:
            raise ValueError(f"{self.target} -> {self.source}: this conversion (e.g. a fused qkv part) cannot be "
                             "exported leaf by leaf")
        return inverse(value)


def expand(
    table: Iterable[Row], num_layers: int = 0, source_prefix: str = "", target_prefix: str = ""
) -> list[Rule]:
    """Table rows -> Rules; rows containing `{i}` are repeated for i in range(num_layers)."""
    rules: list[Rule] = []
    for kind, name, path in table:
        indices = range(num_layers) if "{i}" in name or "{i}" in path else [None]
        for i in indices:
            src = source_prefix + (name.format(i=i) if i is not None else name)
            dst = target_prefix + (path.format(i=i) if i is not None else path)
            rules.extend(_row_rules(kind, src, dst))
    return rules


def _row_rules(kind: str, src: str, dst: str) -> list[Rule]:
    if kind == "dense":
        return [Rule(f"{src}.weight", f"{dst}/kernel", _transpose), Rule(f"{src}.bias", f"{dst}/bias")]
    if kind == "dense_nobias":
        return [Rule(f"{src}.weight", f"{dst}/kernel", _transpose)]
    if kind == "norm":
        return [Rule(f"{src}.weight", f"{dst}/scale"), Rule(f"{src}.bias", f"{dst}/bias")]
    if kind == "embed":
        return [Rule(f"{src}.weight", f"{dst}/embedding")]
    if kind == "param":
        return [Rule(src, dst, _drop_leading_ones)]
    if kind == "conv":
        return [Rule(f"{src}.weight", f"{dst}/kernel", _conv_kernel), Rule(f"{src}.bias", f"{dst}/bias")]
    if kind == "conv_nobias":
        return [Rule(f"{src}.weight", f"{dst}/kernel", _conv_kernel)]
    if kind == "qkv":
        rules = []
        for part, leaf in enumerate(("query", "key", "value")):
            rules.append(Rule(f"{src}.weight", f"{dst}/{leaf}/kernel", _qkv_part(part, weight=True)))
            rules.append(Rule(f"{src}.bias", f"{dst}/{leaf}/bias", _qkv_part(part, weight=False)))
        return rules
    raise ValueError(f"unknown table rule {kind!r} for {src}")


# ---------------------------------------------------------------------------------------------- BERT family

BERT_EMBEDDINGS: tuple[Row, ...] = (
    ("embed", "embeddings.word_embeddings", "embeddings/word_embeddings"),
    ("embed", "embeddings.position_embeddings", "embeddings/position_embeddings"),
    ("norm", "embeddings.LayerNorm", "embeddings/layer_norm"),
)
BERT_TOKEN_TYPES: tuple[Row, ...] = (
    ("embed", "embeddings.token_type_embeddings", "embeddings/token_type_embeddings"),
)
BERT_LAYERS: tuple[Row, ...] = (
    ("dense", "encoder.layer.{i}.attention.self.query", "layers_{i}/attention/query"),
    ("dense", "encoder.layer.{i}.attention.self.key", "layers_{i}/attention/key"),
    ("dense", "encoder.layer.{i}.attention.self.value", "layers_{i}/attention/value"),
    ("dense", "encoder.layer.{i}.attention.output.dense", "layers_{i}/attention/out"),
    ("norm", "encoder.layer.{i}.attention.output.LayerNorm", "layers_{i}/attention_norm"),
    ("dense", "encoder.layer.{i}.intermediate.dense", "layers_{i}/intermediate"),
    ("dense", "encoder.layer.{i}.output.dense", "layers_{i}/output"),
    ("norm", "encoder.layer.{i}.output.LayerNorm", "layers_{i}/output_norm"),
)
# Under `cls.predictions.`. When tied (config `tie_word_embeddings`, the default) HF saves neither `decoder.weight`
# (= the word embeddings) nor `decoder.bias` (= `cls.predictions.bias`); the loader then reads those instead, as
# transformers 5 does. HF's forward uses `decoder.bias`; `cls.predictions.bias` is only its tied twin.
BERT_HEAD: tuple[Row, ...] = (
    ("dense", "transform.dense", "mlm_head/transform"),
    ("norm", "transform.LayerNorm", "mlm_head/transform_norm"),
    ("dense", "decoder", "mlm_head/decoder"),
)
BERT_HEAD_TIED_BIAS = "bias"
# HF `BertModel.pooler` (tanh(dense(hidden[:, 0]))): read only when asked for (a dual encoder's text tower, or
# `load_pretrained(..., pooler=True)`); otherwise ignored as in `BERT_UNUSED`.
BERT_POOLER: tuple[Row, ...] = (
    ("dense", "pooler.dense", "pooler"),
)

DISTILBERT_EMBEDDINGS: tuple[Row, ...] = BERT_EMBEDDINGS
DISTILBERT_LAYERS: tuple[Row, ...] = (
    ("dense", "transformer.layer.{i}.attention.q_lin", "layers_{i}/attention/query"),
    ("dense", "transformer.layer.{i}.attention.k_lin", "layers_{i}/attention/key"),
    ("dense", "transformer.layer.{i}.attention.v_lin", "layers_{i}/attention/value"),
    ("dense", "transformer.layer.{i}.attention.out_lin", "layers_{i}/attention/out"),
    ("norm", "transformer.layer.{i}.sa_layer_norm", "layers_{i}/attention_norm"),
    ("dense", "transformer.layer.{i}.ffn.lin1", "layers_{i}/intermediate"),
    ("dense", "transformer.layer.{i}.ffn.lin2", "layers_{i}/output"),
    ("norm", "transformer.layer.{i}.output_layer_norm", "layers_{i}/output_norm"),
)
# At the checkpoint root of DistilBertForMaskedLM; `vocab_projector.weight` may be absent (tied).
DISTILBERT_HEAD: tuple[Row, ...] = (
    ("dense", "vocab_transform", "mlm_head/transform"),
    ("norm", "vocab_layer_norm", "mlm_head/transform_norm"),
    ("dense", "vocab_projector", "mlm_head/decoder"),
)

# ---------------------------------------------------------------------------------------------- ViT / CLIP

# The pre-LayerNorm block, shared by CLIP's towers and BLIP's vision tower (HF names).
CLIP_LAYERS: tuple[Row, ...] = (
    ("norm", "encoder.layers.{i}.layer_norm1", "layers_{i}/layer_norm1"),
    ("dense", "encoder.layers.{i}.self_attn.q_proj", "layers_{i}/attention/query"),
    ("dense", "encoder.layers.{i}.self_attn.k_proj", "layers_{i}/attention/key"),
    ("dense", "encoder.layers.{i}.self_attn.v_proj", "layers_{i}/attention/value"),
    ("dense", "encoder.layers.{i}.self_attn.out_proj", "layers_{i}/attention/out"),
    ("norm", "encoder.layers.{i}.layer_norm2", "layers_{i}/layer_norm2"),
    ("dense", "encoder.layers.{i}.mlp.fc1", "layers_{i}/mlp/fc1"),
    ("dense", "encoder.layers.{i}.mlp.fc2", "layers_{i}/mlp/fc2"),
)
CLIP_VISION: tuple[Row, ...] = (
    ("param", "embeddings.class_embedding", "embeddings/class_embedding"),
    ("conv_nobias", "embeddings.patch_embedding", "embeddings/patch_embedding"),
    ("param", "embeddings.position_embedding.weight", "embeddings/position_embedding"),
    ("norm", "pre_layrnorm", "pre_layer_norm"),  # sic: HF's attribute name
    *CLIP_LAYERS,
    ("norm", "post_layernorm", "post_layer_norm"),
)
CLIP_TEXT: tuple[Row, ...] = (
    ("embed", "embeddings.token_embedding", "embeddings/token_embedding"),
    ("embed", "embeddings.position_embedding", "embeddings/position_embedding"),
    *CLIP_LAYERS,
    ("norm", "final_layer_norm", "final_layer_norm"),
)
# Our convolutional stem (`ViTConfig(stem="conv")`), which HF CLIP does not have: used only for such configs, with
# `{i}` over the log2(patch_size) stages; the 1x1 projection after it keeps the name `embeddings.patch_embedding`.
# transformers' CLIPModel cannot load a checkpoint holding these tensors; `load_pretrained` can.
VIT_CONV_STEM: tuple[Row, ...] = (
    ("conv", "embeddings.stem.{i}.conv", "embeddings/stem_{i}"),
    ("norm", "embeddings.stem.{i}.norm", "embeddings/stem_norm_{i}"),
)
CLIP_HEADS: tuple[Row, ...] = (
    ("dense_nobias", "visual_projection", "visual_projection"),
    ("dense_nobias", "text_projection", "text_projection"),
    ("param", "logit_scale", "logit_scale"),
)

BLIP_VISION: tuple[Row, ...] = (
    ("param", "embeddings.class_embedding", "embeddings/class_embedding"),
    ("conv", "embeddings.patch_embedding", "embeddings/patch_embedding"),
    ("param", "embeddings.position_embedding", "embeddings/position_embedding"),
    ("norm", "encoder.layers.{i}.layer_norm1", "layers_{i}/layer_norm1"),
    ("qkv", "encoder.layers.{i}.self_attn.qkv", "layers_{i}/attention"),
    ("dense", "encoder.layers.{i}.self_attn.projection", "layers_{i}/attention/out"),
    ("norm", "encoder.layers.{i}.layer_norm2", "layers_{i}/layer_norm2"),
    ("dense", "encoder.layers.{i}.mlp.fc1", "layers_{i}/mlp/fc1"),
    ("dense", "encoder.layers.{i}.mlp.fc2", "layers_{i}/mlp/fc2"),
    ("norm", "post_layernorm", "post_layer_norm"),
)
# timm VisionTransformer names, as in the BLIP ViT-B/16 inside the released LaDiC checkpoint (`visual_encoder.`).
TIMM_VIT: tuple[Row, ...] = (
    ("param", "cls_token", "embeddings/class_embedding"),
    ("conv", "patch_embed.proj", "embeddings/patch_embedding"),
    ("param", "pos_embed", "embeddings/position_embedding"),
    ("norm", "blocks.{i}.norm1", "layers_{i}/layer_norm1"),
    ("qkv", "blocks.{i}.attn.qkv", "layers_{i}/attention"),
    ("dense", "blocks.{i}.attn.proj", "layers_{i}/attention/out"),
    ("norm", "blocks.{i}.norm2", "layers_{i}/layer_norm2"),
    ("dense", "blocks.{i}.mlp.fc1", "layers_{i}/mlp/fc1"),
    ("dense", "blocks.{i}.mlp.fc2", "layers_{i}/mlp/fc2"),
    ("norm", "norm", "post_layer_norm"),
)

# ---------------------------------------------------------------------------------------------- ignored tensors

# Checkpoint tensors that are deliberately not loaded: (regex on the name, reason). Anything else unmapped is an error.
BUFFERS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)position_ids$", "position-id buffer, not a parameter"),
    (r"(^|\.)token_type_ids$", "token-type-id buffer, not a parameter"),
)
BERT_POOLER_UNUSED = (r"^(bert\.)?pooler\.", "BERT pooler (classification / NSP), not asked for")
BERT_UNUSED: tuple[tuple[str, str], ...] = (
    BERT_POOLER_UNUSED,
    (r"^cls\.seq_relationship\.", "next-sentence-prediction head"),
)

_OLD_LAYER_NORM = re.compile(r"(LayerNorm|layer_norm)\.(gamma|beta)$")


def normalise_names(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Renames `*.LayerNorm.gamma/beta` (old TF-converted checkpoints) to `.weight/.bias`; returns the renames."""
    out: dict[str, np.ndarray] = {}
    renamed: list[str] = []
    for name, value in tensors.items():
        new = _OLD_LAYER_NORM.sub(lambda m: f"{m.group(1)}.{'weight' if m.group(2) == 'gamma' else 'bias'}", name)
        if new != name:
            renamed.append(f"{name} -> {new}")
            if new in tensors:
                raise ValueError(f"checkpoint holds both {name!r} and {new!r}")
        out[new] = value
    return out, renamed


# ---------------------------------------------------------------------------------------------- strict conversion


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not correspond one-to-one to the module's parameters."""


@dataclasses.dataclass
class Conversion:
    """Result of `convert_checkpoint`: flat params ("a/b/c" -> array) and what was done on the way."""

    params: dict[str, np.ndarray]
    ignored: list[str]
    fallbacks: list[str]


def convert_checkpoint(
    tensors: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    template: Mapping[str, tuple[int, ...]],
    *,
    ignore: Sequence[tuple[str, str]] = BUFFERS,
    duplicates: Sequence[tuple[str, str, str | None]] = (),
    allow_uncovered: Sequence[str] = (),
    description: str = "checkpoint",
) -> Conversion:
    """Fills every leaf of `template` (flat path -> shape) from `tensors` by `rules`, strictly.

    Raises `CheckpointMismatchError` listing, all at once: checkpoint tensors a rule needs but the checkpoint lacks,
    checkpoint tensors no rule uses (unless matched by an `ignore` regex, or listed in `duplicates` as
    `(name, same_as, reason)`: skipped if equal to the used tensor `same_as`, or if different and `reason` explains
    why that is harmless; `reason=None` makes a difference an error), converted shapes that differ from the parameter's, rules pointing at no parameter, and
    parameters no rule fills (unless under a path prefix in `allow_uncovered`, which the caller fills itself).
    """
    params: dict[str, np.ndarray] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    unknown_targets: list[str] = []
    fallbacks: list[str] = []
    for rule in rules:
        if rule.target not in template:
            unknown_targets.append(f"{rule.source} -> {rule.target}")
            continue
        source = rule.source
        if source not in tensors and rule.fallback is not None and rule.fallback in tensors:
            fallbacks.append(f"{rule.target} <- {rule.fallback} (no {rule.source})")
            source = rule.fallback
        if source not in tensors:
            missing.append(f"{rule.source} -> {rule.target}")
            continue
        used.add(source)
        raw = np.asarray(tensors[source])
        value = rule.convert(raw, template[rule.target])
        if tuple(value.shape) != tuple(template[rule.target]):
            mismatched.append(
                f"{source}: checkpoint shape {tuple(raw.shape)} converts to {tuple(value.shape)}, "
                f"parameter {rule.target} has shape {tuple(template[rule.target])}"
            )
            continue
        params[rule.target] = value

    ignored: list[str] = []
    unused: list[str] = []
    for name in sorted(set(tensors) - used):
        reason = next((why for pattern, why in ignore if re.search(pattern, name)), None)
        if reason is not None:
            ignored.append(f"{name} ({reason})")
            continue
        duplicate = next((d for d in duplicates if d[0] == name and d[1] in used), None)
        if duplicate is not None:
            _, same_as, reason_if_different = duplicate
            if np.array_equal(np.asarray(tensors[name]), np.asarray(tensors[same_as])):
                ignored.append(f"{name} (duplicate of {same_as})")
            elif reason_if_different is not None:
                ignored.append(f"{name} (differs from {same_as}: {reason_if_different})")
            else:
                unused.append(f"{name} {tuple(np.shape(tensors[name]))} (differs from {same_as}, should equal it)")
            continue
        unused.append(f"{name} {tuple(np.shape(tensors[name]))}")

    filled = set(params) | {r.target for r in rules if r.target in template}
    uncovered = [
        path for path in sorted(template)
        if path not in filled and not any(path.startswith(prefix) for prefix in allow_uncovered)
    ]

    _raise_problems(f"{description} does not match the module", (
        ("missing tensors (needed by a parameter, absent from the checkpoint)", missing),
        ("unused tensors (in the checkpoint, mapped to no parameter)", unused),
        ("shape mismatches", mismatched),
        ("table rules naming no parameter of the module", unknown_targets),
        ("parameters no table rule fills", uncovered),
    ))
    return Conversion(params=params, ignored=ignored, fallbacks=fallbacks)


def _raise_problems(headline: str, sections: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Raises `CheckpointMismatchError` listing every non-empty (title, items) section, if any."""
    problems = [f"  {title}:\n" + "\n".join(f"    {item}" for item in items) for title, items in sections if items]
    if problems:
        raise CheckpointMismatchError(f"{headline}:\n" + "\n".join(problems))


def export_checkpoint(
    params: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    template: Mapping[str, tuple[int, ...]],
    *,
    description: str = "params",
) -> dict[str, np.ndarray]:
    """The inverse of `convert_checkpoint`: flat params ("a/b/c" -> array) -> checkpoint tensors by name, strictly.

    Raises `CheckpointMismatchError` listing, all at once: leaves of `template` absent from `params`, leaves of
    `params` not in `template`, leaves whose shape differs from the template's, and (table errors) template leaves
    no rule fills, rules naming no leaf, and checkpoint names written by more than one rule.
    """
    missing = [f"{path} {tuple(shape)}" for path, shape in sorted(template.items()) if path not in params]
    extra = [f"{path} {tuple(np.shape(params[path]))}" for path in sorted(set(params) - set(template))]
    mismatched = [
        f"{path}: shape {tuple(np.shape(params[path]))}, expected {tuple(template[path])}"
        for path in sorted(set(params) & set(template)) if tuple(np.shape(params[path])) != tuple(template[path])
    ]
    unknown_targets = [f"{r.target} -> {r.source}" for r in rules if r.target not in template]
    covered = {r.target for r in rules}
    uncovered = [path for path in sorted(template) if path not in covered]
    repeated = sorted(name for name, n in collections.Counter(r.source for r in rules).items() if n > 1)
    _raise_problems(f"{description} do not match the module", (
        ("missing parameters (expected by the module, absent)", missing),
        ("extra parameters (not in the module)", extra),
        ("shape mismatches", mismatched),
        ("parameters no table rule exports", uncovered),
        ("table rules naming no parameter of the module", unknown_targets),
        ("checkpoint names written by several rules", repeated),
    ))
    return {r.source: np.asarray(r.export(np.asarray(params[r.target])), order="C") for r in rules}
