"""Semantic accuracy of captions on the synthetic `shapes_captions` data, and zero-shot probes (DESIGN §8).

The generator knows every scene, so a generated caption can be read back and checked object by object:

1. `scenes_for_dataset` regenerates the objects of evaluation images from their ids (no rendering).
2. `parse_caption` reads a caption in the language of the generator's templates into objects, relations and
   stated counts (rules in its docstring).
3. `score_captions` scores parsed captions against their scenes; `per_caption` says, per image, whether its
   caption is fully correct and if not why.
4. `zero_shot_probes` defines colour / shape / size / object / count classification probes, with prompts in
   the generator's own phrasing, for a CLIP-like model trained on this data.

Only numpy and `ladic_jax.data.shapes` are imported here; the TFDS builder (for its configs) is imported
when a function needs it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from ladic_jax.data import shapes

SceneObject = shapes.SceneObject
Relation = tuple[str, str, str]  # (subject colour, "left" | "right" | "above" | "below", reference colour)

# ---------------------------------------------------------------------------------------------------------
# Scenes of evaluation images.
# ---------------------------------------------------------------------------------------------------------


def scenes_for_dataset(dataset: str, image_ids: Iterable[int]
                       ) -> tuple[dict[int, list[SceneObject]], int] | None:
    """The objects of each image and the scenes' `gap`, or None if `dataset` is not `shapes_captions`.

    `dataset` is a TFDS name: "shapes_captions" (= "/default"), "shapes_captions/long", optionally with
    ":version". The scene of image id `_ID_STRIDE * (k + 1) + i` (split k, index i) is drawn exactly as the
    builder draws it: `sample_scene` is the first use of the generator seeded by (config seed, k, i).
    Raises ValueError for an unknown config or an id outside the config's splits.
    """
    name, _, config_name = dataset.split(":")[0].partition("/")
    if name != "shapes_captions":
        return None
    from ladic_jax.data import shapes_captions as sc  # Imports TFDS: only when needed.

    configs = {c.name: c for c in sc.CONFIGS}
    config = configs.get(config_name or "default")
    if config is None:
        raise ValueError(f"unknown shapes_captions config {config_name!r} in {dataset!r}; "
                         f"choose one of {sorted(configs)}")
    scenes = {}
    for image_id in image_ids:
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            raise ValueError(f"image id {image_id!r} of {dataset!r} is not an integer")
        stream, index = divmod(int(image_id), sc._ID_STRIDE)
        stream -= 1
        if not 0 <= stream < len(sc._SPLITS) or index >= config.split_sizes[sc._SPLITS[stream]]:
            raise ValueError(f"image id {int(image_id)} is not an image of {dataset!r} (split sizes "
                             f"{dict(config.split_sizes)}, ids {sc._ID_STRIDE} * (split + 1) + index)")
        # As in shapes.generate_example.
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, stream, index]))
        scenes[int(image_id)] = shapes.sample_scene(rng, config.scene)
    return scenes, config.scene.gap


# ---------------------------------------------------------------------------------------------------------
# Parsing.
# ---------------------------------------------------------------------------------------------------------

_SIZE_OF = {w: size for size, words in shapes._SIZE_WORDS.items() for w in words}
# Glue words of the relation phrases ("to the left of"); what remains is one word per phrase.
_RELATION_GLUE = frozenset({"to", "the", "on", "of"})
_RELATION_OF = {w: r for r, phrases in shapes._RELATION_WORDS.items()
                for phrase in phrases for w in phrase.split() if w not in _RELATION_GLUE}
_NUMBER_OF = {w: n for n, w in enumerate(shapes._NUMBER_WORDS)}
# Words that may come between a relation word and its object ("left of the ...", "above a single ...").
_OBJECT_LEAD = frozenset({"a", "an", "the", "of", "one", "single"})
# Every other word of the templates that names nothing: articles, verbs, openers, "on a plain background".
_FILLER = _OBJECT_LEAD | _RELATION_GLUE | {
        "there", "is", "are", "sits", "and", "with", "this", "picture", "shows", "shown", "image", "plain",
        "background"}


@dataclasses.dataclass(frozen=True)
class Mention:
    """An object named by a caption; `size` is None when never said; `conflict` when mentions disagree."""

    color: str
    shape: str
    size: str | None
    conflict: bool = False


@dataclasses.dataclass(frozen=True)
class Parsed:
    """What a caption says: objects in order of first mention, relations as stated, every count stated."""

    objects: tuple[Mention, ...]
    relations: tuple[Relation, ...]
    counts: tuple[int, ...]


def parse_caption(text: str) -> Parsed | None:
    """Reads a caption in the generator's language; None if it does not read as a description.

    Rules:
    - Words are the runs of [a-z0-9] of the lower-cased text; a word repeated right after itself counts once
      ("a a red red circle").
    - An object is [size] colour shape, with any articles before it; size and colour may come in either
      order. Sizes: small/little, large/big. Colours and shapes: the generator's. No plural forms.
    - Objects are identified by colour (colours are unique in a scene): a later mention of a colour is the
      same object. It may add a size not said before; if it says another shape or size, the object is kept
      with its first description and marked `conflict` (scored as wrong).
    - A relation word (left, right, above, over, below, under, beneath, with the glue "to the ... of",
      "on the ... of" optional) relates the last object named before it (its subject) to the next object
      (its reference), which must follow with only articles or "of" between: "a red circle to the left of
      a blue square and a green triangle above the blue square" states (red, left, blue) and
      (green, above, blue). Objects joined by "and", "with" or nothing stand in no stated relation.
    - "<number> shapes" ("two shapes", "there are four shapes", "five shapes are shown") states a count.
      "a single" and "one" before an object are articles, not counts.
    - The template words that name nothing ("there is", "sits", "is", "and", "with", "an image of",
      "a picture with", "this picture shows", "on a plain background", ...) may come anywhere between
      objects and are ignored, so a truncated ending such as "... on a plain" still reads.
    Unparseable (None): no object; any word outside this language (including a number not followed by
    "shapes"); a size or colour not completed by a shape ("a large red"); a shape without a colour; two
    colours or two sizes in one object; a relation with no subject before it, with anything but articles
    between it and its reference, or with no reference at all ("a large red circle to the left of a").
    """
    words = re.findall(r"[a-z0-9]+", text.lower())
    words = [w for i, w in enumerate(words) if i == 0 or w != words[i - 1]]
    objects: dict[str, Mention] = {}
    relations: list[Relation] = []
    counts: list[int] = []
    size = color = None  # The object being read.
    subject = None  # Colour of the last object read: the subject of a relation word that follows.
    pending = None  # A relation read whose reference has not come yet.
    i = 0
    while i < len(words):
        w = words[i]
        if w in _SIZE_OF:
            if size not in (None, _SIZE_OF[w]):
                return None
            size = _SIZE_OF[w]
        elif w in shapes.COLORS:
            if color not in (None, w):
                return None
            color = w
        elif w in shapes.SHAPES:
            if color is None:
                return None
            old = objects.get(color)
            if old is None:
                objects[color] = Mention(color, w, size)
            else:
                conflict = (old.conflict or old.shape != w
                            or (None not in (old.size, size) and old.size != size))
                objects[color] = Mention(color, old.shape, old.size or size, conflict)
            if pending is not None:
                relations.append((subject, pending, color))
            subject, pending, size, color = color, None, None, None
        elif size is not None or color is not None:
            return None  # An object left unfinished.
        elif w in _RELATION_OF:
            if subject is None or pending is not None:
                return None
            pending = _RELATION_OF[w]
        elif pending is not None:
            if w not in _OBJECT_LEAD:
                return None
        elif w in _NUMBER_OF and i + 1 < len(words) and words[i + 1] == "shapes":
            counts.append(_NUMBER_OF[w])
            i += 1
        elif w not in _FILLER:
            return None
        i += 1
    if size is not None or color is not None or pending is not None or not objects:
        return None
    return Parsed(tuple(objects.values()), tuple(relations), tuple(counts))


# ---------------------------------------------------------------------------------------------------------
# Scores.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Judgement:
    """One caption against its scene: the counts that `score_captions` sums, and the reasons it is wrong."""

    parsed: bool
    true_positives: int
    mentioned: int
    in_scene: int
    attributes_right: int
    attributes_judged: int
    relations_right: int
    relations_stated: int
    count_right: bool | None  # None: no count stated.
    reasons: list[str]


def _judge(caption: str, scene: list[SceneObject], gap: int) -> _Judgement:
    by_color = {o.color: o for o in scene}
    parsed = parse_caption(caption)
    if parsed is None:
        return _Judgement(False, 0, 0, len(scene), 0, 0, 0, 0, None, ["unparseable"])
    reasons = []
    tp = right = judged = 0
    for m in parsed.objects:
        o = by_color.get(m.color)
        if o is None:
            reasons.append(f"no {m.color} object")
            continue
        judged += 1
        tp += int(o.shape == m.shape and not m.conflict)
        if m.conflict:
            reasons.append(f"{m.color}: contradictory mentions")
        elif o.shape != m.shape:
            reasons.append(f"{m.color}: said {m.shape}, is {o.shape}")
        elif m.size not in (None, o.size):
            reasons.append(f"{m.color}: said {m.size}, is {o.size}")
        else:
            right += 1
    said = {m.color for m in parsed.objects}
    reasons += [f"missing {o.size} {o.color} {o.shape}" for o in scene if o.color not in said]
    relations_right = 0
    for a, r, b in parsed.relations:
        if a in by_color and b in by_color and r in shapes.holding_relations(by_color[a], by_color[b], gap):
            relations_right += 1
        else:
            reasons.append(f"false: {a} {r} {b}")
    count_right = None
    if parsed.counts:
        count_right = all(n == len(scene) for n in parsed.counts)
        if not count_right:
            reasons.append(f"count {'/'.join(map(str, parsed.counts))}, scene has {len(scene)}")
    return _Judgement(True, tp, len(parsed.objects), len(scene), right, judged, relations_right,
                      len(parsed.relations), count_right, reasons)


def _judge_all(predictions: Mapping[int, str], scenes: Mapping[int, list[SceneObject]], gap: int
               ) -> dict[int, _Judgement]:
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [i for i in predictions if i not in scenes]
    if missing:
        raise ValueError(f"no scene for image id {missing[0]} ({len(missing)} ids without a scene)")
    return {i: _judge(caption, scenes[i], gap) for i, caption in predictions.items()}


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def score_captions(predictions: Mapping[int, str], scenes: Mapping[int, list[SceneObject]], gap: int
                   ) -> dict[str, float | None]:
    """Semantic scores of one caption per image (every id of `predictions` needs a scene).

    - sem_object_precision / recall / f1: a mentioned object is a true positive if the scene has an object
      of its colour and shape (size not needed) and its mentions do not contradict each other. Micro-averaged:
      true positives over all objects mentioned (precision), over all scene objects (recall).
    - sem_attribute_accuracy: of the mentioned objects whose colour is in the scene, those with the right
      shape, the right size when a size is said, and no contradiction.
    - sem_relation_accuracy: of the stated relations, those whose two objects are in the scene and for which
      `shapes.holding_relations(subject, reference, gap)` holds.
    - sem_count_accuracy: of the captions stating a count, those whose every stated count is the scene's.
    - sem_fully_correct: captions that parse, name every scene object and nothing else with the right shape
      and any size said, state only true relations and only the right count.
    - sem_unparseable: captions that `parse_caption` rejects.
    An unparseable caption is wrong: it adds its scene's objects to recall's denominator and counts in the
    fully-correct and unparseable fractions; as it states nothing readable it adds nothing to the
    denominators of precision, attribute, relation and count accuracy. A ratio with an empty denominator
    (no object, relation or count stated anywhere) is None.
    """
    judged = list(_judge_all(predictions, scenes, gap).values())

    def total(field):
        return sum(getattr(j, field) for j in judged)

    precision = _ratio(total("true_positives"), total("mentioned"))
    recall = _ratio(total("true_positives"), total("in_scene"))
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    counts = [j.count_right for j in judged if j.count_right is not None]
    return {
            "sem_object_precision": precision,
            "sem_object_recall": recall,
            "sem_object_f1": f1,
            "sem_attribute_accuracy": _ratio(total("attributes_right"), total("attributes_judged")),
            "sem_relation_accuracy": _ratio(total("relations_right"), total("relations_stated")),
            "sem_count_accuracy": _ratio(sum(counts), len(counts)),
            "sem_fully_correct": sum(not j.reasons for j in judged) / len(judged),
            "sem_unparseable": sum(not j.parsed for j in judged) / len(judged),
    }


class Verdict(NamedTuple):
    """Whether a caption is fully correct, and if not why ("unparseable", "red: said square, is circle")."""

    correct: bool
    reason: str


def per_caption(predictions: Mapping[int, str], scenes: Mapping[int, list[SceneObject]], gap: int
                ) -> dict[int, Verdict]:
    """Per image: fully correct (as in `score_captions`) or not, with every reason joined by "; "."""
    return {i: Verdict(not j.reasons, "; ".join(j.reasons) or "ok")
            for i, j in _judge_all(predictions, scenes, gap).items()}


# ---------------------------------------------------------------------------------------------------------
# Zero-shot probes.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Probe:
    """A zero-shot classification task: classes, their prompts, and the true class of each image it covers.

    A class embedding is the mean of its prompts' normalised text embeddings; `labels` maps an image id to
    the index of its class in `classes` and holds only the images the probe applies to.
    """

    name: str
    classes: list[str]
    prompts: list[list[str]]
    labels: dict[int, int]


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def zero_shot_probes(scenes: Mapping[int, list[SceneObject]], rng_seed: int = 0,
                     spec: shapes.SceneSpec | None = None, count_prompts: int = 20) -> list[Probe]:
    """Probes "colour", "shape", "size", "object" (size-colour-shape) and "count" over `scenes`.

    The first four cover single-object images; their prompts are every first mention the generator can
    write for a class ("a big red circle", ...): colour "red" = "a {size word} red {shape}" over all size
    words and shapes; object "large red circle" = "a large red circle", "a big red circle". "count" covers
    every image, with classes the number words from the fewest to the most objects in `scenes`; class n
    has `count_prompts` reference captions (one random template each) of random n-object scenes drawn with
    `spec` (default: the default spec up to 3 objects, the `long` one above), seeded by `rng_seed`.
    """
    size_words = [(size, w) for size, words in shapes._SIZE_WORDS.items() for w in words]
    combos = [(size, w, c, s) for size, w in size_words for c in shapes.COLOR_NAMES for s in shapes.SHAPES]
    single = {i: objs[0] for i, objs in scenes.items() if len(objs) == 1}

    def probe(name, classes, key):
        prompts = [[_a(f"{w} {c} {s}") for size, w, c, s in combos if key(size, c, s) == k] for k in classes]
        labels = {i: classes.index(key(o.size, o.color, o.shape)) for i, o in single.items()}
        return Probe(name, list(classes), prompts, labels)

    objects = [f"{size} {c} {s}" for size in shapes.SIZES for c in shapes.COLOR_NAMES for s in shapes.SHAPES]
    probes = [probe("colour", shapes.COLOR_NAMES, lambda size, c, s: c),
              probe("shape", shapes.SHAPES, lambda size, c, s: s),
              probe("size", shapes.SIZES, lambda size, c, s: size),
              probe("object", objects, lambda size, c, s: f"{size} {c} {s}")]

    sizes = sorted({len(objs) for objs in scenes.values()})
    if sizes:
        numbers = list(range(sizes[0], sizes[-1] + 1))
        prompts = []
        for n in numbers:
            base = spec or shapes.SceneSpec()
            if spec is None and n > base.max_objects:
                from ladic_jax.data import shapes_captions  # Imports TFDS: only for the long scenes.
                base = shapes_captions.LONG_SCENE
            base = dataclasses.replace(base, min_objects=n, max_objects=n)
            class_prompts = []
            for k in range(count_prompts):
                rng = np.random.default_rng(np.random.SeedSequence([rng_seed, n, k]))
                class_prompts += shapes.make_captions(shapes.sample_scene(rng, base), rng, base.gap, num=1)
            prompts.append(class_prompts)
        labels = {i: numbers.index(len(objs)) for i, objs in scenes.items()}
        probes.append(Probe("count", [shapes._NUMBER_WORDS[n] for n in numbers], prompts, labels))
    return probes
