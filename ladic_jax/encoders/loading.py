"""Load pretrained HF encoders (BERT, DistilBERT, MiniLM, CLIP, CLIP/BLIP vision, CLIP-vision + BERT dual encoders)
into the Flax modules, strictly.

    pre = load_pretrained("openai/clip-vit-base-patch32", "clip")       # hub id, from the local HF cache
    pre = load_pretrained(minilm_dir(), "bert")                          # the embedded default text model
    logits = pre.module.apply({"params": pre.params}, ids, mask)

`kind` is one of `KINDS`, or "auto" to take it from config.json's `model_type`:

| model_type | auto kind | module |
|---|---|---|
| bert | bert | `Bert` (MLM head initialised and noted if the checkpoint has none, e.g. MiniLM) |
| distilbert | distilbert | `Bert` with DistilBERT names |
| clip | clip | `CLIP` |
| vision-text-dual-encoder | clip | `CLIP` with a `Bert` text tower (HF `VisionTextDualEncoderModel`, CLIP vision) |
| clip_vision_model | clip_vision | `ViT` |
| blip_vision_model, blip | blip_vision | `ViT` (BLIP variant) |

Kind "bert" also accepts a DistilBERT checkpoint; "clip_vision" accepts a full CLIP checkpoint or a dual encoder and
"blip_vision" a full BLIP one (e.g. `BlipForConditionalGeneration`): their vision tower is picked from `vision_model.`
(a dual encoder saved by transformers 4 has `vision_model.vision_model.`, which is recognised as well).
`pooler=True` (kinds "bert", "distilbert") also loads BERT's pooler (`pooler.dense.*`) into `pooler/{kernel,bias}`, or
initialises it to the identity (pooled = tanh(hidden[:, 0])) and notes so when the checkpoint has none. MiniLM has one:
`load_pretrained(minilm_dir(), "bert", pooler=True).params` minus `mlm_head` is exactly the tree of a `CLIP`'s BERT
`text_model`.
`subtree="prefix."` restricts reading to the tensors under that prefix (names relative to it) and ignores the rest.
A BLIP vision tower stored with timm names (`cls_token`, `blocks.N...`, as in the released LaDiC checkpoint under
`visual_encoder.`) is recognised too; with no config.json, pass `config=ViTConfig.blip_b16(224, 1e-6)`.
A vision config with `"stem": "conv"` (our conv stem, as written by `export.export_clip`) also reads the stem's
tensors `embeddings.stem.{i}.{conv,norm}.*` (table `VIT_CONV_STEM`).

Loading is strict (see `checkpoint_names.convert_checkpoint`): any missing, unused or mis-shaped tensor raises
`CheckpointMismatchError` naming them all. Deliberately skipped tensors (buffers, BERT pooler/NSP head) are listed
in `Pretrained.notes.ignored`; parameters the checkpoint has no tensors for (MLM head, pooler) in `notes.initialised`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ladic_jax.pretrained_paths import MINILM_PACKAGE, minilm_dir, resolve_alias  # noqa: F401
from ladic_jax.encoders import checkpoint_names as names
from ladic_jax.encoders.bert import Bert, BertConfig
from ladic_jax.encoders.checkpoint_files import read_checkpoint
from ladic_jax.encoders.clip import CLIP, DUAL_ENCODER_MODEL_TYPE, CLIPConfig
from ladic_jax.encoders.vit import ViT, ViTConfig

KINDS = ("bert", "distilbert", "clip", "clip_vision", "blip_vision")
_AUTO_KIND = {
    "bert": "bert", "distilbert": "distilbert", "clip": "clip", DUAL_ENCODER_MODEL_TYPE: "clip",
    "clip_vision_model": "clip_vision", "blip_vision_model": "blip_vision", "blip": "blip_vision",
}
_ACCEPTED_MODEL_TYPES = {
    "bert": {"bert", "distilbert"},
    "distilbert": {"distilbert"},
    "clip": {"clip", DUAL_ENCODER_MODEL_TYPE},
    "clip_vision": {"clip", "clip_vision_model", DUAL_ENCODER_MODEL_TYPE},
    "blip_vision": {"blip", "blip_vision_model"},
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
# Where a CLIP vision tower's tensors lie: transformers 4 saved a dual encoder's as `vision_model.vision_model.`.
_VISION_PREFIXES = ("vision_model.vision_model.", "vision_model.")


@dataclasses.dataclass
class LoadNotes:
    """What the loader did besides copying tensors one to one."""

    source: str
    files: list[str]
    subtree: str = ""
    initialised: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    renamed: list[str] = dataclasses.field(default_factory=list)
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    outside_subtree: int = 0


@dataclasses.dataclass
class Pretrained:
    """A loaded encoder: call `module.apply({"params": params}, ...)`."""

    module: nn.Module
    params: dict
    config: BertConfig | ViTConfig | CLIPConfig
    tokenizer: Any | None
    kind: str
    notes: LoadNotes


# ---------------------------------------------------------------------------------------------- locating files


def resolve_directory(name_or_path: str | Path, local_files_only: bool = True) -> Path:
    """A local checkpoint directory, or a hub id resolved through the huggingface_hub cache.

    With `local_files_only=True` (the default, and always in tests) nothing is downloaded.
    """
    path = Path(resolve_alias(name_or_path)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{name_or_path} is a file; pass the directory holding config.json and the weights")
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {name_or_path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, local_files_only=local_files_only, allow_patterns=_HUB_PATTERNS))
    except Exception as error:  # huggingface_hub raises several types (not cached, invalid id, offline)
        hint = " (pass local_files_only=False to download it)" if local_files_only else ""
        raise FileNotFoundError(
            f"{name_or_path!r} is not a directory and could not be resolved as a hub id in the local HF cache"
            f"{hint}: {type(error).__name__}: {error}"
        ) from error


# ---------------------------------------------------------------------------------------------- per-kind plans


@dataclasses.dataclass
class _Plan:
    """How to load one kind: the module, the rules over the (subtree-relative) names, and what else to do."""

    module: nn.Module
    dummy_inputs: tuple
    rules: list[names.Rule]
    ignore: tuple[tuple[str, str], ...] = names.BUFFERS
    duplicates: tuple[tuple[str, str, str | None], ...] = ()
    allow_uncovered: tuple[str, ...] = ()
    initialise: Callable[[dict[str, np.ndarray], dict], list[str]] | None = None
    init_method: Callable | None = None  # the module method to initialise the template with (None: __call__)


def _first_prefix(tensors: dict, candidates: tuple[str, ...], probe: str) -> str | None:
    return next((p for p in candidates if p + probe in tensors), None)


def bert_rules(config: BertConfig, source_prefix: str = "", target_prefix: str = "") -> list[names.Rule]:
    """Rules of a BERT's (or DistilBERT's) embeddings and layers, without MLM head or pooler."""
    if config.model_type == "distilbert":
        embeddings, layers = names.DISTILBERT_EMBEDDINGS, names.DISTILBERT_LAYERS
    else:
        embeddings = names.BERT_EMBEDDINGS + (names.BERT_TOKEN_TYPES if config.type_vocab_size else ())
        layers = names.BERT_LAYERS
    return (names.expand(embeddings, 0, source_prefix, target_prefix)
            + names.expand(layers, config.num_layers, source_prefix, target_prefix))


def _with_pooler(module: Bert, input_ids: jax.Array, attention_mask: jax.Array):
    """Initialises every parameter of `Bert`, the pooler included."""
    return module(input_ids, attention_mask), module.features(input_ids, attention_mask)


def _bert_plan(config: BertConfig, tensors: dict, tie_word_embeddings: bool, pooler: bool, kwargs: dict) -> _Plan:
    module = Bert(config, **kwargs)
    dummy = (jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))
    distil = config.model_type == "distilbert"
    body_candidates = ("distilbert.", "") if distil else ("bert.", "")
    body = _first_prefix(tensors, body_candidates, "embeddings.word_embeddings.weight")
    if body is None:
        raise names.CheckpointMismatchError(
            f"no {'DistilBERT' if distil else 'BERT'} word embeddings found: expected one of "
            f"{[p + 'embeddings.word_embeddings.weight' for p in body_candidates]}; "
            f"first names in the checkpoint: {sorted(tensors)[:8]}"
        )
    rules = bert_rules(config, body)
    if distil:
        head_rules = names.expand(names.DISTILBERT_HEAD)
        tied = {"mlm_head/decoder/kernel": body + "embeddings.word_embeddings.weight"}
        duplicates: tuple = ()
    else:
        head_prefix = "cls.predictions."
        head_rules = names.expand(names.BERT_HEAD, source_prefix=head_prefix)
        tied_bias = head_prefix + names.BERT_HEAD_TIED_BIAS
        tied = {"mlm_head/decoder/kernel": body + "embeddings.word_embeddings.weight",
                "mlm_head/decoder/bias": tied_bias}
        duplicates = ((tied_bias, head_prefix + "decoder.bias",
                       "HF's forward uses the decoder's own bias when the head is untied"),)
    if tie_word_embeddings:
        head_rules = [dataclasses.replace(r, fallback=tied.get(r.target)) for r in head_rules]
    ignore = names.BUFFERS + names.BERT_UNUSED
    uncovered: list[str] = []
    initialisers: list[Callable[[dict[str, np.ndarray]], str]] = []
    if any(r.source in tensors for r in head_rules):  # a partial head is then reported as missing tensors
        rules += head_rules
    else:  # no MLM head in the checkpoint (a bare BertModel such as MiniLM): initialise it and say so
        uncovered.append("mlm_head/")
        initialisers.append(lambda params: _init_mlm_head(params, config))
    if pooler:
        ignore = tuple(i for i in ignore if i != names.BERT_POOLER_UNUSED)
        pooler_rules = names.expand(names.BERT_POOLER, source_prefix=body)
        if any(r.source in tensors for r in pooler_rules):
            rules += pooler_rules
        else:
            uncovered.append("pooler/")
            initialisers.append(lambda params: _init_pooler(params, config))

    def initialise(params: dict[str, np.ndarray], template: dict) -> list[str]:
        return [init(params) for init in initialisers]

    return _Plan(module, dummy, rules, ignore, duplicates, tuple(uncovered), initialise if initialisers else None,
                 _with_pooler if pooler else None)


def _init_mlm_head(params: dict[str, np.ndarray], config: BertConfig) -> str:
    hidden = config.hidden_size
    params["mlm_head/transform/kernel"] = np.eye(hidden, dtype=np.float32)
    params["mlm_head/transform/bias"] = np.zeros(hidden, np.float32)
    params["mlm_head/transform_norm/scale"] = np.ones(hidden, np.float32)
    params["mlm_head/transform_norm/bias"] = np.zeros(hidden, np.float32)
    params["mlm_head/decoder/kernel"] = np.asarray(params["embeddings/word_embeddings/embedding"]).T.copy()
    params["mlm_head/decoder/bias"] = np.zeros(config.vocab_size, np.float32)
    return ("mlm head (checkpoint has none): transform = identity, transform_norm = (1, 0), "
            "decoder kernel = copy of the word embeddings, decoder bias = 0")


def _init_pooler(params: dict[str, np.ndarray], config: BertConfig) -> str:
    params["pooler/kernel"] = np.eye(config.hidden_size, dtype=np.float32)
    params["pooler/bias"] = np.zeros(config.hidden_size, np.float32)
    return "pooler (checkpoint has none): dense = identity, bias = 0, i.e. pooled = tanh(hidden[:, 0])"


def vit_rules(config: ViTConfig, table: tuple[names.Row, ...] = names.CLIP_VISION, source_prefix: str = "",
              target_prefix: str = "") -> list[names.Rule]:
    """Rules of a ViT by `table` (HF CLIP or BLIP names), plus those of our conv stem if `config.stem == "conv"`."""
    rules = names.expand(table, config.num_layers, source_prefix, target_prefix)
    if config.stem == "conv":  # log2(patch_size) stages, as in `ViTEmbeddings`
        stages = config.patch_size.bit_length() - 1
        rules += names.expand(names.VIT_CONV_STEM, stages, source_prefix, target_prefix)
    return rules


def clip_rules(config: CLIPConfig, vision_prefix: str = "vision_model.") -> list[names.Rule]:
    """Rules of a full HF `CLIPModel` checkpoint, or with a BERT text tower of a `VisionTextDualEncoderModel` one
    (used to load it and, run backwards, to export one)."""
    if config.bert_text:
        rules = bert_rules(config.text, "text_model.", "text_model/")
        rules += names.expand(names.BERT_POOLER, 0, "text_model.", "text_model/")
    else:
        rules = names.expand(names.CLIP_TEXT, config.text.num_layers, "text_model.", "text_model/")
    rules += vit_rules(config.vision, names.CLIP_VISION, vision_prefix, "vision_model/")
    return rules + names.expand(names.CLIP_HEADS)


def _vit_rules(config: ViTConfig, tensors: dict, blip: bool) -> list[names.Rule]:
    """CLIP names, or for BLIP its HF names or timm names (recognised by `cls_token`)."""
    if not blip:
        return vit_rules(config, names.CLIP_VISION)
    if "cls_token" in tensors:
        return names.expand(names.TIMM_VIT, config.num_layers)
    return vit_rules(config, names.BLIP_VISION)


def _plan(kind: str, config: Any, tensors: dict, hf_config: dict | None, pooler: bool, kwargs: dict) -> _Plan:
    if kind in ("bert", "distilbert"):
        tie = bool((hf_config or {}).get("tie_word_embeddings", True))
        return _bert_plan(config, tensors, tie, pooler, kwargs)
    if kind == "clip":
        module = CLIP(config, **kwargs)
        size = config.vision.image_size
        dummy = (jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, size, size, config.vision.num_channels)))
        vision_prefix = _first_prefix(tensors, _VISION_PREFIXES, "embeddings.patch_embedding.weight")
        return _Plan(module, dummy, clip_rules(config, vision_prefix or "vision_model."))
    module = ViT(config, **kwargs)
    dummy = (jnp.zeros((1, config.image_size, config.image_size, config.num_channels)),)
    return _Plan(module, dummy, _vit_rules(config, tensors, blip=kind == "blip_vision"))


def _config_for(kind: str, hf_config: dict) -> BertConfig | ViTConfig | CLIPConfig:
    if kind in ("bert", "distilbert"):
        return BertConfig.from_hf(hf_config)
    if kind == "clip":
        return CLIPConfig.from_hf(hf_config)
    if hf_config.get("model_type") == DUAL_ENCODER_MODEL_TYPE:
        return ViTConfig.from_hf(hf_config["vision_config"])
    return ViTConfig.from_hf(hf_config)


def _check_config_type(kind: str, config: Any) -> None:
    expected = {"bert": BertConfig, "distilbert": BertConfig, "clip": CLIPConfig,
                "clip_vision": ViTConfig, "blip_vision": ViTConfig}[kind]
    if not isinstance(config, expected):
        raise TypeError(f"kind {kind!r} needs a {expected.__name__}, got config of type {type(config).__name__}")
    if kind == "distilbert" and config.model_type != "distilbert":
        raise ValueError("kind 'distilbert' needs a BertConfig with model_type='distilbert'")
    if kind in ("clip_vision", "blip_vision") and config.pre_norm != (kind == "clip_vision"):
        raise ValueError(f"kind {kind!r} does not match the ViTConfig variant (pre_norm={config.pre_norm})")


# ---------------------------------------------------------------------------------------------- entry point


def load_pretrained(
    name_or_path: str | Path,
    kind: str = "auto",
    *,
    subtree: str | None = None,
    config: BertConfig | ViTConfig | CLIPConfig | None = None,
    pooler: bool = False,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    local_files_only: bool = True,
) -> Pretrained:
    """Loads an HF checkpoint (directory or hub id) into the matching Flax module; see the module docstring.

    `config` overrides config.json (needed when the directory has none); `subtree` picks the tensors under a name
    prefix; `pooler` (BERT kinds) loads or initialises BERT's pooler too; params are cast to `param_dtype`; the module
    computes in `dtype`.
    """
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
    directory = resolve_directory(name_or_path, local_files_only)
    config_path = directory / "config.json"
    hf_config = json.loads(config_path.read_text()) if config_path.exists() else None
    model_type = (hf_config or {}).get("model_type")
    if kind == "auto":
        if model_type not in _AUTO_KIND:
            raise ValueError(
                f"cannot infer the kind of {directory}: config.json model_type={model_type!r}; "
                f"pass kind= one of {KINDS}"
            )
        kind = _AUTO_KIND[model_type]
    if pooler and kind not in ("bert", "distilbert"):
        raise ValueError(f"pooler=True applies to kinds 'bert' and 'distilbert', not {kind!r}")
    if config is None:
        if hf_config is None:
            raise FileNotFoundError(f"{directory} has no config.json; pass config= explicitly")
        if model_type not in _ACCEPTED_MODEL_TYPES[kind]:
            raise ValueError(
                f"kind {kind!r} cannot load {directory}: its config.json has model_type={model_type!r}, "
                f"expected one of {sorted(_ACCEPTED_MODEL_TYPES[kind])}"
            )
        config = _config_for(kind, hf_config)
    _check_config_type(kind, config)

    tensors, files = read_checkpoint(directory)
    tensors, renamed = names.normalise_names(tensors)
    if subtree is None and kind in ("clip_vision", "blip_vision"):
        subtree = next((p for p in _VISION_PREFIXES if any(n.startswith(p) for n in tensors)), None)
    subtree = subtree or ""
    if subtree and not subtree.endswith("."):
        subtree += "."
    inside = {n[len(subtree):]: v for n, v in tensors.items() if n.startswith(subtree)}
    if not inside:
        tops = sorted({n.split(".")[0] + "." for n in tensors})
        raise names.CheckpointMismatchError(
            f"no tensor of {directory} lies under subtree {subtree!r}; top-level prefixes: {tops}"
        )

    plan = _plan(kind, config, inside, hf_config, pooler, dict(dtype=dtype, param_dtype=param_dtype))
    init = functools.partial(plan.module.init, method=plan.init_method)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0), *plan.dummy_inputs)["params"]
    template = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}
    conversion = names.convert_checkpoint(
        inside, plan.rules, template, ignore=plan.ignore, duplicates=plan.duplicates,
        allow_uncovered=plan.allow_uncovered,
        description=f"checkpoint {directory} (kind {kind!r}, subtree {subtree!r})",
    )
    flat = dict(conversion.params)
    initialised = plan.initialise(flat, template) if plan.initialise else []
    if set(flat) != set(template):
        raise AssertionError(f"internal: parameters left unfilled: {sorted(set(template) - set(flat))}")
    params = traverse_util.unflatten_dict(
        {tuple(k.split("/")): jnp.asarray(np.asarray(v), dtype=param_dtype) for k, v in flat.items()}
    )
    notes = LoadNotes(
        source=str(directory), files=[str(f) for f in files], subtree=subtree, initialised=initialised,
        ignored=conversion.ignored, renamed=renamed, fallbacks=conversion.fallbacks,
        outside_subtree=len(tensors) - len(inside),
    )
    return Pretrained(plan.module, params, config, _load_tokenizer(directory), kind, notes)


def _load_tokenizer(directory: Path) -> Any | None:
    """The HF (fast) tokenizer saved beside the weights, or None if the directory has no tokenizer files."""
    if not any((directory / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as error:
        raise ValueError(f"tokenizer files in {directory} could not be loaded: {type(error).__name__}: {error}") from error
