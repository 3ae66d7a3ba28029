"""Evaluation results on disk: round trips, atomic writes, the table and the plot."""

import json

import numpy as np
import pytest
from etils import epath
from PIL import Image

from ladic_jax.evaluation import report

METRICS_A = {"bleu_1": 0.7812, "bleu_2": np.float64(0.6153), "bleu_3": 0.4876, "bleu_4": np.float32(0.375),
             "meteor": 0.2943, "rouge_l": 0.5871, "cider": 1.2624, "spice": None,
             "spice_status": "unavailable: stanford-corenlp-3.6.0.jar is missing"}
METRICS_B = {"bleu_1": 0.8105, "bleu_2": 0.6617, "bleu_3": 0.5302, "bleu_4": 0.4149, "meteor": 0.3121,
             "rouge_l": 0.6112, "cider": 1.4318, "spice": 0.2231, "spice_status": "ok"}
CAPTIONS = [
    {"image_id": np.int64(7), "caption": "a red circle", "references": ["a red circle", "one red disc"]},
    {"image_id": "img_2", "caption": "", "references": ("a blue square",), "candidates": ["x", "y"]},
    {"image_id": 3, "caption": "ünïcode — caption", "references": ["a caption"]},
]


def _write_two(workdir):
    report.write_eval(workdir, 1000, METRICS_B, CAPTIONS, sampling_steps=30, seconds_per_image=0.125)
    report.write_eval(workdir, 200, METRICS_A, CAPTIONS, sampling_steps=5, seconds_per_image=np.float32(0.5),
                      num_images=3)


def test_round_trip(tmp_path):
    _write_two(tmp_path)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "step_1000.json", "step_1000_captions.jsonl", "step_200.json", "step_200_captions.jsonl"]
    assert report.evaluated_steps(tmp_path) == [200, 1000]
    evals = report.read_evals(tmp_path)
    assert list(evals) == [200, 1000]
    a = evals[200]
    assert a["step"] == 200 and a["tag"] == "" and a["num_images"] == 3 and a["sampling_steps"] == 5
    assert a["seconds_per_image"] == 0.5
    for key, value in METRICS_A.items():
        assert a[key] == (value if isinstance(value, (str, type(None))) else pytest.approx(float(value))), key
    assert evals[1000]["spice"] == pytest.approx(0.2231) and evals[1000]["sampling_steps"] == 30
    # The JSON itself is plain and readable by anything.
    raw = json.loads((tmp_path / "eval" / "step_200.json").read_text())
    assert raw == a

    records = report.read_captions(tmp_path, 200)
    assert records == [
        {"image_id": 7, "caption": "a red circle", "references": ["a red circle", "one red disc"]},
        {"image_id": "img_2", "caption": "", "references": ["a blue square"], "candidates": ["x", "y"]},
        {"image_id": 3, "caption": "ünïcode — caption", "references": ["a caption"]},
    ]
    lines = (tmp_path / "eval" / "step_200_captions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and list(json.loads(lines[0])) == ["image_id", "caption", "references"]


def test_rewriting_a_step_replaces_it(tmp_path):
    report.write_eval(tmp_path, 5, METRICS_A, CAPTIONS, sampling_steps=5, seconds_per_image=1.0)
    report.write_eval(tmp_path, 5, METRICS_B, CAPTIONS[:1], sampling_steps=5, seconds_per_image=2.0)
    evals = report.read_evals(tmp_path)
    assert evals[5]["bleu_4"] == pytest.approx(0.4149) and evals[5]["num_images"] == 1
    assert len(report.read_captions(tmp_path, 5)) == 1


def test_tagged_evaluations_sit_beside_the_default(tmp_path):
    # As the evaluator writes them: run fields inside the metrics dict, a tag for other sampler settings.
    _write_two(tmp_path)
    fields = {"num_images": 3, "sampling_steps": 30, "guidance": 1.0, "seconds_per_image": None}
    report.write_eval(tmp_path, 200, METRICS_B | fields, CAPTIONS, tag="_s30")
    report.write_eval(tmp_path, 1000, METRICS_A | fields | {"guidance": 2.5}, CAPTIONS, tag="_s30_w2.5")
    assert report.eval_tags(tmp_path) == ["", "_s30", "_s30_w2.5"]
    assert report.evaluated_steps(tmp_path) == [200, 1000]
    assert report.evaluated_steps(tmp_path, tag="_s30") == [200]
    assert report.evaluated_steps(tmp_path, tag="_s30_w2.5") == [1000]
    assert report.read_evals(tmp_path)[200]["bleu_4"] == pytest.approx(0.375)  # untouched by the tag
    tagged = report.read_evals(tmp_path, tag="_s30")[200]
    assert tagged["bleu_4"] == pytest.approx(0.4149) and tagged["tag"] == "_s30"
    assert tagged["seconds_per_image"] is None and tagged["guidance"] == 1.0
    assert len(report.read_captions(tmp_path, 200, tag="_s30")) == 3
    assert (tmp_path / "eval" / "step_200_s30_captions.jsonl").exists()
    everything = report.read_all_evals(tmp_path)
    assert [(r["tag"], r["step"]) for r in everything] == [("", 200), ("", 1000), ("_s30", 200),
                                                         ("_s30_w2.5", 1000)]
    table = report.format_table(everything)
    rows = [line.split() for line in table.split("\n")[3:] if line]
    assert table.split("\n")[1].split()[-4:] == ["s/img", "T", "w", "images"]
    assert rows[2][0] == "200" and rows[2][4] == "41.49" and rows[2][-4:] == ["n/a", "30", "1", "3"]
    assert rows[0][-4:] == ["0.5", "5", "-", "3"]
    assert rows[3][-2] == "2.5"


def test_empty_or_missing_workdir(tmp_path):
    assert report.evaluated_steps(tmp_path / "nothing") == []
    assert report.read_evals(tmp_path) == {}


def test_a_crash_while_writing_leaves_no_half_file(tmp_path, monkeypatch):
    report.write_eval(tmp_path, 5, METRICS_A, CAPTIONS, sampling_steps=5, seconds_per_image=1.0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "eval").iterdir()}
    path_class = type(epath.Path(tmp_path))
    real_write_bytes = path_class.write_bytes

    def crash_halfway(self, data):
        real_write_bytes(self, data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(path_class, "write_bytes", crash_halfway)
    with pytest.raises(OSError, match="simulated"):
        report.write_eval(tmp_path, 5, METRICS_B, CAPTIONS, sampling_steps=5, seconds_per_image=1.0)
    with pytest.raises(OSError, match="simulated"):
        report.write_eval(tmp_path, 9, METRICS_B, CAPTIONS, sampling_steps=5, seconds_per_image=1.0)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (tmp_path / "eval").iterdir()}
    assert after == before  # old files intact, no temporary files, nothing for step 9
    assert report.evaluated_steps(tmp_path) == [5]


