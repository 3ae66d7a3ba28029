"""The command-line tools end to end: every config's runlocal variant trains and evaluates,
ladic-eval evaluates checkpoints (skipping done ones), ladic-caption captions files and reports bad ones."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from ladic_jax import trainer
from ladic_jax.cli import caption as caption_cli
from ladic_jax.cli import eval as eval_cli
from ladic_jax.cli import train as train_cli
from ladic_jax.evaluation import report
from tiny_setup import REPO


def test_shapes_config_runlocal_smoke(tiny_data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train_cli.main(["--config", os.path.join(REPO, "configs/ladic_shapes.py:runlocal"), "--workdir", workdir,
                    f"--config.input.data_dir={tiny_data_dir}", "--config.input.dataset=shapes_captions/tiny"])
    assert report.evaluated_steps(workdir, tag="_s2") == [4]
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())[-1] == 4


def test_coco_config_runlocal_on_karpathy_captions(real_data_dir, tmp_path):
    """On karpathy_captions/coco built from a fake COCO in the true layout (tests/fake_datasets.py)."""
    workdir = str(tmp_path / "run")
    train_cli.main(["--config", os.path.join(REPO, "configs/ladic_coco.py:runlocal"), "--workdir", workdir,
                    f"--config.input.data_dir={real_data_dir}"])
    res = json.loads(report.metrics_path(workdir, 2).read_text())
    # The fake Karpathy test split: 3 images, one of them not an image (skipped and counted).
    assert res["num_images"] == 2 and res["data/skipped_corrupt_image"] == 1


def test_coco_config_on_tfds_coco_captions_under_mock_data(mock_coco, tmp_path):
    """data=coco_captions: TFDS's own COCO (mocked), the alternative to karpathy_captions/coco."""
    workdir = str(tmp_path / "run")
    train_cli.main(["--config", os.path.join(REPO, "configs/ladic_coco.py:runlocal,data=coco_captions"),
                    "--workdir", workdir, f"--config.input.data_dir={mock_coco}"])
    res = json.loads(report.metrics_path(workdir, 2).read_text())
    assert res["num_images"] == 5  # the mocked Karpathy test split, each image once


def test_bad_override_exits_with_the_field_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--config", os.path.join(REPO, "configs/ladic_shapes.py"), "--workdir", str(tmp_path),
                        "--config.optim.lr=-1"])
    assert e.value.code != 0
    assert "config.optim.lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["--config", os.path.join(REPO, "configs/ladic_shapes.py"), "--workdir", str(tmp_path),
                        "--config.optim.no_such_field=1"])
    assert "no_such_field" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tiny_data_dir, tmp_path_factory):
    from tiny_setup import make_tiny_config
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    trainer.train_and_evaluate(make_tiny_config(tiny_data_dir, ["total_steps=4", "checkpoint.every_steps=2"]),
                               workdir)
    return workdir


def test_eval_cli_evaluates_every_checkpoint_and_skips_done_ones(tiny_run, capsys):
    eval_cli.main(["--workdir", tiny_run, "--sampling-steps", "2", "--limit", "8"])
    out = capsys.readouterr().out
    assert report.evaluated_steps(tiny_run, tag="_s2") == [2, 4]
    assert "BLEU-4" in out or "B@4" in out
    assert os.path.exists(os.path.join(tiny_run, "eval", "metrics.png"))
    eval_cli.main(["--workdir", tiny_run, "--sampling-steps", "2", "--limit", "8"])
    assert out.count("skipping") == 0 and capsys.readouterr().out.count("already evaluated, skipping") == 2


def test_eval_cli_split_evaluates_another_split_beside_the_runs_own(tiny_run):
    eval_cli.main(["--workdir", tiny_run, "--step", "4", "--sampling-steps", "2", "--limit", "8", "--split", "train"])
    assert report.evaluated_steps(tiny_run, tag="_s2_train") == [4]
    eval_cli.main(["--workdir", tiny_run, "--step", "4", "--sampling-steps", "2", "--limit", "8"])  # (done: skipped)
    train_ids = {r["image_id"] for r in report.read_captions(tiny_run, 4, "_s2_train")}
    assert len(train_ids) == 8 and not train_ids & {r["image_id"] for r in report.read_captions(tiny_run, 4, "_s2")}


def test_eval_cli_unknown_step_fails_clearly(tiny_run, capsys):
    with pytest.raises(SystemExit):
        eval_cli.main(["--workdir", tiny_run, "--step", "3"])
    assert "no checkpoint for step(s) [3]" in capsys.readouterr().err


def test_caption_cli_captions_good_files_and_reports_bad_ones(tiny_run, tmp_path, capsys):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(d / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (80, 50), np.uint8), "L").save(d / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), np.uint8), "RGBA").save(d / "rgba.png")
    pal = Image.fromarray(rng.integers(0, 4, (30, 30), np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    pal.save(d / "palette.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), np.uint8), "CMYK").save(d / "cmyk.jpg")
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(d / "sub" / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), np.uint8)).save(d / "sub" / "pic.webp")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 255, (30, 60, 3), np.uint8)).save(d / "rotated.jpg", exif=exif.tobytes())
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image: skipped by extension")
    (tmp_path / "nothing").mkdir()
    # batch size 3: four batches (the last one padded), progress bar forced on
    caption_cli.main(["--workdir", tiny_run, "--steps", "2", "--json", "--batch-size", "3", "--progress",
                      str(d), str(tmp_path / "nothing")])
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    names = [os.path.relpath(r["path"], d) for r in records]
    assert names == ["cmyk.jpg", "corrupt.png", "empty.jpg", "gray.jpg", "palette.png", "rgb.png", "rgba.png",
                     "rotated.jpg", "sub/anim.gif", "sub/pic.webp", "../nothing"]  # sorted, in input order
    by_name = dict(zip(names, records))
    for good in ("rgb.png", "gray.jpg", "rgba.png", "palette.png", "cmyk.jpg", "sub/anim.gif", "sub/pic.webp",
                 "rotated.jpg"):
        assert by_name[good]["error"] is None and isinstance(by_name[good]["caption"], str), good
    assert "0 bytes" in by_name["empty.jpg"]["error"] and by_name["empty.jpg"]["caption"] is None
    assert by_name["corrupt.png"]["error"].startswith(str(d / "corrupt.png"))
    assert "without image files" in by_name["../nothing"]["error"]
    assert "3 file(s) could not be read" in captured.err
    assert "captioning" in captured.err and "11/11" in captured.err  # the progress bar, on stderr


