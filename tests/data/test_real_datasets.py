"""The real-dataset builders (`karpathy_captions`, `cub_captions`) from tiny fake datasets in the true on-disk
layouts (tests/fake_datasets.py): what they store against what was written, the Flickr30k+8k union, the
pipeline on them (every reference, corrupt images skipped and counted), named layout errors, a bucket-style
file system, and `ladic-data build|show`. One training step of each paper config's runlocal variant on
them is in the training tests (test_cli.py, test_coca_cli.py, test_word_diffusion_families.py,
test_discrete_family.py)."""

from __future__ import annotations

import os

import fake_datasets as fd
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import REAL_DATASETS

from ladic_jax import config as config_lib
from ladic_jax.cli import data as data_cli
from ladic_jax.data import bad_records
from ladic_jax.data import datasets
from ladic_jax.data import layout
from ladic_jax.data import pipeline
from ladic_jax.data import text


def stored(data_dir: str, name: str) -> dict[str, dict[int, dict]]:
    """Every record of every split of a built dataset, by image id, image left encoded."""
    datasets.register(name)
    builder = tfds.builder(name, data_dir=data_dir)
    out = {}
    for split in builder.info.splits:
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
        records = list(tfds.as_numpy(ds))
        out[split] = {int(r["image/id"]): r for r in records}
        assert len(out[split]) == len(records), f"{name} {split}: image ids are not unique"
    return out


def assert_matches(records: dict[str, dict[int, dict]], expected: dict[str, dict[int, fd.Expected]]):
    assert {s: sorted(r) for s, r in records.items()} == {s: sorted(e) for s, e in expected.items()}
    for split, by_id in expected.items():
        for image_id, want in by_id.items():
            got = records[split][image_id]
            assert got["image/filename"].decode() == want.filename
            assert [t.decode() for t in got["captions"]["text"]] == list(want.captions)
            assert got["captions"]["id"].tolist() == list(want.caption_ids)
            if want.tokens:
                assert [t.decode() for t in got["captions"]["tokens"]] == list(want.tokens)
            assert got["image"] == want.image_bytes  # stored as the file's bytes, not re-encoded


def union_expected(expected) -> dict[str, dict[int, fd.Expected]]:
    """Flickr30k+8k as stated: the union of each split, a photo in both kept as Flickr30k has it, Flickr8k's
    sentence ids offset."""
    f30, f8 = expected["karpathy_captions/flickr30k"], expected["karpathy_captions/flickr8k"]
    in_30k = {i for split in f30.values() for i in split}
    out = {split: dict(f30[split]) for split in f30}
    for split, by_id in f8.items():
        for image_id, e in by_id.items():
            if image_id not in in_30k:
                ids = tuple(i + 1_000_000 for i in e.caption_ids)
                out[split][image_id] = fd.Expected(e.filename, e.captions, e.tokens, e.image_bytes, ids)
    return out


# --------------------------------------------------------------------------- what the builders store


@pytest.mark.parametrize("name", [n for n in REAL_DATASETS if n != "karpathy_captions/flickr30k+8k"])
def test_builder_stores_what_the_files_hold(real_data, name):
    _, data_dir, expected = real_data
    assert_matches(stored(data_dir, name), expected[name])


