"""Bad records through the real training and evaluation iterators: each case is skipped or converted
by the rule stated in ladic_jax/data/bad_records.py, counted per reason, and never stops the stream;
resuming still gives the same batches; evaluation scores every good example once.

The dataset (tests/bad_dataset.py) stores the bad bytes as they are, in TFRecords built by TFDS."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

import bad_dataset as bd
from ladic_jax import config as config_lib
from ladic_jax.data import bad_records, pipeline, text

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
BATCHES_PER_EPOCH = bd.N // 6


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(bd.VOCAB) + "\n")
    transformers.BertTokenizerFast(vocab=str(d / "vocab.txt")).save_pretrained(str(d))
    return transformers.AutoTokenizer.from_pretrained(str(d))


def make_cfg(data_dir, tokenizer, **overrides):
    fields = dict(dataset="ladic_bad_captions", data_dir=data_dir, train_split="train", eval_split="test",
                  image_size=bd.SIZE, image_mean=MEAN, image_std=STD, max_length=16,
                  tokenizer=tokenizer.name_or_path, shuffle_buffer=bd.N, batch_size=6, eval_batch_size=4,
                  seed=5, max_image_pixels=bd.MAX_PIXELS)
    fields.update(overrides)
    return config_lib.input_config(**fields)


def train(cfg, tokenizer, **kw):
    return pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1, **kw)


def words(tokenizer, tokens) -> str:
    return text.decode_tokens(tokenizer, tokens[None])[0]


def check_pixels(image: np.ndarray, image_id: int) -> None:
    name = bd.case_of(image_id)
    expected, tol = bd.expected_pixels(name)
    pixels = (image * np.array(STD) + np.array(MEAN)) * 255.0
    np.testing.assert_allclose(pixels, expected, atol=tol + 1e-3, err_msg=name)


ALL_CASES = [c[0] for c in bd.CASES]


# ----------------------------------------------------------------------------- training


def test_train_epochs_skip_convert_and_count_each_reason(bad_data_dir, tokenizer):
    it = train(make_cfg(bad_data_dir, tokenizer, train_captions="first"), tokenizer)
    expected = bd.expected_counts(ALL_CASES)
    for epoch in range(2):
        batches = [next(it) for _ in range(BATCHES_PER_EPOCH)]
        ids = np.concatenate([b["image_id"] for b in batches])
        assert set(ids.tolist()) == bd.kept_ids(bd.TRAIN_BASE), f"epoch {epoch}"
        assert it.pop_counts() == expected, f"epoch {epoch}"
        for b in batches:
            for image, image_id, tokens in zip(b["image"], b["image_id"], b["tokens"]):
                check_pixels(image, int(image_id))
                # The first caption that survives the rules: b"A caf\xe9 red square" -> "a caf red square"
                # (U+FFFD becomes a space); the blank first caption of `empty_caption` is dropped.
                assert words(tokenizer, tokens) == bd.references(int(image_id))[0]
    assert expected["skipped_corrupt_image"] == 4 and expected["skipped_truncated_image"] == 2
    assert expected["skipped_huge_image"] == 2 and expected["skipped_no_caption"] == 2
    assert expected["converted_grayscale"] == 2 and expected["converted_alpha"] == 2
    assert expected["converted_caption_utf8"] == 1 and expected["converted_empty_caption"] == 1
    assert it.pop_counts() == dict.fromkeys(bad_records.Counts.KEYS, 0)  # Counts since the last call.


def test_resume_with_bad_records_equals_the_uninterrupted_stream(bad_data_dir, tokenizer):
    cfg = make_cfg(bad_data_dir, tokenizer, shuffle_buffer=8, random_resized_crop=True)
    full_it = train(cfg, tokenizer)
    full, counts = [], []
    for _ in range(2 * BATCHES_PER_EPOCH):
        full.append(next(full_it))
        counts.append(full_it.pop_counts())
        for image_id, tokens in zip(full[-1]["image_id"], full[-1]["tokens"]):
            assert words(tokenizer, tokens) in bd.references(int(image_id))  # Never a dropped caption.
    for k in (3, 5):  # Mid-epoch 0, and in epoch 1.
        it = train(cfg, tokenizer, start_step=k)
        for j in range(k, len(full)):
            b = next(it)
            for key in full[j]:
                np.testing.assert_array_equal(full[j][key], b[key], err_msg=f"start_step={k}, batch {j}, {key}")
            assert it.pop_counts() == counts[j], f"start_step={k}, batch {j}"


def test_whole_bad_batches_take_the_next_good_record_and_resume(bad_data_dir, tokenizer):
    cfg = make_cfg(bad_data_dir, tokenizer, train_split="mostly_bad", batch_size=2, shuffle_buffer=8)
    good = bd.MOSTLY_BAD_BASE + bd.MOSTLY_BAD.index("good_0")
    it = train(cfg, tokenizer)
    batches = [next(it) for _ in range(8)]  # Two epochs of four batches; most have no good record.
    for b in batches:
        assert b["image_id"].tolist() == [good, good]
        check_pixels(b["image"][0], good)
    assert it.pop_counts() == bd.expected_counts(bd.MOSTLY_BAD * 2)
    resumed = train(cfg, tokenizer, start_step=3)
    for j in range(3, 8):
        np.testing.assert_array_equal(next(resumed)["image"], batches[j]["image"])


def test_a_split_with_no_usable_record_is_rejected_naming_it(bad_data_dir, tokenizer):
    it = train(make_cfg(bad_data_dir, tokenizer, train_split="all_bad", batch_size=2), tokenizer)
    with pytest.raises(ValueError, match=r"training split 'all_bad'.*no usable record in \d+ consecutive"):
        next(it)


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("process_count,local_batch", [(1, 4), (2, 5)])
def test_eval_reports_bad_records_by_id_and_scores_every_good_one_once(bad_data_dir, tokenizer,
                                                                       process_count, local_batch):
    cfg = make_cfg(bad_data_dir, tokenizer, eval_batch_size=process_count * local_batch)
    scored, skipped, counts, per_process = [], {}, bad_records.Counts(), []
    for p in range(process_count):
        batches = list(pipeline.make_eval_iterator(cfg, tokenizer, process_index=p,
                                                   process_count=process_count))
        per_process.append(len(batches))
        for b in batches:
            counts.add(b["_data_flags"][b["image_id"] >= 0])
            for image, image_id, valid, flags, refs in zip(b["image"], b["image_id"], b["_mask"],
                                                           b["_data_flags"], b["references"]):
                if image_id < 0:
                    assert not valid and flags == 0 and refs == []
                elif valid:
                    scored.append(int(image_id))
                    assert refs == bd.references(int(image_id))
                    check_pixels(image, int(image_id))
                else:
                    skipped[int(image_id)] = bad_records.skip_reason(int(flags))
                    assert refs == []
    assert len(set(per_process)) == 1
    assert sorted(scored) == sorted(bd.kept_ids(bd.TEST_BASE))  # Each good one exactly once.
    assert skipped == {bd.TEST_BASE + k: c[3] for k, c in enumerate(bd.CASES) if c[3]}
    assert counts.as_dict() == bd.expected_counts(ALL_CASES)


# ----------------------------------------------------------------------------- smaller pieces


def test_text_and_config_pieces():
    assert text.normalize_caption(b"A caf\xe9, red!") == "a caf red"
    with pytest.raises(config_lib.ConfigError, match=r"config\.input\.max_image_pixels"):
        config_lib.validate_input(config_lib.input_config(tokenizer="t", max_image_pixels=0), process_count=1)
    old = config_lib.input_config(tokenizer="t")
    del old["max_image_pixels"]  # A config saved before the field existed still validates.
    config_lib.validate_input(old, process_count=1)
