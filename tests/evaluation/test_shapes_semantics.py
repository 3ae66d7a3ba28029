"""Semantic scores of captions on the synthetic shapes: scenes from ids, parser, scores, probes."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ladic_jax.data import shapes
from ladic_jax.data import shapes_captions as sc
from ladic_jax.evaluation import shapes_semantics as sem
from ladic_jax.evaluation.shapes_semantics import Mention, Parsed

O = shapes.SceneObject
GAP = 4
# red (x 2-22, y 20-40) is left of blue (x 40-50, y 25-35), and neither above nor below it; green (x 40-50,
# y 2-12) is above blue, and right of and above red.
RED = O("circle", "red", "large", x0=2, y0=20, side=20)
BLUE = O("square", "blue", "small", x0=40, y0=25, side=10)
GREEN = O("triangle", "green", "small", x0=40, y0=2, side=10)
ORANGE = O("diamond", "orange", "large", x0=10, y0=10, side=24)
TWO = [RED, BLUE]
THREE = [RED, BLUE, GREEN]
RIGHT = "a large red circle to the left of a small blue square"


def reference_scenes(spec, n, seed=7):
    """`n` random scenes of `spec` with their five reference captions, as the generator writes them."""
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        objects = shapes.sample_scene(rng, spec)
        yield objects, shapes.make_captions(objects, rng, spec.gap)


def score_one(caption, scene=TWO):
    return sem.score_captions({1: caption}, {1: scene}, GAP)


def verdict(caption, scene=TWO):
    return sem.per_caption({1: caption}, {1: scene}, GAP)[1]


# --------------------------------------------------------------------------------------------- scenes


def test_scenes_equal_the_objects_the_built_dataset_stores(tiny_data_dir):
    builder = tfds.builder("shapes_captions/tiny", data_dir=tiny_data_dir)
    info = builder.info.features["objects"]
    stored = {}
    for split in ("train", "validation", "test"):
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            o = ex["objects"]
            stored[int(ex["image/id"])] = [
                    (info["shape"].int2str(s), info["color"].int2str(c), info["size"].int2str(z), b)
                    for s, c, z, b in zip(o["shape"], o["color"], o["size"], o["bbox"])]
    assert len(stored) == 80
    scenes, gap = sem.scenes_for_dataset("shapes_captions/tiny", stored)
    assert gap == 4 and set(scenes) == set(stored)
    for image_id, objects in scenes.items():
        assert [(o.shape, o.color, o.size) for o in objects] == [s[:3] for s in stored[image_id]], image_id
        boxes = [[o.y0 / 64, o.x0 / 64, o.y1 / 64, o.x1 / 64] for o in objects]
        np.testing.assert_allclose(boxes, [s[3] for s in stored[image_id]], atol=1e-6)


def test_scenes_of_other_configs_and_names():
    image_id = 3 * sc._ID_STRIDE + 3  # test split, index 3
    long_scenes, gap = sem.scenes_for_dataset("shapes_captions/long:1.0.0", [np.int64(image_id)])
    assert gap == sc.LONG_SCENE.gap
    assert long_scenes[image_id] == shapes.generate_example(sc.LONG_SCENE, 0, 2, 3).objects
    default = sem.scenes_for_dataset("shapes_captions/default", [image_id, sc._ID_STRIDE + 4999])
    assert sem.scenes_for_dataset("shapes_captions", [image_id, sc._ID_STRIDE + 4999]) == default
    assert sem.scenes_for_dataset("coco_captions/2014", [1, 2]) is None


@pytest.mark.parametrize("image_id", [sc._ID_STRIDE + 48, 2 * sc._ID_STRIDE + 16, 4 * sc._ID_STRIDE, 5, -3])
def test_an_id_outside_the_config_is_named(image_id):
    with pytest.raises(ValueError, match=str(image_id)):
        sem.scenes_for_dataset("shapes_captions/tiny", [sc._ID_STRIDE, image_id])


def test_unknown_config_raises():
    with pytest.raises(ValueError, match="huge"):
        sem.scenes_for_dataset("shapes_captions/huge", [sc._ID_STRIDE])


# --------------------------------------------------------------------------------------------- parser


def test_reference_captions_parse_and_score_fully_correct():
    cases = list(reference_scenes(shapes.SceneSpec(), 300)) + list(reference_scenes(sc.LONG_SCENE, 50))
    predictions, scenes = {}, {}
    for i, (objects, captions) in enumerate(cases):
        for k, caption in enumerate(captions):
            parsed = sem.parse_caption(caption)
            assert parsed is not None, caption
            assert parsed.counts in ((), (len(objects),))
            predictions[10 * i + k], scenes[10 * i + k] = caption, objects
    verdicts = sem.per_caption(predictions, scenes, GAP)  # Both specs' gaps are >= 4.
    wrong = {predictions[i]: v.reason for i, v in verdicts.items() if not v.correct}
    assert not wrong
    long_gap = {i: c for i, c in predictions.items() if i >= 3000}
    assert sem.score_captions(long_gap, scenes, sc.LONG_SCENE.gap)["sem_fully_correct"] == 1.0
    scores = sem.score_captions(predictions, scenes, GAP)
    assert scores["sem_count_accuracy"] == 1.0 and scores["sem_relation_accuracy"] == 1.0
    assert scores["sem_object_f1"] == 1.0 and scores["sem_unparseable"] == 0.0


def test_parse_structure():
    parsed = sem.parse_caption("a large red circle to the left of a small blue square and a green triangle "
                               "above the blue square")
    assert parsed == Parsed(
            (Mention("red", "circle", "large"), Mention("blue", "square", "small"),
             Mention("green", "triangle", None)),
            (("red", "left", "blue"), ("green", "above", "blue")), ())
    assert sem.parse_caption("three shapes a big red circle a little blue square and a green triangle") == \
        Parsed((Mention("red", "circle", "large"), Mention("blue", "square", "small"),
                Mention("green", "triangle", None)), (), (3,))
    # A later mention adds a size; "a single" and "one" are articles, not counts.
    parsed = sem.parse_caption("the red circle is over the blue square and a big red circle")
    assert parsed.objects[0] == Mention("red", "circle", "large") and parsed.counts == ()
    assert sem.parse_caption("one small red circle").counts == ()
    assert sem.parse_caption("five shapes are shown a red circle").counts == (5,)


@pytest.mark.parametrize("caption", [
        "A large red circle, to the left of a small blue square.",
        "a a large red red circle to the left of of a small blue square",
        "large red circle left of small blue square",
        "a red large circle to the left of the small blue square",
        "a large red circle is to the left of a small blue square on a plain",
        "there is a large red circle sits left of a single small blue square and the",
])
def test_robust_to_articles_repeats_and_truncated_fillers(caption):
    assert sem.parse_caption(caption) == sem.parse_caption(RIGHT)
    assert verdict(caption) == (True, "ok")


@pytest.mark.parametrize("caption", [
        "", "zxq blorp", "the the the", "a large red", "a large circle", "a red blue circle",
        "a small large red circle", "a red circle above", "above a red circle", "a red circle and a large",
        "two red circles", "a red circle on a wooden table", "a red circle left of and a blue square",
        "a red circle left above a blue square", "2 shapes a red circle",
        "a large red circle to the left of a",  # Truncated relation: unparseable by rule.
])
def test_unparseable(caption):
    assert sem.parse_caption(caption) is None


# --------------------------------------------------------------------------------------------- scores


def test_right_captions_score_one():
    for caption, scene in [(RIGHT, TWO), ("two shapes the red circle is left of the blue square", TWO),
                           ("a big orange diamond on a plain background", [ORANGE]),
                           ("a little green triangle over the small blue square with a large red circle "
                            "to the left of the blue square", THREE)]:
        scores = score_one(caption, scene)
        assert verdict(caption, scene) == (True, "ok"), caption
        assert scores["sem_fully_correct"] == 1.0 and scores["sem_object_f1"] == 1.0
        assert scores["sem_attribute_accuracy"] == 1.0 and scores["sem_unparseable"] == 0.0


@pytest.mark.parametrize("caption, expected, reason", [
        ("a large red circle to the left of a small green square",
         {"sem_object_precision": 0.5, "sem_object_recall": 0.5, "sem_relation_accuracy": 0.0},
         "no green object; missing small blue square; false: red left green"),
        ("a large red circle to the left of a small blue circle",
         {"sem_object_precision": 0.5, "sem_attribute_accuracy": 0.5, "sem_relation_accuracy": 1.0},
         "blue: said circle, is square"),
        ("a large red circle to the left of a big blue square",
         {"sem_object_f1": 1.0, "sem_attribute_accuracy": 0.5}, "blue: said large, is small"),
        ("a large red circle above a small blue square",
         {"sem_object_f1": 1.0, "sem_relation_accuracy": 0.0}, "false: red above blue"),
        ("a large red circle", {"sem_object_precision": 1.0, "sem_object_recall": 0.5},
         "missing small blue square"),
        (RIGHT + " and a small green triangle",
         {"sem_object_precision": 2 / 3, "sem_object_recall": 1.0}, "no green object"),
        ("three shapes a large red circle and a small blue square",
         {"sem_object_f1": 1.0, "sem_count_accuracy": 0.0}, "count 3, scene has 2"),
        ("the large red circle is left of the small blue square and the blue circle sits right of the red "
         "circle", {"sem_object_precision": 0.5, "sem_attribute_accuracy": 0.5, "sem_relation_accuracy": 1.0},
         "blue: contradictory mentions"),
        (RIGHT + " and the big blue square is right of the red circle",
         {"sem_attribute_accuracy": 0.5, "sem_relation_accuracy": 1.0}, "blue: contradictory mentions"),
        ("zxq blorp", {"sem_unparseable": 1.0, "sem_object_recall": 0.0, "sem_object_precision": None},
         "unparseable"),
        ("", {"sem_unparseable": 1.0, "sem_object_f1": 0.0}, "unparseable"),
        ("a large red circle to the left of a", {"sem_unparseable": 1.0}, "unparseable"),
])
def test_wrong_in_one_way(caption, expected, reason):
    scores = score_one(caption)
    assert scores["sem_fully_correct"] == 0.0
    assert {k: scores[k] for k in expected} == pytest.approx(expected)
    assert verdict(caption) == (False, reason)


def test_metric_values_by_hand():
    scenes = {1: TWO, 2: [ORANGE], 3: THREE, 4: TWO, 5: [ORANGE]}
    predictions = {
            # red right (TP); blue said triangle (FP, attribute wrong); red left of blue holds.
            1: "a large red circle to the left of a small blue triangle",
            # orange right (TP); pink not in the scene (FP, not judged for attributes).
            2: "a large orange diamond and a small pink circle",
            # Unparseable: 0 mentioned, 3 scene objects.
            3: "blorp",
            # Both right (red without size); red right of blue is false; count 2 is right.
            4: "two shapes the red circle is to the right of the small blue square",
            # Fully correct.
            5: "there is a big orange diamond on a plain background",
    }
    tp, mentioned, in_scene = 1 + 1 + 0 + 2 + 1, 2 + 2 + 0 + 2 + 1, 2 + 1 + 3 + 2 + 1
    p, r = tp / mentioned, tp / in_scene  # 5/7, 5/9
    scores = sem.score_captions(predictions, scenes, GAP)
    assert scores == pytest.approx({
            "sem_object_precision": p, "sem_object_recall": r, "sem_object_f1": 2 * p * r / (p + r),
            "sem_attribute_accuracy": (1 + 1 + 2 + 1) / (2 + 1 + 2 + 1),
            "sem_relation_accuracy": 1 / 2, "sem_count_accuracy": 1.0,
            "sem_fully_correct": 1 / 5, "sem_unparseable": 1 / 5})
    assert scores["sem_object_f1"] == pytest.approx(0.625)
    verdicts = sem.per_caption(predictions, scenes, GAP)
    assert [v.correct for v in verdicts.values()] == [False, False, False, False, True]
    assert verdicts[3].reason == "unparseable" and verdicts[4].reason == "false: red right blue"
    assert verdicts[2].reason == "no pink object"


def test_no_counts_or_relations_give_none_and_bad_ids_raise():
    scores = score_one("a large orange diamond", [ORANGE])
    assert scores["sem_count_accuracy"] is None and scores["sem_relation_accuracy"] is None
    with pytest.raises(ValueError, match="7"):
        sem.score_captions({7: RIGHT}, {1: TWO}, GAP)
    with pytest.raises(ValueError):
        sem.score_captions({}, {1: TWO}, GAP)


# --------------------------------------------------------------------------------------------- probes


def test_probe_labels_for_hand_made_scenes():
    orange_square = O("square", "orange", "small", 5, 5, 10)
    probes = {p.name: p for p in sem.zero_shot_probes({1: [RED], 2: [orange_square], 3: TWO})}
    assert set(probes) == {"colour", "shape", "size", "object", "count"}
    named = {name: {i: p.classes[k] for i, k in p.labels.items()} for name, p in probes.items()}
    assert named == {"colour": {1: "red", 2: "orange"}, "shape": {1: "circle", 2: "square"},
                     "size": {1: "large", 2: "small"},
                     "object": {1: "large red circle", 2: "small orange square"},
                     "count": {1: "one", 2: "one", 3: "two"}}
    assert probes["colour"].classes == list(shapes.COLOR_NAMES) and len(probes["object"].classes) == 64
    assert probes["object"].prompts[probes["object"].labels[1]] == ["a large red circle", "a big red circle"]
    assert "a little orange triangle" in probes["colour"].prompts[probes["colour"].labels[2]]
    for p in probes.values():
        assert len(p.prompts) == len(p.classes) and all(p.prompts)
    assert sem.zero_shot_probes({1: [RED]}, rng_seed=3)[-1].prompts == \
        sem.zero_shot_probes({1: [RED]}, rng_seed=3)[-1].prompts


def test_probes_cover_the_generator_phrasing_and_count_prompts_parse():
    cases = list(reference_scenes(shapes.SceneSpec(), 300))
    scenes = {i: objects for i, (objects, _) in enumerate(cases)}
    probes = sem.zero_shot_probes(scenes)
    count = probes[-1]
    assert count.classes == ["one", "two", "three"] and len(count.labels) == 300
    singles = [i for i, objects in scenes.items() if len(objects) == 1]
    assert singles
    for p in probes[:4]:
        assert set(p.labels) == set(singles)
        for i in singles:
            nouns = [prompt.split(" ", 1)[1] for prompt in p.prompts[p.labels[i]]]  # Without the article.
            assert all(any(noun in caption for noun in nouns) for caption in cases[i][1]), (p.name, i)
    for n, prompts in zip((1, 2, 3), count.prompts):
        assert len(prompts) == 20
        assert all(len(sem.parse_caption(prompt).objects) == n for prompt in prompts)
    long_scenes = {i: objects for i, (objects, _) in enumerate(reference_scenes(sc.LONG_SCENE, 30))}
    long_count = sem.zero_shot_probes(long_scenes, count_prompts=5)[-1]
    assert long_count.classes == ["four", "five", "six"]
    for n, prompts in zip((4, 5, 6), long_count.prompts):
        assert all(sem.parse_caption(prompt).counts == (n,) for prompt in prompts)
