"""The trainer: resume continues with the same losses, non-finite losses stop the run with the last
good checkpoint intact, evaluation results are written where the tools expect them, bad records are
counted in the metrics log and reported by the evaluation."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bad_dataset as bd
from ladic_jax import trainer
from ladic_jax.evaluation import report
from ladic_jax.families.ladic import Ladic


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_resume_continues_with_the_same_losses(tiny_config, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    trainer.train_and_evaluate(tiny_config("total_steps=6", "log_every=1"), full)
    # A run cut short by config.stop_at_step (the checkpoint at 3 is its stop, not a periodic one).
    trainer.train_and_evaluate(tiny_config("total_steps=6", "log_every=1", "checkpoint.every_steps=4",
                                           "stop_at_step=3"), part)
    assert sorted(_losses(part)) == [1, 2, 3]
    assert os.listdir(os.path.join(part, "checkpoints")) == ["3"]
    trainer.train_and_evaluate(tiny_config("total_steps=6", "log_every=1", "stop_at_step=3"), part)  # no-op
    assert sorted(_losses(part)) == [1, 2, 3] and os.listdir(os.path.join(part, "checkpoints")) == ["3"]
    # Second start in the same workdir resumes from step 3 (data position and RNG included).
    trainer.train_and_evaluate(tiny_config("total_steps=6", "log_every=1"), part)
    a, b = _losses(full), _losses(part)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-6)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(tiny_config("total_steps=2", "checkpoint.every_steps=1"), workdir)
    good = os.listdir(os.path.join(workdir, "checkpoints"))
    assert "2" in good

    original = Ladic.loss

    def poisoned(self, params, batch, rng, train=True):
        loss, metrics = original(self, params, batch, rng, train)
        return loss * jnp.nan, metrics

    monkeypatch.setattr(Ladic, "loss", poisoned)
    with pytest.raises(trainer.NonFiniteError, match=r"non-finite loss.* at step 3.*checkpoint of step 2"):
        trainer.train_and_evaluate(tiny_config("total_steps=5", "checkpoint.every_steps=1"), workdir)
    monkeypatch.setattr(Ladic, "loss", original)
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps[-1] == 2  # nothing written after the bad step
    sk = trainer.skeleton(tiny_config("total_steps=5"))
    step, state = trainer.restore(sk, workdir)
    assert step == 2
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in __import__("jax").tree.leaves(state["params"]))


def _tags(tb_dir: str) -> set[str]:
    import tensorflow as tf

    tags = set()
    for path in glob.glob(os.path.join(tb_dir, "events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_training_over_bad_records_logs_their_counts_and_writes_eval_results(tiny_config, bad_data_dir,
                                                                             tmp_path, capsys):
    """Over the dataset of tests/bad_dataset.py: training does not stop, the per-reason counts reach
    metrics.jsonl and TensorBoard, the evaluation skips the bad test records and reports them by id."""
    workdir = str(tmp_path / "run")
    # 3 steps of 8 = one epoch of the 24 records, logged once; then two evaluations of the test split.
    cfg = tiny_config("total_steps=3", "log_every=3", "eval.at_end=True", "eval.limit=0", "sampler.steps=2")
    with cfg.unlocked():
        cfg.input.update(dataset="ladic_bad_captions", data_dir=bad_data_dir, image_size=bd.SIZE,
                         max_image_pixels=bd.MAX_PIXELS, batch_size=8, eval_batch_size=8)
        cfg.model.image.config.image_size = bd.SIZE
        cfg.eval.sampling_steps = (2, 3)
    trainer.train_and_evaluate(cfg, workdir)

    kept, bad = bd.kept_ids(bd.TEST_BASE), {bd.TEST_BASE + k: c[3] for k, c in enumerate(bd.CASES) if c[3]}
    main = json.loads(report.metrics_path(workdir, 3).read_text())
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice", "num_images",
                "sampling_steps", "seconds_per_image"):
        assert key in main, key
    assert main["num_images"] == len(kept) and main["sampling_steps"] == 2
    assert {r["image_id"]: r["reason"] for r in main["skipped"]} == bad
    assert {r["image_id"] for r in report.read_captions(workdir, 3)} == kept
    other = json.loads(report.metrics_path(workdir, 3, tag="_s3").read_text())
    assert other["sampling_steps"] == 3 and other["num_images"] == len(kept)
    assert os.path.exists(os.path.join(workdir, "config.json"))

    expected = bd.expected_counts([c[0] for c in bd.CASES])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    data = [r for r in rows if "data/examples" in r]
    assert [r["step"] for r in data] == [3]
    assert {k: data[0][f"data/{k}"] for k in expected} == expected  # The training epoch.
    evals = [r for r in rows if "eval_s2/data/examples" in r]
    assert {k: evals[0][f"eval_s2/data/{k}"] for k in expected} == expected  # The test split.
    tags = _tags(os.path.join(workdir, "tb"))
    assert {"data/skipped_corrupt_image", "data/converted_grayscale", "eval_s2/data/skipped_huge_image",
            "eval_s2/bleu_4"} <= tags
    out = capsys.readouterr().out
    assert ("[data] step 3: skipped 10 of 24 records (corrupt_image 4, truncated_image 2, huge_image 2, "
            "no_caption 2)") in out
    assert f"[eval] {len(bad)} bad records skipped, not scored: image ids" in out


def test_bad_config_value_is_rejected_at_start(tiny_config, tmp_path):
    from ladic_jax.config import ConfigError
    with pytest.raises((ConfigError, ValueError), match="batch_size"):
        trainer.train_and_evaluate(tiny_config("input.batch_size=0"), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x" / "checkpoints")


def test_frozen_parameters_get_no_weight_gradients():
    """Freezing the image encoder must take its backward pass out of the compiled train step: at least
    its weight gradients, 2 * batch * tokens * (its dense-kernel sizes) flops by the closed form
    (the input gradients go too, as nothing before it trains). Without stop_gradient on frozen
    parameters XLA still forms those gradients, and the two steps cost the same."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_setup import make_tiny_config

    def step_flops(extra_frozen):
        cfg = make_tiny_config("/nonexistent")
        with cfg.unlocked():
            cfg.optim.frozen = list(cfg.optim.frozen) + extra_frozen
        sk = trainer.skeleton(cfg)
        batch = trainer.dummy_batch(cfg, int(cfg.input.batch_size))
        # XLA's count on the lowered program (no compile needed): the gradients JAX's autodiff forms
        # all feed grad_norm, so none of them could be optimised away later.
        cost = trainer.make_train_step(sk).lower(sk.abstract_state, batch).cost_analysis()
        return cfg, sk, float(cost["flops"])

    cfg, sk, frozen_flops = step_flops([r"^image/"])
    _, _, trained_flops = step_flops([])
    kernels = sum(int(np.prod(leaf.shape))
                  for path, leaf in jax.tree_util.tree_flatten_with_path(sk.abstract_state["params"])[0]
                  if trainer.sharding.path_str(path).startswith("image/layers")
                  and trainer.sharding.path_str(path).endswith("kernel"))
    tokens = (cfg.input.image_size // cfg.model.image.config.patch_size) ** 2
    weight_grad_flops = 2 * cfg.input.batch_size * tokens * kernels
    assert kernels > 0
    assert trained_flops - frozen_flops >= weight_grad_flops, (trained_flops, frozen_flops, weight_grad_flops)
