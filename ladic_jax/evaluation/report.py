"""Evaluation results on disk: per-step JSON and captions, a text table and a plot of metrics vs step.

Layout under a run's workdir (local path or any `etils.epath` URL such as gs://):

    WORKDIR/eval/step_<N>.json            metrics of checkpoint N, plus num_images, sampling_steps,
                                          seconds_per_image (and anything else the caller adds)
    WORKDIR/eval/step_<N>_captions.jsonl  one record per image: image_id, caption, references
    WORKDIR/eval/metrics.txt, metrics.png written by `write_report`

Every file is written to a temporary name and renamed into place, so a crash leaves either the old file
or none, never half of one. The captions are written before the metrics, so the presence of
``step_<N>.json`` means the evaluation of step N is complete: that is what `evaluated_steps` lists.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from matplotlib.figure import Figure

EVAL_DIR = "eval"
TABLE_FILE = "metrics.txt"
PLOT_FILE = "metrics.png"
RUN_FIELDS = ("num_images", "sampling_steps", "seconds_per_image")
_METRICS_RE = re.compile(r"^step_(\d+)\.json$")

# (key in the metrics JSON, column title); scores are shown x100 as in papers.
SCORE_COLUMNS = (("bleu_1", "B@1"), ("bleu_2", "B@2"), ("bleu_3", "B@3"), ("bleu_4", "B@4"),
                 ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"), ("spice", "SPICE"))


def eval_dir(workdir: str | os.PathLike) -> epath.Path:
    """The directory holding a run's evaluation results."""
    return epath.Path(workdir) / EVAL_DIR


def metrics_path(workdir: str | os.PathLike, step: int) -> epath.Path:
    return eval_dir(workdir) / f"step_{step}.json"


def captions_path(workdir: str | os.PathLike, step: int) -> epath.Path:
    return eval_dir(workdir) / f"step_{step}_captions.jsonl"


def _write_atomically(path: epath.Path, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def _to_json(value: Any) -> Any:
    """json.dumps fallback for numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable: {value!r:.80}")


def _dumps(value: Any, **kwargs) -> str:
    return json.dumps(value, default=_to_json, ensure_ascii=False, **kwargs)


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return int(step)


def _check_caption_record(i: int, record: object) -> dict:
    if not isinstance(record, Mapping):
        raise TypeError(f"captions[{i}] must be a dict with image_id, caption, references; got "
                        f"{type(record).__name__}")
    missing = [k for k in ("image_id", "caption", "references") if k not in record]
    if missing:
        raise ValueError(f"captions[{i}] lacks {missing}; each record needs image_id, caption, references")
    image_id = record["image_id"]
    if isinstance(image_id, bool) or not isinstance(image_id, (numbers.Integral, str)):
        raise TypeError(f"captions[{i}]['image_id'] must be an int or str, got {image_id!r}")
    if not isinstance(record["caption"], str):
        raise TypeError(f"captions[{i}] (image {image_id!r}): caption must be a str, got "
                        f"{type(record['caption']).__name__}")
    refs = record["references"]
    if isinstance(refs, str) or not isinstance(refs, Sequence) or not all(isinstance(r, str) for r in refs):
        raise TypeError(f"captions[{i}] (image {image_id!r}): references must be a list of str, got "
                        f"{refs!r:.80}")
    image_id = image_id if isinstance(image_id, str) else int(image_id)
    ordered = {"image_id": image_id, "caption": record["caption"], "references": list(refs)}
    ordered.update({k: v for k, v in record.items() if k not in ordered})
    return ordered


def write_eval(workdir: str | os.PathLike, step: int, metrics: Mapping[str, Any],
               captions: Sequence[Mapping[str, Any]], *, sampling_steps: int, seconds_per_image: float,
               num_images: int | None = None) -> epath.Path:
    """Writes the evaluation of checkpoint `step`: ``eval/step_<N>.json`` and its captions beside it.

    Args:
      workdir: the run's directory.
      step: training step of the evaluated checkpoint.
      metrics: e.g. the output of `caption_metrics` (any JSON-serializable values; numpy scalars are
        converted).
      captions: one dict per image with ``image_id``, ``caption``, ``references`` (other keys are kept).
      sampling_steps: number of denoising steps used to sample the captions.
      seconds_per_image: sampling wall time per image.
      num_images: number of evaluated images; default ``len(captions)``, and it must equal it.

    Returns:
      The path of the metrics JSON. An existing evaluation of the same step is replaced.
    """
    step = _check_step(step)
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
        raise TypeError(f"metrics must be a dict with str keys, got {type(metrics).__name__}")
    clashes = sorted(set(metrics) & (set(RUN_FIELDS) | {"step"}))
    if clashes:
        raise ValueError(f"metrics must not contain {clashes}: write_eval sets those fields itself")
    if isinstance(captions, (str, Mapping)) or not isinstance(captions, Sequence):
        raise TypeError(f"captions must be a list of dicts, got {type(captions).__name__}")
    records = [_check_caption_record(i, r) for i, r in enumerate(captions)]
    if num_images is None:
        num_images = len(records)
    elif num_images != len(records):
        raise ValueError(f"num_images={num_images} but {len(records)} caption records were given")
    _check_step(sampling_steps)
    if (isinstance(seconds_per_image, bool) or not isinstance(seconds_per_image, numbers.Real)
            or not seconds_per_image >= 0):
        raise ValueError(f"seconds_per_image must be a non-negative number, got {seconds_per_image!r}")

    lines = "".join(_dumps(r) + "\n" for r in records)
    _write_atomically(captions_path(workdir, step), lines.encode("utf-8"))
    result = {"step": step, **metrics, "num_images": int(num_images),
              "sampling_steps": int(sampling_steps), "seconds_per_image": float(seconds_per_image)}
    path = metrics_path(workdir, step)
    _write_atomically(path, (_dumps(result, indent=2) + "\n").encode("utf-8"))
    return path


def evaluated_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps with a complete evaluation (a ``step_<N>.json``) in the workdir, ascending."""
    directory = eval_dir(workdir)
    if not directory.exists():
        return []
    steps = (_METRICS_RE.match(p.name) for p in directory.iterdir())
    return sorted(int(m.group(1)) for m in steps if m)


def read_evals(workdir: str | os.PathLike) -> dict[int, dict]:
    """All evaluations of a run: step -> the dict stored in ``step_<N>.json``, ascending by step."""
    evals = {}
    for step in evaluated_steps(workdir):
        path = metrics_path(workdir, step)
        try:
            evals[step] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    return evals


def read_captions(workdir: str | os.PathLike, step: int) -> list[dict]:
    """The caption records written with the evaluation of `step`."""
    path = captions_path(workdir, _check_step(step))
    records = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number} is not valid JSON: {e}") from e
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        return None
    return float(value)