TEMPLATE = "a [MASK] square above a small [MASK] circle"


def test_caption_cli_infills_a_template_and_shows_every_step(tiny_run, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(image)
    caption_cli.main(["--workdir", tiny_run, "--steps", "3", "--show-steps", "--template", TEMPLATE, str(image)])
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [line[:2] for line in lines[:3]] == [[str(image), f"step {i + 1}/3 t={t}"]
                                               for i, t in enumerate((999, 666, 333))]
    assert len(lines) == 4 and lines[3][0] == str(image)
    assert lines[2][2] == lines[3][1]  # the last step's caption is the caption
    for caption in (line[-1] for line in lines):
        words = iter(caption.split())
        assert all(w in words for w in TEMPLATE.split() if w != "[MASK]"), caption  # given words, in order

    with pytest.raises(SystemExit):
        caption_cli.main(["--workdir", tiny_run, "--template", "a red circle", str(image)])
    assert "has no [MASK] blank" in capsys.readouterr().err


def test_eval_cli_rejects_bad_sampler_settings_naming_the_field(tiny_run, capsys):
    with pytest.raises(SystemExit):
        eval_cli.main(["--workdir", tiny_run, "--config.sampler.back_refine.keep=1.5"])
    assert "config.sampler.back_refine.keep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main(["--workdir", tiny_run, "--mbr", "0"])
    assert "config.sampler.mbr" in capsys.readouterr().err


def test_eval_cli_mbr_and_trajectory_are_recorded(tiny_run):
    eval_cli.main(["--workdir", tiny_run, "--step", "4", "--sampling-steps", "2", "--mbr", "2", "--trajectory",
                   "--limit", "8"])
    res = json.loads(report.metrics_path(tiny_run, 4, "_s2_mbr2").read_text())
    assert (res["sampling_steps"], res["sampler"]["mbr"], res["num_images"]) == (2, 2, 8)
    assert res["trajectory_timesteps"] == [999, 499] and len(res["latent_distance"]) == 2
    assert res["latent_distance"][-1] == 0.0 and res["latent_distance"][0] > 0
    for record in report.read_captions(tiny_run, 4, "_s2_mbr2"):
        assert len(record["candidates"]) == 2 and record["caption"] in record["candidates"]


def test_eval_cli_sweep_writes_the_grid_and_skips_done_points(tiny_run, capsys, monkeypatch):
    """The grid, its file names, table and plots; each point's evaluation is replaced by a fake that
    records the sampler settings it was given (the real evaluation is tested above)."""
    from ladic_jax.evaluation import offline
    calls = []

    def fake_run(self, params, *, step, workdir, limit, tag, sampler_cfg, trajectory, split=None):
        calls.append((sampler_cfg.steps, sampler_cfg.guidance, sampler_cfg.mbr))
        res = {"num_images": 1, "sampling_steps": sampler_cfg.steps, "guidance": sampler_cfg.guidance,
               "sampler": sampler_cfg.to_dict(), "bleu_4": 0.1 * sampler_cfg.steps, "meteor": 0.2,
               "rouge_l": 0.3, "cider": sampler_cfg.guidance}
        report.write_eval(workdir, step, res, [{"image_id": 0, "caption": "c", "references": ["c"]}], tag=tag)
        return res

    monkeypatch.setattr(offline.Evaluator, "run", fake_run)
    args = ["--workdir", tiny_run, "--step", "4", "--sweep", "steps=1,3", "guidance=0,2", "--mbr", "3"]
    eval_cli.main(args)
    assert sorted(calls) == [(1, 0.0, 3), (1, 2.0, 3), (3, 0.0, 3), (3, 2.0, 3)]
    # Tags name what differs from the run's sampler (5 steps, guidance 1, no MBR).
    for tag in ("_s1_w0_mbr3", "_s1_w2_mbr3", "_s3_w0_mbr3", "_s3_w2_mbr3"):
        assert report.evaluated_steps(tiny_run, tag=tag) == [4]
    name = report.sweep_name(4, ["steps", "guidance"])
    table = (report.eval_dir(tiny_run) / f"{name}.txt").read_text().splitlines()
    assert len(table) == 3 + 4
    columns = table[1].split()
    rows = sorted((row.split()[columns.index("T")], row.split()[columns.index("w")], row.split()[columns.index("B@4")])
                  for row in table[3:])
    assert rows == [("1", "0", "10.00"), ("1", "2", "10.00"), ("3", "0", "30.00"), ("3", "2", "30.00")]
    for axis in ("steps", "guidance"):
        assert os.path.getsize(str(report.eval_dir(tiny_run) / f"{name}_vs_{axis}.png")) > 0
    capsys.readouterr()
    eval_cli.main(args)
    assert len(calls) == 4 and capsys.readouterr().out.count("already evaluated, skipping") == 4
