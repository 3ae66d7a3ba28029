"""The pretraining path end to end, as scripts/demo.sh runs it, on tiny data: configs/coca_shapes.py:runlocal
trains through the one trainer and is evaluated by the one evaluator (captions from its autoregressive
decoder, CLIPScore with its own CLIP, retrieval, zero-shot probes, semantic accuracy); ``ladic-convert clip``
exports its towers; configs/ladic_shapes.py:runlocal,tower=DIR loads the exported tower exactly, keeps it
frozen, and is scored with that CLIP; ``ladic-caption`` and ``ladic-eval --compare`` work on both runs."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from ladic_jax import trainer
from ladic_jax.cli import caption as caption_cli
from ladic_jax.cli import convert as convert_cli
from ladic_jax.cli import eval as eval_cli
from ladic_jax.cli import train as train_cli
from ladic_jax.encoders.loading import load_pretrained
from ladic_jax.evaluation import report
from ladic_jax.evaluation.offline import run_config
from tiny_setup import REPO


@pytest.fixture(scope="module")
def coca_run(tiny_data_dir, tmp_path_factory):
    from tiny_setup import make_tiny_coca_config
    workdir = str(tmp_path_factory.mktemp("coca"))
    trainer.train_and_evaluate(make_tiny_coca_config(tiny_data_dir), workdir)
    return workdir


def test_coca_run_is_evaluated_as_a_captioner_and_as_a_clip(coca_run):
    res = report.latest_eval(coca_run)
    assert res["step"] == 4 and res["num_images"] == 16 and res["sampling_steps"] == 31
    for key in ("bleu_4", "cider", "clip_score", "ref_clip_score", "clip_i2t_recall@1", "clip_t2i_recall@5",
                "sem_fully_correct", "sem_object_f1", "clip_zero_shot_count"):
        assert isinstance(res[key], float), key
    assert 0.0 <= res["clip_t2i_recall@5"] <= 1.0 and 0.0 <= res["clip_score"] <= 2.5
    caps = report.read_captions(coca_run, 4)
    assert all("semantic" in r and "clip_score" in r for r in caps)


def test_export_then_ladic_with_the_frozen_tower(coca_run, tiny_data_dir, tmp_path, capsys):
    clip_dir = str(tmp_path / "clip")
    convert_cli.main(["clip", "--workdir", coca_run, "--out", clip_dir])
    assert "step 4" in capsys.readouterr().out
    assert json.load(open(os.path.join(clip_dir, "config.json")))["vision_config"]["stem"] == "conv"

    workdir = str(tmp_path / "ladic")
    train_cli.main(["--config", os.path.join(REPO, f"configs/ladic_shapes.py:runlocal,tower={clip_dir}"),
                    "--workdir", workdir, f"--config.input.data_dir={tiny_data_dir}",
                    "--config.input.dataset=shapes_captions/tiny"])
    res = report.latest_eval(workdir, "_s2")
    assert isinstance(res["clip_score"], float) and "sem_fully_correct" in res

    # The tower after training is the exported one, bit for bit: loaded exactly and frozen.
    sk = trainer.skeleton(run_config(workdir))
    params = trainer.restore(sk, workdir)[1]["params"]
    exported = load_pretrained(clip_dir, "clip_vision").params
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params["image"])[0], jax.tree.leaves(exported)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))

    eval_cli.main(["--compare", f"{workdir}:_s2", coca_run])
    table = capsys.readouterr().out
    assert "CLIP-S" in table and "correct%" in table and f"{workdir}:_s2" in table


def test_caption_cli_on_the_autoregressive_captioner(coca_run, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(image)
    caption_cli.main(["--workdir", coca_run, str(image), "--json"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["path"] == str(image) and record["error"] is None and isinstance(record["caption"], str)
    caption_cli.main(["--workdir", coca_run, str(image), "--json", "--config.sampler.method=beam",
                      "--config.sampler.beam_size=3"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"] is None


def test_export_of_a_run_without_a_clip_fails_clearly(tiny_data_dir, tmp_path, capsys):
    from tiny_setup import make_tiny_config
    workdir = str(tmp_path / "ladic")
    trainer.train_and_evaluate(make_tiny_config(tiny_data_dir, ["total_steps=1", "checkpoint.every_steps=1"]),
                               workdir)
    with pytest.raises(SystemExit) as e:
        convert_cli.main(["clip", "--workdir", workdir, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "no CLIP to export" in capsys.readouterr().err


def test_coca_coco_config_runlocal_on_karpathy_captions(real_data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train_cli.main(["--config", os.path.join(REPO, "configs/coca_coco.py:runlocal"), "--workdir", workdir,
                    f"--config.input.data_dir={real_data_dir}"])
    res = report.latest_eval(workdir)
    assert res["num_images"] == 2 and "clip_i2t_recall@1" in res and "sem_fully_correct" not in res


def test_coca_with_a_minilm_text_tower_trains_and_exports_as_a_dual_encoder(tiny_data_dir, tmp_path):
    """text_tower="bert" from the packaged MiniLM: its weights are loaded (pooler included), the run trains and
    evaluates, and the export is a VisionTextDualEncoderModel directory that the loader reads back exactly."""
    from tiny_setup import make_tiny_coca_config
    from ladic_jax.pretrained_paths import minilm_dir
    from ladic_jax.run_export import export_clip_of_run
    config = make_tiny_coca_config(tiny_data_dir, ["total_steps=1", "checkpoint.every_steps=1", "eval.limit=8"])
    with config.unlocked():
        config.model.clip.text_tower = "bert"
        config.model.clip.text_pretrained = "minilm"
        config.model.clip.config.text = None
    workdir = str(tmp_path / "run")
    fresh, notes = trainer.fresh_state(trainer.skeleton(config), config)
    minilm = load_pretrained(minilm_dir(), "bert", pooler=True).params
    np.testing.assert_array_equal(np.asarray(fresh["params"]["clip"]["text_model"]["pooler"]["kernel"]),
                                  np.asarray(minilm["pooler"]["kernel"]))
    assert any("text tower loaded from minilm" in n for n in notes)
    trainer.train_and_evaluate(config, workdir)
    assert "clip_i2t_recall@1" in report.latest_eval(workdir)
    path, step = export_clip_of_run(workdir, str(tmp_path / "export"))
    assert json.load(open(path / "config.json"))["model_type"] == "vision-text-dual-encoder"
    trained = trainer.restore(trainer.skeleton(config), workdir)[1]["params"]["clip"]
    loaded = load_pretrained(path, "clip").params
    for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(trained)[0], jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))
