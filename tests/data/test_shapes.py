"""Tests of the synthetic `shapes_captions` dataset, its generator and the `ladic-data` CLI.

The central test reads captions back from a built dataset and checks each claim against the pixels with
its own image analysis (colour by hue, shape by how much of its bounding box a region fills, size by side
length, relations by pixel extents), not with the generator's metadata.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from scipy import ndimage

from ladic_jax.cli import data as cli
from ladic_jax.data import caption_sheet, shapes
from ladic_jax.data import datasets
from ladic_jax.data import shapes_captions as sc

TINY = {"train": 24, "validation": 8, "test": 8}


def _config(name: str, seed: int = 0, scene: shapes.SceneSpec = shapes.SceneSpec(), sizes=None):
    return sc.ShapesCaptionsConfig(name=name, scene=scene, seed=seed, split_sizes=sizes or TINY)


def _read(data_dir: str, config: sc.ShapesCaptionsConfig, split: str, raw_images: bool = False) -> list[dict]:
    builder = sc.ShapesCaptions(data_dir=data_dir, config=config)
    decoders = {"image": tfds.decode.SkipDecoding()} if raw_images else None
    return list(tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Tiny builds: seed 0 twice (the second in a separate process), seed 1, and the long scenes."""
    dirs = {}
    for key, config in {
        "a": _config("test_seed0"),
        "seed1": _config("test_seed1", seed=1),
        "long": _config("test_long", scene=sc.LONG_SCENE, sizes={"train": 12, "validation": 4, "test": 4}),
    }.items():
        d = str(tmp_path_factory.mktemp(f"tfds_{key}"))
        report = datasets.build("shapes_captions", d, config)
        assert not report.reused
        dirs[key] = (d, config)
    # Another process with another string-hash seed, as a user rebuilding elsewhere would.
    d = str(tmp_path_factory.mktemp("tfds_b"))
    script = ("import sys; from ladic_jax.data import datasets, shapes_captions as sc; "
              f"datasets.build('shapes_captions', sys.argv[1], "
              f"sc.ShapesCaptionsConfig(name='test_seed0', split_sizes={TINY!r}))")
    subprocess.run([sys.executable, "-c", script, d], check=True, capture_output=True,
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    dirs["b"] = (d, _config("test_seed0"))
    return dirs


# ---------------------------------------------------------------------------------------------------
# An independent reading of the pictures.

# Hue ranges (degrees) of the colour names as commonly understood; brown is dark orange.
_HUES = {"red": [(0, 12), (345, 360)], "yellow": [(45, 70)], "green": [(90, 160)], "blue": [(200, 250)],
         "purple": [(260, 300)], "pink": [(300, 345)]}


def _colour_name(rgb) -> str | None:
    """Names a pixel colour from hue, saturation and value; None for the plain grey background."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    if s < 0.15:
        return None if v > 0.8 else "unnamed grey"
    hue = h * 360
    if 15 <= hue < 45:
        return "orange" if v > 0.75 else "brown" if v < 0.6 else "unnamed orange-brown"
    for name, ranges in _HUES.items():
        if any(lo <= hue < hi for lo, hi in ranges):
            return name
    return f"unnamed hue {hue:.0f}"


def _regions(image: np.ndarray) -> dict[str, dict]:
    """Every coloured region of the picture: its name, pixel extent, shape and side length."""
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    names = {c: _colour_name(c) for c in colours}
    regions = {}
    for rgb, name in names.items():
        if name is None:
            continue
        assert not name.startswith("unnamed"), f"pixel colour {rgb} is not clearly any colour name ({name})"
        mask = np.all(image == np.array(rgb, dtype=np.uint8), axis=-1)
        assert name not in regions, f"two different pixel colours both read as {name}"
        _, count = ndimage.label(mask)
        assert count == 1, f"the {name} pixels form {count} separate regions, expected one object"
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        w, h = x1 - x0 + 1, y1 - y0 + 1
        fill = mask.sum() / (w * h)
        bottom_width = mask[y1].sum() / w
        if fill > 0.95:
            shape = "square"
        elif 0.7 < fill < 0.9:
            shape = "circle"
        elif fill < 0.65:  # Half of the box: a triangle stands on a full-width base, a diamond on a point.
            shape = "triangle" if bottom_width > 0.8 else "diamond" if bottom_width < 0.3 else "unclear"
        else:
            shape = "unclear"
        regions[name] = dict(x0=x0, x1=x1, y0=y0, y1=y1, side=max(w, h), aspect=w / h, shape=shape)
    return regions


# ---------------------------------------------------------------------------------------------------
# An independent reading of the captions.

_COLOURS = set(shapes.COLORS)
_SHAPES = {"circle", "square", "triangle", "diamond"}
_SIZES = {"small": "small", "little": "small", "large": "large", "big": "large"}
_RELATION_WORDS = {"left": "left", "right": "right", "above": "above", "over": "above", "below": "below",
                   "under": "below", "beneath": "below"}
_NUMBERS = {"one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
            "eight": 8}


def _parse(caption: str):
    """Mentions [(size or None, colour, shape)], relations [(i, rel, j)] between mentions, stated count."""
    words = caption.split()
    assert re.fullmatch(r"[a-z ]+", caption), f"caption not lowercase words: {caption!r}"
    mentions, positions = [], []
    for k in range(len(words) - 1):
        if words[k] in _COLOURS and words[k + 1] in _SHAPES:
            size = _SIZES.get(words[k - 1]) if k > 0 else None
            mentions.append((size, words[k], words[k + 1]))
            positions.append(k)
    relations = []
    for i in range(len(mentions) - 1):
        between = words[positions[i] + 2:positions[i + 1]]
        said = [_RELATION_WORDS[w] for w in between if w in _RELATION_WORDS]
        assert len(said) <= 1, f"ambiguous relation words {said} in {caption!r}"
        if said:
            relations.append((i, said[0], i + 1))
    # "three shapes", "a single red circle", "one red circle".
    counts = [_NUMBERS[w] for k, w in enumerate(words)
              if w in _NUMBERS and (words[k + 1:k + 2] == ["shapes"] or w in ("one", "single"))]
    return mentions, relations, counts


def _check_caption(caption: str, regions: dict, size_threshold: float, min_gap: int = 3):
    mentions, relations, counts = _parse(caption)
    assert mentions, f"no object mentioned in {caption!r}"
    assert {m[1] for m in mentions} == set(regions), (
        f"{caption!r} names colours {sorted({m[1] for m in mentions})}, the picture has {sorted(regions)}")
    for size, colour, shape in mentions:
        region = regions[colour]
        assert region["shape"] == shape, f"{caption!r}: the {colour} object looks like a {region['shape']}"
        assert 0.9 < region["aspect"] < 1.1
        if size is not None:
            seen = "large" if region["side"] > size_threshold else "small"
            assert seen == size, f"{caption!r}: the {colour} {shape} is {region['side']}px, i.e. {seen}"
    for i, rel, j in relations:
        a, b = regions[mentions[i][1]], regions[mentions[j][1]]
        gap = {"left": b["x0"] - a["x1"], "right": a["x0"] - b["x1"],
               "above": b["y0"] - a["y1"], "below": a["y0"] - b["y1"]}[rel] - 1  # Empty pixels between.
        assert gap >= min_gap, (f"{caption!r}: the {mentions[i][1]} object is not clearly {rel} the "
                                f"{mentions[j][1]} object (gap {gap}px)")
    for count in counts:
        assert count == len(regions), f"{caption!r} counts {count} objects, the picture has {len(regions)}"
    return len(mentions), len(relations)


@pytest.mark.parametrize("key", ["a", "long"])
def test_captions_are_true_of_the_pixels(built, key):
    data_dir, config = built[key]
    spec = config.scene
    threshold = (spec.small_sides[1] + spec.large_sides[0]) / 2
    n_relations = n_examples = 0
    object_counts = set()
    for split in TINY:
        for ex in _read(data_dir, config, split):
            image = ex["image"]
            assert image.shape == (spec.image_size, spec.image_size, 3) and image.dtype == np.uint8
            regions = _regions(image)
            object_counts.add(len(regions))
            texts = [t.decode() for t in ex["captions"]["text"]]
            assert len(texts) == 5 and len(set(texts)) == 5, texts
            for text in texts:
                n_relations += _check_caption(text, regions, threshold)[1]
            n_examples += 1
    assert n_relations > n_examples  # The relation checks were exercised, not skipped.
    assert object_counts <= set(range(spec.min_objects, spec.max_objects + 1))
    assert len(object_counts) > 1


def test_check_catches_false_captions(built):
    """The pixel check is not vacuous: doctored captions fail it."""
    data_dir, config = built["a"]
    examples = [ex for ex in _read(data_dir, config, "train") if len(ex["objects"]["shape"]) == 2]
    ex = examples[0]
    regions = _regions(ex["image"])
    threshold = (config.scene.small_sides[1] + config.scene.large_sides[0]) / 2
    texts = [t.decode() for t in ex["captions"]["text"]]
    text = next(t for t in texts if any(w in t.split() for w in _RELATION_WORDS))
    swaps = [("left", "right"), ("right", "left"), ("above", "below"), ("over", "under"), ("below", "above"),
             ("under", "over"), ("beneath", "above")]
    flipped = " ".join(dict(swaps).get(w, w) for w in text.split())
    with pytest.raises(AssertionError):
        _check_caption(flipped, regions, threshold)
    other_shape = {"circle": "square", "square": "triangle", "triangle": "diamond", "diamond": "circle"}
    wrong_shape = " ".join(other_shape.get(w, w) for w in text.split())
    with pytest.raises(AssertionError):
        _check_caption(wrong_shape, regions, threshold)
    wrong_size = " ".join({"small": "large", "little": "big", "large": "small", "big": "little"}.get(w, w)
                          for w in text.split())
    with pytest.raises(AssertionError):
        _check_caption(wrong_size, regions, threshold)


def test_objects_feature_matches_pixels(built):
    data_dir, config = built["a"]
    info = sc.ShapesCaptions(data_dir=data_dir, config=config).info
    names = {k: info.features["objects"][k].names for k in ("shape", "color", "size")}
    size = config.scene.image_size
    for ex in _read(data_dir, config, "validation"):
        regions = _regions(ex["image"])
        objs = ex["objects"]
        assert len(objs["shape"]) == len(regions)
        for shape, color, bbox in zip(objs["shape"], objs["color"], objs["bbox"]):
            region = regions[names["color"][color]]
            assert region["shape"] == names["shape"][shape]
            ymin, xmin, ymax, xmax = bbox
            np.testing.assert_allclose([ymin * size, xmin * size, ymax * size - 1, xmax * size - 1],
                                       [region["y0"], region["x0"], region["y1"], region["x1"]], atol=1e-3)


def test_same_seed_same_bytes_different_seed_differs(built):
    def digest(key, split):
        data_dir, config = built[key]
        examples = sorted(_read(data_dir, config, split, raw_images=True), key=lambda e: e["image/id"])
        return [(hashlib.sha256(ex["image"]).hexdigest(), [t.decode() for t in ex["captions"]["text"]])
                for ex in examples]

    for split in TINY:
        assert digest("a", split) == digest("b", split)
        a, c = digest("a", split), digest("seed1", split)
        assert len(a) == len(c) == TINY[split]
        assert sum(x[0] == y[0] for x, y in zip(a, c)) == 0
    # The stored records hold the same examples in the same order. (Not the same file bytes: the order in
    # which tf.train.Example serialises its feature map depends on the process's string-hash seed.)
    dir_a, dir_b = _dir(built, "a"), _dir(built, "b")
    records = sorted(f for f in os.listdir(dir_a) if ".tfrecord" in f)
    assert len(records) == 3 and records == sorted(f for f in os.listdir(dir_b) if ".tfrecord" in f)
    for f in records:
        read = lambda d: [tf.train.Example.FromString(r.numpy())
                          for r in tf.data.TFRecordDataset(os.path.join(d, f))]
        a, b = read(dir_a), read(dir_b)
        assert len(a) == TINY[f.split("-")[1].split(".")[0]] and a == b, f


def _dir(built, key) -> str:
    data_dir, config = built[key]
    return str(sc.ShapesCaptions(data_dir=data_dir, config=config).data_dir)


def test_splits_have_disjoint_ids_and_distinct_images(built):
    data_dir, config = built["a"]
    ids, images = {}, {}
    for split in TINY:
        examples = _read(data_dir, config, split, raw_images=True)
        assert len(examples) == TINY[split]
        ids[split] = {int(ex["image/id"]) for ex in examples}
        images[split] = {hashlib.sha256(ex["image"]).hexdigest() for ex in examples}
        assert len(ids[split]) == TINY[split]
        assert all(ex["image/filename"].decode().endswith(".png") for ex in examples)
        caption_ids = [int(i) for ex in examples for i in ex["captions"]["id"]]
        assert len(set(caption_ids)) == len(caption_ids)
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert not images["train"] & images["test"]


def test_long_captions_are_paragraphs(built):
    def lengths(key):
        data_dir, config = built[key]
        return [len(t.split()) for split in TINY for ex in _read(data_dir, config, split)
                for t in ex["captions"]["text"]]

    short, long = lengths("a"), lengths("long")
    assert np.mean(long) > 2.5 * np.mean(short)
    assert 35 <= np.mean(long) <= 65 and min(long) >= 25, (np.mean(long), min(long))
    assert max(short) <= 30 and min(short) <= 6  # One object gives a short caption.


def test_caption_length_grows_with_object_count():
    spec = shapes.SceneSpec()
    by_count: dict[int, list[int]] = {}
    for i in range(300):
        ex = shapes.generate_example(spec, seed=3, stream=0, index=i)
        by_count.setdefault(len(ex.objects), []).extend(len(c.split()) for c in ex.captions)
    means = [np.mean(by_count[n]) for n in (1, 2, 3)]
    assert means[0] < means[1] < means[2], means


def test_generator_is_order_independent_and_placement_is_spaced():
    spec = shapes.SceneSpec()
    late = shapes.generate_example(spec, seed=7, stream=2, index=11)
    for i in range(11):
        shapes.generate_example(spec, seed=7, stream=2, index=i)
    again = shapes.generate_example(spec, seed=7, stream=2, index=11)
    assert late.captions == again.captions and np.array_equal(late.image, again.image)
    for i in range(200):
        objects = shapes.sample_scene(np.random.default_rng(i), spec)
        assert len({o.color for o in objects}) == len(objects)
        for a in objects:
            assert spec.border <= a.x0 and a.x1 <= spec.image_size - spec.border
            for b in objects:
                if a is not b:  # Boxes apart by at least `gap` empty pixels along some axis.
                    assert max(b.x0 - a.x1, a.x0 - b.x1, b.y0 - a.y1, a.y0 - b.y1) >= spec.gap


@pytest.mark.parametrize("kwargs, field", [
    (dict(min_objects=0), "min_objects"), (dict(max_objects=9), "max_objects"),
    (dict(small_sides=(10, 22)), "small_sides"), (dict(large_sides=(20, 70)), "large_sides"),
])
def test_scene_spec_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        shapes.SceneSpec(**kwargs)


def test_config_rejects_bad_split_sizes():
    with pytest.raises(ValueError, match="split_sizes"):
        sc.ShapesCaptionsConfig(name="bad", split_sizes={"train": 5, "test": 1})
    with pytest.raises(ValueError, match="unknown shapes_captions config 'huge'"):
        datasets.build("shapes_captions", "/nonexistent", "huge")


# ---------------------------------------------------------------------------------------------------
# CLI.


def test_cli_build_and_show(tmp_path, capsys):
    data_dir = str(tmp_path / "tfds")
    assert cli.main(["build", "shapes_captions", "--config", "tiny", "--data_dir", data_dir]) == 0
    out = capsys.readouterr().out
    assert "shapes_captions/tiny: built in" in out
    assert os.path.join(data_dir, "shapes_captions", "tiny") in out
    assert cli.main(["build", "shapes_captions", "--config", "tiny", "--data_dir", data_dir]) == 0
    assert "reused" in capsys.readouterr().out

    sheet = tmp_path / "sheet.png"
    assert cli.main(["show", "--dataset", "shapes_captions/tiny", "--split", "test", "--data_dir", data_dir,
                     "--out", str(sheet), "--num", "6", "--columns", "3"]) == 0
    image = Image.open(sheet)
    assert image.format == "PNG"
    # Three columns of 256px tiles (64px images upscaled 4x), two rows with captions below the pictures.
    assert image.width == 3 * (256 + 16) and image.height > 2 * (256 + 5 * 15)
    pixels = np.asarray(image.convert("RGB"))
    assert (pixels.std(axis=(0, 1)) > 10).all()  # Not blank: pictures and text were drawn.

    # With generated captions (the evaluator's JSON lines), only the captioned images are shown.
    test_ids = [int(ex["image/id"]) for ex in tfds.as_numpy(
        tfds.builder("shapes_captions/tiny", data_dir=data_dir).as_dataset(split="test"))]
    captions = tmp_path / "step_10_captions.jsonl"
    captions.write_text("".join(json.dumps({"image_id": i, "caption": "a red circle", "references": []}) + "\n"
                                for i in test_ids[3:5]))
    assert cli.main(["show", "--dataset", "shapes_captions/tiny", "--data_dir", data_dir, "--out", str(sheet),
                     "--captions", str(captions), "--num", "16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert Image.open(sheet).width == 2 * (256 + 16)  # Two captioned images: one row of two.

    captions.write_text(json.dumps({"image_id": 123, "caption": "a red circle"}) + "\n")
    assert cli.main(["show", "--dataset", "shapes_captions/tiny", "--data_dir", data_dir, "--out", str(sheet),
                     "--captions", str(captions)]) == 2
    assert "none of the 1 generated captions matches" in capsys.readouterr().err
    captions.write_text('{"image_id": 1, "caption": "x"}\n{"caption": "no id"}\n')
    assert cli.main(["show", "--dataset", "shapes_captions/tiny", "--data_dir", data_dir, "--out", str(sheet),
                     "--captions", str(captions)]) == 2
    assert f"{captions}:2: expected a JSON object" in capsys.readouterr().err


def test_sheet_draws_generated_captions_in_their_own_colour():
    image = np.full((64, 64, 3), 240, np.uint8)
    plain = caption_sheet.render_sheet([caption_sheet.SheetItem(image, ["a red circle"])], tile=128)
    marked = caption_sheet.render_sheet(
        [caption_sheet.SheetItem(image, ["a red circle"], generated="a blue square")], tile=128)
    bluish = lambda sheet: int(np.sum(np.asarray(sheet)[..., 2].astype(int) - np.asarray(sheet)[..., 0] > 80))
    assert bluish(plain) == 0 and bluish(marked) > 20
    assert marked.height > plain.height


@pytest.mark.parametrize("argv, message", [
    (["show", "--dataset", "shapes_captions", "--data_dir", "/no/such/dir", "--out", "x.png"],
     "is not a directory"),
    (["show", "--dataset", "no_such_dataset", "--data_dir", "{tmp}", "--out", "{tmp}/x.png"],
     "unknown TFDS dataset 'no_such_dataset'"),
    (["show", "--dataset", "shapes_captions", "--data_dir", "{tmp}", "--out", "{tmp}/x.png"],
     "is not prepared in data_dir"),
])
def test_cli_errors_are_clear(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err) < 600, err


def test_cli_rejects_unknown_config():
    with pytest.raises(SystemExit) as e:
        cli.main(["build", "shapes_captions", "--config", "huge", "--data_dir", "/tmp"])
    assert e.value.code == 2


def test_sheet_reads_coco_captions_features(mock_coco):
    """`show` works for coco_captions (faked offline by tfds.testing.mock_data: tests/conftest.py)."""
    items = caption_sheet.load_items("coco_captions/2014", "test", mock_coco, num=3)
    assert len(items) == 3 and all(len(item.captions) >= 1 for item in items)
    sheet = caption_sheet.render_sheet(items, columns=3, tile=128)
    assert sheet.width == 3 * (128 + 16)