_MISSING = object()


def _cell(record: Mapping[str, Any], key: str, scale: float = 100.0, fmt: str = ".2f") -> str:
    """A number formatted for the table; "n/a" for an explicit None (not computed), "-" if absent."""
    value = record.get(key, _MISSING)
    number = _number(value)
    if number is None:
        return "n/a" if value is None else "-"
    return format(number * scale, fmt)


def format_table(evals: Mapping[int, Mapping[str, Any]]) -> str:
    """An aligned text table, one row per step: B@1..B@4, METEOR, ROUGE-L, CIDEr, SPICE (x100), s/img.

    Also shows the number of sampling steps and images. A metric that was not computed (SPICE without
    its jars) shows "n/a"; a missing key shows "-".
    """
    header = ["step"] + [title for _, title in SCORE_COLUMNS] + ["s/img", "T", "images"]
    rows = []
    for step in sorted(evals):
        record = evals[step]
        row = [str(step)] + [_cell(record, key) for key, _ in SCORE_COLUMNS]
        row.append(_cell(record, "seconds_per_image", scale=1.0, fmt=".4g"))
        row.append(_cell(record, "sampling_steps", scale=1.0, fmt=".0f"))
        row.append(_cell(record, "num_images", scale=1.0, fmt=".0f"))
        rows.append(row)
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    rule = "-" * len(lines[0])
    caption = "scores x100; s/img = sampling seconds per image; T = sampling steps"
    return "\n".join([caption, lines[0], rule] + lines[1:]) + "\n"


def plot_metrics(evals: Mapping[int, Mapping[str, Any]], out_png: str | os.PathLike) -> None:
    """Plots every metric (x100) against the training step into a PNG.

    Left panel: BLEU-1..4, METEOR, ROUGE-L, SPICE; right panel: CIDEr (its own scale). Metrics absent
    from every evaluation are left out.
    """
    if not evals:
        raise ValueError("no evaluations to plot")
    steps = sorted(evals)

    def series(key: str) -> np.ndarray:
        return np.array([np.nan if (v := _number(evals[s].get(key))) is None else 100.0 * v
                         for s in steps])

    figure = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    panels = ((left, [c for c in SCORE_COLUMNS if c[0] != "cider"], "score x100"),
              (right, [c for c in SCORE_COLUMNS if c[0] == "cider"], "CIDEr-D x100"))
    for axes, columns, ylabel in panels:
        plotted = False
        for key, title in columns:
            values = series(key)
            if np.isnan(values).all():
                continue
            axes.plot(steps, values, marker="o", label=title)
            plotted = True
        axes.set_xlabel("training step")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        if plotted:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "not computed", ha="center", va="center", transform=axes.transAxes)
    left.set_title("caption metrics vs step")
    right.set_title("CIDEr vs step")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _write_atomically(epath.Path(out_png), buffer.getvalue())


def write_report(workdir: str | os.PathLike) -> tuple[epath.Path, epath.Path | None]:
    """Writes ``eval/metrics.txt`` (the table) and ``eval/metrics.png`` (the plot) from all evaluations.

    Returns their paths; the plot path is None when there is no evaluation yet.
    """
    evals = read_evals(workdir)
    table_path = eval_dir(workdir) / TABLE_FILE
    _write_atomically(table_path, format_table(evals).encode("utf-8"))
    if not evals:
        return table_path, None
    plot_path = eval_dir(workdir) / PLOT_FILE
    plot_metrics(evals, plot_path)
    return table_path, plot_path