def test_metrics_written_after_captions(tmp_path, monkeypatch):
    # A crash between the two files must not make the step look evaluated.
    calls = []
    real = report._write_atomically

    def record(path, data):
        calls.append(path.name)
        real(path, data)

    monkeypatch.setattr(report, "_write_atomically", record)
    report.write_eval(tmp_path, 3, METRICS_A, CAPTIONS, sampling_steps=5, seconds_per_image=1.0)
    assert calls == ["step_3_captions.jsonl", "step_3.json"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(step=-1), ValueError, "step must be an int >= 0"),
    (dict(sampling_steps=0), ValueError, "sampling_steps must be an int >= 1"),
    (dict(metrics={"step": 3}), ValueError, r"must not contain \['step'\]"),
    (dict(metrics={"num_images": 7}, num_images=None), ValueError, r"num_images=7 but 3 caption records"),
    (dict(metrics={"sampling_steps": 30}), ValueError, r"sampling_steps is given twice.*5.*30"),
    (dict(sampling_steps=None), ValueError, r"sampling_steps is required"),
    (dict(tag="s30"), ValueError, r"tag must be '' or '_'"),
    (dict(tag="_a/b"), ValueError, r"tag must be"),
    (dict(captions=[{"image_id": 1, "caption": "a"}]), ValueError, r"captions\[0\] lacks \['references'\]"),
    (dict(captions=[{"image_id": 1, "caption": 2, "references": []}]), TypeError, r"image 1.*caption must"),
    (dict(captions=[{"image_id": 1.5, "caption": "a", "references": []}]), TypeError, "image_id"),
    (dict(num_images=4), ValueError, r"num_images=4 but 3 caption records"),
    (dict(seconds_per_image=-1.0), ValueError, "seconds_per_image"),
    (dict(metrics={"x": object()}), TypeError, "not JSON serializable"),
])
def test_bad_input(tmp_path, kwargs, error, match):
    args = dict(workdir=tmp_path, step=1, metrics=METRICS_A, captions=CAPTIONS, sampling_steps=5,
                seconds_per_image=0.1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        report.write_eval(**args)
    assert report.evaluated_steps(tmp_path) == []


def test_format_table(tmp_path):
    _write_two(tmp_path)
    table = report.format_table(report.read_evals(tmp_path))
    lines = table.rstrip("\n").split("\n")
    header = lines[1].split()
    assert header == ["step", "B@1", "B@2", "B@3", "B@4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "s/img", "T",
                      "images"]
    rows = [line.split() for line in lines[3:]]
    assert [r[0] for r in rows] == ["200", "1000"]
    assert rows[0][1:] == ["78.12", "61.53", "48.76", "37.50", "29.43", "58.71", "126.24", "n/a", "0.5", "5", "3"]
    assert rows[1][1:] == ["81.05", "66.17", "53.02", "41.49", "31.21", "61.12", "143.18", "22.31", "0.125", "30",
                           "3"]
    # Aligned: every column ends at the same offset in every line.
    widths = {len(line) for line in lines[1:2] + lines[3:]}
    assert len(widths) == 1
    ends = [[i for i in range(len(line)) if line[i] != " " and (i + 1 == len(line) or line[i + 1] == " ")]
            for line in lines[1:2] + lines[3:]]
    assert all(e == ends[0] for e in ends)
    missing = report.format_table({4: {"bleu_1": 0.5}})
    assert missing.split("\n")[3].split() == ["4", "50.00"] + ["-"] * 10


def test_plot_metrics_with_two_tags(tmp_path):
    _write_two(tmp_path)
    fields = {"sampling_steps": 30, "seconds_per_image": 0.9}
    report.write_eval(tmp_path, 200, METRICS_B | fields, CAPTIONS, tag="_s30")
    report.write_eval(tmp_path, 1000, METRICS_B | fields | {"bleu_4": 0.45}, CAPTIONS, tag="_s30")
    out = tmp_path / "two.png"
    report.plot_metrics(report.read_all_evals(tmp_path), out)
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (450, 1200, 3) and len(np.unique(image.reshape(-1, 3), axis=0)) > 50


def test_plot_metrics(tmp_path):
    _write_two(tmp_path)
    report.write_eval(tmp_path, 600, METRICS_A | {"bleu_4": 0.39, "cider": 1.31}, CAPTIONS, sampling_steps=5,
                      seconds_per_image=0.3)
    out = tmp_path / "plots" / "metrics.png"
    report.plot_metrics(report.read_evals(tmp_path), out)
    assert out.stat().st_size > 20_000
    image = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    assert image.shape == (450, 1200, 3)
    # Not blank: many distinct colours (lines of several metrics, text), mostly white background.
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 50
    assert (image == 255).all(axis=-1).mean() > 0.5
    assert [p.name for p in out.parent.iterdir()] == ["metrics.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="no evaluations"):
        report.plot_metrics({}, tmp_path / "x.png")


def test_write_report(tmp_path):
    table_path, plot_path = report.write_report(tmp_path)
    assert plot_path is None and "step" in table_path.read_text()
    _write_two(tmp_path)
    table_path, plot_path = report.write_report(tmp_path)
    assert "126.24" in table_path.read_text() and plot_path.exists()
    assert report.evaluated_steps(tmp_path) == [200, 1000]  # the report files are not steps


def test_run_summary_and_comparison(tmp_path):
    """A run's newest evaluation with its family (config.json), trainable parameters (params.json) and training
    minutes up to the evaluated step (summed from the logged steps/s: 100 steps at 2/s + 100 at 1/s = 150 s)."""
    wd = tmp_path / "run"
    report.write_eval(str(wd), 200, {"bleu_4": 0.41, "cider": 2.5, "dist_2": 0.12},
                      [{"image_id": 1, "caption": "a b", "references": ["a b"]}], sampling_steps=20)
    (wd / "config.json").write_text(json.dumps({"family": "prefix_diffusion"}))
    report.write_param_counts(str(wd), 1000, 600)
    (wd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 100, "train/steps_per_sec": 2.0}, {"step": 200, "train/steps_per_sec": 1.0},
        {"step": 300, "train/steps_per_sec": 1.0})) + "\n")
    summary = report.run_summary(str(wd))
    assert summary["family"] == "prefix_diffusion" and summary["trainable_parameters"] == 600
    assert summary["train_minutes"] == pytest.approx(150 / 60) and summary["step"] == 200
    table = report.format_comparison([("A", summary), ("B", {"bleu_4": 0.2, "step": 7})], markdown=True)
    lines = table.splitlines()
    assert lines[2].startswith("| run | family | step | train min | params | B@4 | CIDEr | Dist-2 |")
    assert lines[4] == "| A | prefix_diffusion | 200 | 2.5 | 0.00 | 41.0 | 250.0 | 12.0 | 20 | 1 |"
    assert lines[5].startswith("| B | - | 7 | - | - | 20.0 |")
    report.plot_comparison([("A", summary), ("B", {"bleu_4": 0.2})], tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size[0] > 0


def test_sweep_with_clip_scores_plots_the_tradeoff(tmp_path):
    """A guidance sweep with CLIPScores adds the CLIPScore-vs-BLEU/CIDEr figure, one line per guidance kind."""
    records = [{"bleu_4": 0.3 + 0.02 * s, "cider": 1.0 + 0.1 * s, "meteor": 0.3, "rouge_l": 0.5,
                "clip_score": 2.0 - 0.05 * s * (k == "cfg"), "num_images": 4, "sampling_steps": 10,
                "sampler": {"steps": 10, "guidance": float(s), "guidance_kind": k}}
               for s in (1, 2, 3) for k in ("mcs", "cfg")]
    table, plots = report.write_sweep(str(tmp_path), 7, records, ["guidance", "guidance_kind"])
    names = [p.name for p in plots]
    assert f"{report.sweep_name(7, ['guidance', 'guidance_kind'])}_clipscore_tradeoff.png" in names
    assert all(p.exists() and p.read_bytes()[:4] == b"\x89PNG" for p in plots)
    without = [{k: v for k, v in r.items() if k != "clip_score"} for r in records]
    _, plots = report.write_sweep(str(tmp_path), 8, without, ["guidance", "guidance_kind"])
    assert not any("tradeoff" in p.name for p in plots)
    with pytest.raises(ValueError, match="clip_score"):
        report.plot_tradeoff(without, ["guidance"], "guidance", tmp_path / "x.png")