def test_split_sizes_and_ids(real_data):
    _, data_dir, _ = real_data
    sizes = {name: {s: len(r) for s, r in stored(data_dir, name).items()} for name in REAL_DATASETS}
    assert sizes["karpathy_captions/coco"] == fd.KARPATHY_SPLITS["coco"]
    assert sizes["karpathy_captions/flickr8k"] == fd.KARPATHY_SPLITS["flickr8k"]
    # Union: 30k's 3/2/2 plus 8k's 3/2/2, less the shared photo (8k test, kept as 30k's train image).
    assert sizes["karpathy_captions/flickr30k+8k"] == {"train": 6, "val": 4, "test": 3}
    n = len(fd.CUB_CLASSES) * fd.CUB_PER_CLASS
    assert sizes["cub_captions/default"] == {"train": n * 2 // 3, "test": n // 3}
    assert sizes["cub_captions/unseen_classes"] == {"train": n // 2, "test": n // 2}
    flickr8k = stored(data_dir, "karpathy_captions/flickr8k")["test"]
    assert fd.SHARED_PHOTO in flickr8k  # the photo id is the number before "_" in Flickr8k's file name


def test_flickr30k_plus_8k_union(real_data):
    _, data_dir, expected = real_data
    records = stored(data_dir, "karpathy_captions/flickr30k+8k")
    assert_matches(records, union_expected(expected))
    assert fd.SHARED_PHOTO in records["train"] and all(fd.SHARED_PHOTO not in records[s] for s in ("val", "test"))


def test_class_split_follows_reeds_class_lists(real_data):
    _, data_dir, _ = real_data
    records = stored(data_dir, "cub_captions/unseen_classes")
    classes = {s: {r["image/class"].decode() for r in by_id.values()} for s, by_id in records.items()}
    assert classes == {"train": set(fd.CUB_TRAINVAL_CLASSES), "test": set(fd.CUB_TEST_CLASSES)}


# --------------------------------------------------------------------------- through the input pipeline


@pytest.mark.parametrize("name,split,n_refs", [("karpathy_captions/coco", "test", {5, 6}),
                                               ("cub_captions/default", "test", {10})])
def test_evaluation_scores_every_reference_and_skips_corrupt_images(real_data, name, split, n_refs):
    _, data_dir, expected = real_data
    cfg = config_lib.input_config(dataset=name, data_dir=data_dir, eval_split=split, tokenizer="minilm",
                                  image_size=32, eval_batch_size=4)
    want = expected[name][split]
    seen = {}
    for batch in pipeline.make_eval_iterator(cfg, process_index=0, process_count=1):
        for k, image_id in enumerate(batch["image_id"].tolist()):
            if image_id in want:
                seen[image_id] = (bool(batch["_mask"][k]), int(batch["_data_flags"][k]), batch["references"][k])
    assert sorted(seen) == sorted(want)
    corrupt = [i for i, e in want.items() if e.image_bytes == fd.CORRUPT]
    assert len(corrupt) == 1
    for image_id, (valid, flags, refs) in seen.items():
        if image_id in corrupt:
            assert not valid and bad_records.skip_reason(flags) == "corrupt_image"
        else:
            assert valid and refs == [text.normalize_caption(c) for c in want[image_id].captions]
    assert {len(r) for i, (_, _, r) in seen.items() if i not in corrupt} == n_refs


# --------------------------------------------------------------------------- layout errors


def _remove(path) -> None:
    tf.io.gfile.rmtree(path) if tf.io.gfile.isdir(path) else tf.io.gfile.remove(path)


def _edit_json(path, edit) -> None:
    import json

    content = json.loads(open(path).read())
    edit(content["images"])
    open(path, "w").write(json.dumps(content))


LAYOUT_ERRORS = {
    # case: (dataset, how to break the fake layout, error type, what the message must name)
    "no_json": ("karpathy_captions/coco", lambda m: _remove(f"{m}/coco/dataset_coco.json"),
                layout.LayoutError, ["dataset_coco.json", "Karpathy's split file"]),
    "no_val2014": ("karpathy_captions/coco", lambda m: _remove(f"{m}/coco/val2014"),
                   layout.LayoutError, ["val2014", "image folder"]),
    "no_flickr_images": ("karpathy_captions/flickr8k", lambda m: _remove(f"{m}/flickr8k/Images"),
                         layout.LayoutError, ["Images", "Flicker8k_Dataset", "flickr8k image folder"]),
    "missing_image": ("karpathy_captions/flickr30k",
                      lambda m: _remove(f"{m}/flickr30k/flickr30k-images/{fd.SHARED_PHOTO}.jpg"),
                      layout.LayoutError, [f"flickr30k-images/{fd.SHARED_PHOTO}.jpg", "missing image"]),
    "bad_json": ("karpathy_captions/coco", lambda m: open(f"{m}/coco/dataset_coco.json", "a").write("}"),
                 ValueError, ["dataset_coco.json", "not valid JSON"]),
    "no_sentences": ("karpathy_captions/coco",
                     lambda m: _edit_json(f"{m}/coco/dataset_coco.json", lambda ims: ims[2].pop("sentences")),
                     ValueError, ["images[2]", "'sentences'"]),
    "bad_split": ("karpathy_captions/flickr8k",
                  lambda m: _edit_json(f"{m}/flickr8k/dataset_flickr8k.json",
                                       lambda ims: ims[0].update(split="dev")),
                  ValueError, ["images[0]", "'dev'"]),
    "no_images_txt": ("cub_captions/default", lambda m: _remove(f"{m}/CUB_200_2011/images.txt"),
                      layout.LayoutError, ["CUB_200_2011/images.txt", "image list"]),
    "no_text_c10": ("cub_captions/default", lambda m: _remove(f"{m}/cvpr2016_cub/text_c10"),
                    layout.LayoutError, ["text_c10", "Reed et al.'s captions"]),
    "missing_caption_file": ("cub_captions/default",
                             lambda m: _remove(f"{m}/cvpr2016_cub/text_c10/{fd.CUB_CLASSES[0]}/"
                                               f"Black_footed_Albatross_0002_7002.txt"),
                             layout.LayoutError, ["Black_footed_Albatross_0002_7002.txt", "missing caption"]),
    "no_split_file": ("cub_captions/default", lambda m: _remove(f"{m}/CUB_200_2011/train_test_split.txt"),
                      layout.LayoutError, ["train_test_split.txt"]),
    "no_class_list": ("cub_captions/unseen_classes", lambda m: _remove(f"{m}/cvpr2016_cub/testclasses.txt"),
                      layout.LayoutError, ["testclasses.txt", "test classes"]),
    "class_in_no_list": ("cub_captions/unseen_classes",
                         lambda m: open(f"{m}/cvpr2016_cub/testclasses.txt", "w").write(fd.CUB_CLASSES[1]),
                         ValueError, [fd.CUB_CLASSES[3], "neither"]),
    "bad_images_txt": ("cub_captions/default", lambda m: open(f"{m}/CUB_200_2011/images.txt", "a").write("x\n"),
                       ValueError, ["images.txt:13", "expected 2 fields"]),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_ERRORS))
def test_wrong_layout_is_a_named_error(case, tmp_path):
    name, breaks, error, words = LAYOUT_ERRORS[case]
    manual = tmp_path / "manual"
    fd.write_all(str(manual))
    breaks(str(manual))
    base, config = name.split("/")
    with pytest.raises(error) as info:
        datasets.build(base, str(tmp_path / "tfds"), config, str(manual))
    for word in words:
        assert word in str(info.value), (case, str(info.value))
    assert not tfds.builder(name, data_dir=str(tmp_path / "tfds")).is_prepared()


def test_missing_manual_dir_names_it_and_says_what_belongs_there(tmp_path):
    with pytest.raises(layout.LayoutError, match=r"nowhere does not exist.*dataset_coco\.json"):
        datasets.build("karpathy_captions", str(tmp_path), "coco", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="reads the dataset's files from --manual_dir"):
        datasets.build("cub_captions", str(tmp_path), "default", None)
    with pytest.raises(ValueError, match=r"unknown karpathy_captions config 'flickr9k'"):
        datasets.build("karpathy_captions", str(tmp_path), "flickr9k", str(tmp_path))


# --------------------------------------------------------------------------- bucket-style paths


@pytest.fixture
def ram_paths(monkeypatch):
    """`ram://` paths through etils.epath as it treats `gs://`: TensorFlow's file system (tf.io.gfile has an
    in-memory `ram://` one); a builder that used the local-only `open()` would fail on them."""
    from etils.epath import backend, gpath, register

    monkeypatch.setattr(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("ram://",))
    monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
    monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", backend.tf_backend)
    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)
    return f"ram://manual_{os.getpid()}"


def test_builds_from_a_bucket_style_path(ram_paths, tmp_path):
    manual = ram_paths
    expected = fd.write_all(manual)
    for name in ("karpathy_captions/coco", "karpathy_captions/flickr8k", "cub_captions/unseen_classes"):
        base, config = name.split("/")
        datasets.build(base, str(tmp_path), config, manual)
        assert_matches(stored(str(tmp_path), name), expected[name])


# --------------------------------------------------------------------------- ladic-data


def test_ladic_data_build_and_show(real_data, tmp_path, capsys):
    manual, data_dir, expected = real_data
    out_dir = str(tmp_path / "tfds")
    assert data_cli.main(["build", "cub_captions", "--config", "unseen_classes", "--manual_dir", manual,
                          "--data_dir", out_dir]) == 0
    printed = capsys.readouterr().out
    assert "cub_captions/unseen_classes: built" in printed and "train 6, test 6 images" in printed
    assert data_cli.main(["build", "cub_captions", "--config", "unseen_classes", "--manual_dir", manual,
                          "--data_dir", out_dir]) == 0
    assert "already present, reused" in capsys.readouterr().out

    sheet = str(tmp_path / "sheet.png")
    assert data_cli.main(["show", "--dataset", "karpathy_captions/coco", "--split", "test", "--data_dir",
                          data_dir, "--out", sheet, "--num", "3", "--tile", "64"]) == 0
    assert os.path.getsize(sheet) > 0
    from ladic_jax.data import caption_sheet

    items = caption_sheet.load_items("karpathy_captions/coco", "test", data_dir, num=3)
    want = expected["karpathy_captions/coco"]["test"]
    assert sorted(int(i.label.split()[1]) for i in items) == sorted(want)
    for item in items:
        image_id = int(item.label.split()[1])
        assert list(item.captions) == list(want[image_id].captions)
        if want[image_id].image_bytes == fd.CORRUPT:  # shown, labelled, not an error
            assert item.label.endswith("(skipped: corrupt_image)")
        else:
            assert item.image.ndim == 3 and item.image.shape[-1] == 3 and item.image.std() > 10


def test_ladic_data_build_errors_are_one_line(tmp_path, capsys):
    assert data_cli.main(["build", "karpathy_captions", "--config", "coco", "--manual_dir", str(tmp_path),
                          "--data_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ladic-data build: error: karpathy_captions/coco: missing file")
    assert data_cli.main(["build", "shapes_captions", "--manual_dir", str(tmp_path),
                          "--data_dir", str(tmp_path / "out")]) == 2
    assert "takes no --manual_dir" in capsys.readouterr().err


def test_unprepared_dataset_error_gives_the_build_command(tmp_path):
    cfg = config_lib.input_config(dataset="karpathy_captions/flickr30k+8k", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"ladic-data build karpathy_captions --config flickr30k\+8k "
                                         r"--manual_dir DIR --data_dir DATA_DIR"):
        pipeline.get_builder(cfg)

