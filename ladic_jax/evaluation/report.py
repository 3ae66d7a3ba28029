"""Evaluation results on disk: per-step JSON and captions, a text table and a plot of metrics vs step.

Layout under a run's workdir (local path or any `etils.epath` URL such as gs://):

    WORKDIR/eval/step_<N><TAG>.json            metrics of checkpoint N, plus step, tag, num_images,
                                               sampling_steps, seconds_per_image (and anything else
                                               the caller adds, e.g. guidance)
    WORKDIR/eval/step_<N><TAG>_captions.jsonl  one record per image: image_id, caption, references
    WORKDIR/eval/metrics.txt, metrics.png      written by `write_report`

TAG is "" for an evaluation with the run's own sampler settings, or a suffix such as "_s30" (30
sampling steps) or "_s5_w2" so that several evaluations of one checkpoint sit side by side.

Every file is written to a temporary name and renamed into place, so a crash leaves either the old file
or none, never half of one. The captions are written before the metrics, so the presence of
``step_<N><TAG>.json`` means that evaluation is complete: that is what `evaluated_steps` lists.
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
from matplotlib.lines import Line2D

EVAL_DIR = "eval"
TABLE_FILE = "metrics.txt"
PLOT_FILE = "metrics.png"
_METRICS_RE = re.compile(r"^step_(\d+)((?:_[A-Za-z0-9.=+-][A-Za-z0-9_.=+-]*)?)\.json$")
_TAG_RE = re.compile(r"^(?:_[A-Za-z0-9.=+-][A-Za-z0-9_.=+-]*)?$")

# (key in the metrics JSON, column title); scores are shown x100 as in papers.
SCORE_COLUMNS = (("bleu_1", "B@1"), ("bleu_2", "B@2"), ("bleu_3", "B@3"), ("bleu_4", "B@4"),
                 ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"), ("spice", "SPICE"))
# Shown when some evaluation has them: CLIPScore / RefCLIPScore (x100, as papers print them) and, on the
# synthetic shapes data, the percentage of captions that are fully correct.
OPTIONAL_COLUMNS = (("clip_score", "CLIP-S"), ("ref_clip_score", "RefCLIP-S"), ("sem_fully_correct", "correct%"))


def eval_dir(workdir: str | os.PathLike) -> epath.Path:
    """The directory holding a run's evaluation results."""
    return epath.Path(workdir) / EVAL_DIR


def _check_tag(tag: object) -> str:
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise ValueError(f"tag must be '' or '_' followed by letters, digits and _.=+- (e.g. '_s30'), "
                         f"got {tag!r}")
    return tag


def metrics_path(workdir: str | os.PathLike, step: int, tag: str = "") -> epath.Path:
    return eval_dir(workdir) / f"step_{_check_step(step)}{_check_tag(tag)}.json"


def captions_path(workdir: str | os.PathLike, step: int, tag: str = "") -> epath.Path:
    return eval_dir(workdir) / f"step_{_check_step(step)}{_check_tag(tag)}_captions.jsonl"


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


def _check_int(value: object, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_step(step: object) -> int:
    return _check_int(step, "step")


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
               captions: Sequence[Mapping[str, Any]], *, tag: str = "", sampling_steps: int | None = None,
               seconds_per_image: float | None = None, num_images: int | None = None) -> epath.Path:
    """Writes the evaluation of checkpoint `step`: ``eval/step_<N><tag>.json`` and its captions beside it.

    Args:
      workdir: the run's directory.
      step: training step of the evaluated checkpoint.
      metrics: e.g. the output of `caption_metrics`, plus anything else JSON-serializable (numpy scalars
        are converted). It may carry the run fields below instead of the keyword arguments.
      captions: one dict per image with ``image_id``, ``caption``, ``references`` (other keys are kept).
      tag: "" or a suffix such as "_s30" naming non-default sampler settings.
      sampling_steps: number of denoising steps used to sample the captions (required, here or in
        `metrics`).
      seconds_per_image: sampling wall time per image (None if it could not be measured).
      num_images: number of evaluated images; default ``len(captions)``, and it must equal it.

    Returns:
      The path of the metrics JSON. An earlier evaluation with the same step and tag is replaced.
    """
    step, tag = _check_step(step), _check_tag(tag)
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
        raise TypeError(f"metrics must be a dict with str keys, got {type(metrics).__name__}")
    clashes = sorted({"step", "tag"} & set(metrics))
    if clashes:
        raise ValueError(f"metrics must not contain {clashes}: write_eval sets those fields itself")
    if isinstance(captions, (str, Mapping)) or not isinstance(captions, Sequence):
        raise TypeError(f"captions must be a list of dicts, got {type(captions).__name__}")
    records = [_check_caption_record(i, r) for i, r in enumerate(captions)]

    fields = {}
    given = {"num_images": num_images, "sampling_steps": sampling_steps,
             "seconds_per_image": seconds_per_image}
    for name, value in given.items():
        if value is not None and metrics.get(name) is not None and metrics[name] != value:
            raise ValueError(f"{name} is given twice with different values: {value!r} as an argument, "
                             f"{metrics[name]!r} in metrics")
        fields[name] = value if value is not None else metrics.get(name)
    if fields["num_images"] is None:
        fields["num_images"] = len(records)
    elif fields["num_images"] != len(records):
        raise ValueError(f"num_images={fields['num_images']} but {len(records)} caption records were given")
    if fields["sampling_steps"] is None:
        raise ValueError("sampling_steps is required (as an argument or in metrics)")
    fields["sampling_steps"] = _check_int(fields["sampling_steps"], "sampling_steps", minimum=1)
    seconds = fields["seconds_per_image"]
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not seconds >= 0:
            raise ValueError(f"seconds_per_image must be a non-negative number or None, got {seconds!r}")
        fields["seconds_per_image"] = float(seconds)
    fields["num_images"] = int(fields["num_images"])

    lines = "".join(_dumps(r) + "\n" for r in records)
    _write_atomically(captions_path(workdir, step, tag), lines.encode("utf-8"))
    return write_metrics(workdir, step, {**metrics, **fields}, tag=tag)


def write_metrics(workdir: str | os.PathLike, step: int, metrics: Mapping[str, Any], *, tag: str = "") -> epath.Path:
    """Writes ``eval/step_<N><tag>.json`` = {step, tag, **metrics} (no captions: e.g. an image autoencoder's
    evaluation); ``write_eval`` writes captioners' through it."""
    step, tag = _check_step(step), _check_tag(tag)
    path = metrics_path(workdir, step, tag)
    _write_atomically(path, (_dumps({"step": step, "tag": tag, **metrics}, indent=2) + "\n").encode("utf-8"))
    return path


def _metrics_files(workdir: str | os.PathLike) -> list[tuple[str, int]]:
    """(tag, step) of every complete evaluation, sorted."""
    directory = eval_dir(workdir)
    if not directory.exists():
        return []
    found = (_METRICS_RE.match(p.name) for p in directory.iterdir())
    return sorted((m.group(2), int(m.group(1))) for m in found if m)


def eval_tags(workdir: str | os.PathLike) -> list[str]:
    """The tags of the evaluations in the workdir ("" first when present)."""
    return sorted({tag for tag, _ in _metrics_files(workdir)})


def evaluated_steps(workdir: str | os.PathLike, tag: str = "") -> list[int]:
    """Steps with a complete evaluation (``step_<N><tag>.json``) in the workdir, ascending."""
    _check_tag(tag)
    return [step for t, step in _metrics_files(workdir) if t == tag]


def _read_json(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def read_eval(workdir: str | os.PathLike, step: int, tag: str = "") -> dict:
    """The stored evaluation of checkpoint `step` with `tag`."""
    return _read_json(metrics_path(workdir, step, tag))


def read_evals(workdir: str | os.PathLike, tag: str = "") -> dict[int, dict]:
    """The evaluations of a run with one tag: step -> the dict stored in its JSON, ascending by step."""
    return {step: _read_json(metrics_path(workdir, step, tag)) for step in evaluated_steps(workdir, tag)}


def read_all_evals(workdir: str | os.PathLike) -> list[dict]:
    """Every evaluation of a run, all tags, sorted by (tag, step); each dict has "step" and "tag"."""
    records = []
    for tag, step in _metrics_files(workdir):
        record = _read_json(metrics_path(workdir, step, tag))
        record.setdefault("step", step)
        record.setdefault("tag", tag)
        records.append(record)
    return records


def read_captions(workdir: str | os.PathLike, step: int, tag: str = "") -> list[dict]:
    """The caption records written with the evaluation of `step` (and `tag`)."""
    path = captions_path(workdir, step, tag)
    records = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number} is not valid JSON: {e}") from e
    return records


Evals = Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]]


def _as_records(evals: Evals) -> list[Mapping[str, Any]]:
    """{step: record} (as from `read_evals`) or a list of records (as from `read_all_evals`)."""
    if isinstance(evals, Mapping):
        return [{**evals[step], "step": step} for step in sorted(evals)]
    if isinstance(evals, str) or not isinstance(evals, Sequence):
        raise TypeError(f"evals must be a dict step -> record or a list of records, got "
                        f"{type(evals).__name__}")
    for i, record in enumerate(evals):
        if not isinstance(record, Mapping) or "step" not in record:
            raise ValueError(f"evals[{i}] must be a dict with a 'step' key")
    return list(evals)


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


def sampler_value(record: Mapping[str, Any], field: str) -> Any:
    """A sampler setting of an evaluation, by dotted name ("steps", "back_refine.keep"), from its
    stored ``sampler`` section (``sampling_steps``/``guidance`` for records without one); None if absent."""
    node: Any = record.get("sampler")
    for name in field.split("."):
        node = node.get(name) if isinstance(node, Mapping) else None
    if node is None:
        node = record.get({"steps": "sampling_steps", "guidance": "guidance"}.get(field, ""))
    return node


def format_table(evals: Evals, sampler_fields: Sequence[str] = (), show_tag: bool = False) -> str:
    """An aligned text table, one row per evaluation: B@1..B@4, METEOR, ROUGE-L, CIDEr, SPICE (x100), s/img.

    Also shows the sampling steps T, the guidance w when any evaluation records one, the number of
    images, a column per name in `sampler_fields` (a sampler setting, see `sampler_value`) and, with
    `show_tag`, the evaluation's file tag (which names its sampler settings, e.g. "_mbr5"). A metric
    that was not computed (SPICE without its jars) shows "n/a"; a missing key "-".
    Rows come in step order for a {step: record} dict, in list order for a list of records.
    """
    records = _as_records(evals)
    scores = list(SCORE_COLUMNS) + [c for c in OPTIONAL_COLUMNS if any(c[0] in r for r in records)]
    extra = [("seconds_per_image", "s/img", ".4g"), ("sampling_steps", "T", ".0f")]
    if any("guidance" in r for r in records):
        extra.append(("guidance", "w", "g"))
    extra.append(("num_images", "images", ".0f"))
    header = ["step"] + [title for _, title in scores] + [title for _, title, _ in extra]
    header += list(sampler_fields) + (["tag"] if show_tag else [])
    rows = []
    for record in records:
        row = [str(record["step"])] + [_cell(record, key) for key, _ in scores]
        row += [_cell(record, key, scale=1.0, fmt=fmt) for key, _, fmt in extra]
        row += [_setting(sampler_value(record, field)) for field in sampler_fields]
        row += [record.get("tag") or "-"] if show_tag else []
        rows.append(row)
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    rule = "-" * len(lines[0])
    caption = "scores x100; s/img = sampling seconds per image; T = sampling steps"
    if any("guidance" in r for r in records):
        caption += "; w = guidance"
    return "\n".join([caption, lines[0], rule] + lines[1:]) + "\n"


# Columns of `format_comparison`: (key, title, scale, format).
COMPARISON_COLUMNS = (("train_minutes", "train min", 1, ".1f"), ("trainable_parameters", "params", 1e-6, ".2f"),
                      ("bleu_4", "B@4", 100, ".1f"), ("cider", "CIDEr", 100, ".1f"), ("meteor", "METEOR", 100, ".1f"),
                      ("clip_score", "CLIP-S", 100, ".1f"), ("ref_clip_score", "RefCLIP-S", 100, ".1f"),
                      ("sem_fully_correct", "correct%", 100, ".1f"), ("sem_object_f1", "objF1", 100, ".1f"),
                      ("sem_relation_accuracy", "rel%", 100, ".1f"), ("dist_2", "Dist-2", 100, ".1f"),
                      ("self_bleu", "self-B", 100, ".1f"), ("seconds_per_image", "s/img", 1, ".4f"),
                      ("sampling_steps", "steps", 1, ".0f"), ("num_images", "images", 1, ".0f"))


def latest_eval(workdir: str | os.PathLike, tag: str = "") -> dict:
    """The evaluation with ``tag`` of the newest evaluated checkpoint of a run (with its "step")."""
    steps = evaluated_steps(workdir, tag)
    if not steps:
        have = ", ".join(repr(t) for t in eval_tags(workdir)) or "none"
        raise FileNotFoundError(f"{workdir} has no evaluation with tag {tag!r} (tags there: {have})")
    return {**read_eval(workdir, steps[-1], tag), "step": steps[-1]}


def train_seconds(workdir: str | os.PathLike) -> dict[int, float]:
    """Cumulative training seconds at each logged step of a run, from the logged steps/s (start-up and
    evaluations excluded); empty without a metrics.jsonl."""
    out, total, last = {}, 0.0, 0
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rate = rec.get("train/steps_per_sec")
        if rate:
            total += (rec["step"] - last) / rate
            last = rec["step"]
            out[rec["step"]] = total
    return out


PARAMS_FILE = "params.json"


def write_param_counts(workdir: str | os.PathLike, total: int, trainable: int) -> None:
    """Records a run's parameter counts (the trainer, at the start) for comparison tables."""
    _write_atomically(epath.Path(workdir) / PARAMS_FILE, _dumps({"parameters": total, "trainable": trainable}).encode())


def run_summary(workdir: str | os.PathLike, tag: str = "") -> dict:
    """The newest evaluation of a run (``latest_eval``) with what the run says of itself: ``family`` (its
    config.json), ``trainable_parameters`` (params.json) and ``train_minutes`` up to the evaluated step."""
    record = latest_eval(workdir, tag)
    wd = epath.Path(workdir)
    if (wd / "config.json").exists():
        record["family"] = json.loads((wd / "config.json").read_text()).get("family")
    if (wd / PARAMS_FILE).exists():
        record["trainable_parameters"] = json.loads((wd / PARAMS_FILE).read_text()).get("trainable")
    seconds = [s for step, s in train_seconds(workdir).items() if step <= record["step"]]
    if seconds:
        record["train_minutes"] = max(seconds) / 60
    return record


def format_comparison(rows: Sequence[tuple[str, Mapping[str, Any]]], markdown: bool = False) -> str:
    """A table comparing evaluations of different runs, one (label, record) per row: family, training step
    and minutes, trainable parameters, BLEU-4, CIDEr, METEOR, CLIPScore, RefCLIPScore, semantic accuracy
    where known, Dist-2, self-BLEU (x100), seconds per image and sampling steps; columns no row has are left
    out. ``markdown``: a Markdown table."""
    columns = [c for c in COMPARISON_COLUMNS if any(_number(r.get(c[0])) is not None for _, r in rows)]
    header = ["run", "family", "step"] + [title for _, title, _, _ in columns]
    body = [[label, str(r.get("family") or "-"), str(r.get("step", "-"))]
            + [_cell(r, key, scale=scale, fmt=fmt) for key, _, scale, fmt in columns] for label, r in rows]
    note = ("scores x100; correct% = captions entirely right (shapes data), objF1 = object F1, rel% = relations "
            "true; Dist-2 = distinct bigrams / words; self-B = self-BLEU-4 over each image's candidates; "
            "params = trainable parameters (millions); train min = training time to that step; s/img = sampling "
            "seconds per image; steps = sequential model calls per caption")
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in [header] + body]
        return "\n".join([note, "", lines[0], "|" + "---|" * len(header)] + lines[1:]) + "\n"
    widths = [max(len(row[c]) for row in [header] + body) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c <= 1 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + body]
    return "\n".join([note, lines[0], "-" * len(lines[0])] + lines[1:]) + "\n"


def plot_comparison(rows: Sequence[tuple[str, Mapping[str, Any]]], out_png: str | os.PathLike) -> None:
    """Bar charts of the comparison: quality (BLEU-4, CIDEr/10, fully correct, CLIPScore/2.5), diversity
    (Dist-2) and speed (seconds per image, log scale), one bar per run."""
    panels = (("quality (x100)", (("bleu_4", "BLEU-4", 100), ("cider", "CIDEr/10", 10),
                                  ("sem_fully_correct", "fully correct", 100), ("clip_score", "CLIP-S / 2.5", 40))),
              ("diversity (x100)", (("dist_2", "Dist-2", 100), ("self_bleu", "self-BLEU", 100))),
              ("seconds per image", (("seconds_per_image", "s/img", 1),)))
    fig = Figure(figsize=(14, 4.2))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 1.5, 1]})
    labels = [label for label, _ in rows]
    for ax, (title, metrics) in zip(axes, panels):
        metrics = [m for m in metrics if any(_number(r.get(m[0])) is not None for _, r in rows)]
        width = 0.8 / max(len(rows), 1)
        for i, (label, r) in enumerate(rows):
            values = [(_number(r.get(key)) or 0.0) * scale for key, _, scale in metrics]
            ax.bar(np.arange(len(metrics)) + (i - (len(rows) - 1) / 2) * width, values, width, label=label)
        ax.set_xticks(np.arange(len(metrics)), [name for _, name, _ in metrics])
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        if title.startswith("seconds"):
            ax.set_yscale("log")
    axes[0].legend(labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(str(out_png), dpi=110)


def _group_label(record: Mapping[str, Any]) -> str:
    parts = []
    if _number(record.get("sampling_steps")) is not None:
        parts.append(f"T={record['sampling_steps']}")
    if _number(record.get("guidance")) is not None:
        parts.append(f"w={record['guidance']:g}")
    return ", ".join(parts) or record.get("tag") or "default"


def plot_metrics(evals: Evals, out_png: str | os.PathLike) -> None:
    """Plots every metric (x100) against the training step into a PNG.

    Left panel: BLEU-1..4, METEOR, ROUGE-L, SPICE; right panel: CIDEr (its own scale). One colour per
    metric; with evaluations of several tags (e.g. 5 and 30 sampling steps) one line style per tag.
    Metrics absent from every evaluation are left out.
    """
    records = _as_records(evals)
    if not records:
        raise ValueError("no evaluations to plot")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(record.get("tag", ""), []).append(record)
    styles = ["-", "--", ":", "-."]

    figure = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    panels = ((left, [c for c in SCORE_COLUMNS if c[0] != "cider"], "score x100"),
              (right, [c for c in SCORE_COLUMNS if c[0] == "cider"], "CIDEr-D x100"))
    for axes, columns, ylabel in panels:
        plotted = False
        for colour, (key, title) in enumerate(columns):
            for g, group in enumerate(groups.values()):
                group = sorted(group, key=lambda r: r["step"])
                values = np.array([np.nan if (v := _number(r.get(key))) is None else 100.0 * v for r in group])
                if np.isnan(values).all():
                    continue
                axes.plot([r["step"] for r in group], values, marker="o", markersize=4, color=f"C{colour}",
                          linestyle=styles[g % len(styles)], label=title if g == 0 else None)
                plotted = True
        axes.set_xlabel("training step")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        if not plotted:
            axes.text(0.5, 0.5, "not computed", ha="center", va="center", transform=axes.transAxes)
            continue
        # Metrics by colour; beside them, when there are several tags, the tags by line style.
        legend = axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                             borderaxespad=0.0, title="metric", title_fontsize="small")
        if len(groups) > 1:
            axes.add_artist(legend)
            handles = [Line2D([], [], color="black", linestyle=styles[g % len(styles)])
                       for g in range(len(groups))]
            axes.legend(handles, [_group_label(group[0]) for group in groups.values()], fontsize="small",
                        loc="lower left", bbox_to_anchor=(1.01, 0.0), borderaxespad=0.0,
                        title="sampling", title_fontsize="small")
    left.set_title("caption metrics vs step")
    right.set_title("CIDEr vs step")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _write_atomically(epath.Path(out_png), buffer.getvalue())


def write_report(workdir: str | os.PathLike) -> tuple[epath.Path, epath.Path | None]:
    """Writes ``eval/metrics.txt`` (the table) and ``eval/metrics.png`` (the plot) of all evaluations.

    Covers every tag, rows sorted by (tag, step), with a tag column when there are several. Returns both
    paths; the plot's is None when there is no evaluation yet.
    """
    records = read_all_evals(workdir)
    table_path = eval_dir(workdir) / TABLE_FILE
    several_tags = len({r.get("tag", "") for r in records}) > 1
    _write_atomically(table_path, format_table(records, show_tag=several_tags).encode("utf-8"))
    if not records:
        return table_path, None
    plot_path = eval_dir(workdir) / PLOT_FILE
    plot_metrics(records, plot_path)
    return table_path, plot_path


def _order_key(values: Sequence[Any]) -> tuple:
    """Sorts settings numerically where they are numbers (steps 5 before 10), else by their text."""
    return tuple((0, float(v), "") if _number(v) is not None else (1, 0.0, str(v)) for v in values)


def _setting(value: Any) -> str:
    return "-" if value is None else format(value, "g") if isinstance(value, float) else str(value)


SWEEP_COLUMNS = (("bleu_4", "BLEU-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr-D"))


def plot_sweep(records: Sequence[Mapping[str, Any]], axes: Sequence[str], axis: str, out_png: str | os.PathLike
               ) -> None:
    """Plots BLEU-4, METEOR, ROUGE-L and CIDEr (x100) against the sampler setting `axis`, one panel per
    metric and one line per combination of the other swept settings `axes` (e.g. one per guidance w
    when `axis` is "steps"). Numeric settings sit on a numeric x axis, others (e.g. method) in order."""
    if not records:
        raise ValueError("no evaluations to plot")
    others = [a for a in axes if a != axis]
    lines: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        lines.setdefault(tuple(sampler_value(record, a) for a in others), []).append(record)
    xs = [sampler_value(r, axis) for r in records]
    numeric = all(_number(x) is not None for x in xs)
    order = sorted(set(xs), key=lambda x: _order_key([x]))
    position = {x: (float(x) if numeric else i) for i, x in enumerate(order)}

    figure = Figure(figsize=(4 * len(SWEEP_COLUMNS), 3.6), dpi=100, layout="constrained")
    panels = figure.subplots(1, len(SWEEP_COLUMNS))
    for panel, (key, title) in zip(panels, SWEEP_COLUMNS):
        for i, (combo, group) in enumerate(sorted(lines.items(), key=lambda kv: _order_key(kv[0]))):
            group = sorted(group, key=lambda r: position[sampler_value(r, axis)])
            values = [np.nan if (v := _number(r.get(key))) is None else 100.0 * v for r in group]
            label = ", ".join(f"{a}={_setting(v)}" for a, v in zip(others, combo)) or None
            panel.plot([position[sampler_value(r, axis)] for r in group], values, marker="o", markersize=4,
                       color=f"C{i}", label=label)
        panel.set_title(f"{title} vs {axis}")
        panel.set_xlabel(axis)
        panel.set_ylabel(f"{title} x100")
        panel.grid(True, alpha=0.3)
        if not numeric:
            panel.set_xticks(range(len(order)), [str(x) for x in order])
    if others:
        panels[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _write_atomically(epath.Path(out_png), buffer.getvalue())


TRADEOFF_COLUMNS = (("bleu_4", "BLEU-4"), ("cider", "CIDEr-D"))


def plot_tradeoff(records: Sequence[Mapping[str, Any]], axes: Sequence[str], along: str, out_png: str | os.PathLike
                  ) -> None:
    """The reference-free / reference-based trade-off of a sweep (MC-Diffusion's guidance figure): CLIPScore
    (y) against BLEU-4 and CIDEr (x), one panel each; one line per combination of the swept settings other
    than `along`, its points in the order of `along` and labelled with its value."""
    if not any(_number(r.get("clip_score")) is not None for r in records):
        raise ValueError("no clip_score in the evaluations: the trade-off plot needs config.eval.clip")
    others = [a for a in axes if a != along]
    lines: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        lines.setdefault(tuple(sampler_value(record, a) for a in others), []).append(record)
    figure = Figure(figsize=(4.6 * len(TRADEOFF_COLUMNS), 3.8), dpi=100, layout="constrained")
    panels = figure.subplots(1, len(TRADEOFF_COLUMNS))
    for panel, (key, title) in zip(panels, TRADEOFF_COLUMNS):
        for i, (combo, group) in enumerate(sorted(lines.items(), key=lambda kv: _order_key(kv[0]))):
            group = sorted(group, key=lambda r: _order_key([sampler_value(r, along)]))
            xs = [np.nan if (v := _number(r.get(key))) is None else 100.0 * v for r in group]
            ys = [np.nan if (v := _number(r.get("clip_score"))) is None else v for r in group]
            label = ", ".join(f"{a}={_setting(v)}" for a, v in zip(others, combo)) or None
            panel.plot(xs, ys, marker="o", markersize=4, color=f"C{i}", label=label)
            for x, y, r in zip(xs, ys, group):
                panel.annotate(_setting(sampler_value(r, along)), (x, y), textcoords="offset points", xytext=(3, 3),
                               fontsize=7, color=f"C{i}")
        panel.set_xlabel(f"{title} x100")
        panel.set_ylabel("CLIPScore")
        panel.set_title(f"CLIPScore vs {title} ({along} labelled)")
        panel.grid(True, alpha=0.3)
    if others:
        panels[-1].legend(fontsize="small", loc="best")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _write_atomically(epath.Path(out_png), buffer.getvalue())


HEADLINE = ("bleu_4", "cider", "meteor", "rouge_l", "clip_score", "sem_fully_correct", "clip_i2t_recall@1",
            "recon_mse", "psnr", "codebook_used")


def headline(result: Mapping[str, Any]) -> str:
    """The main scores of an evaluation that has them, as ``key=value`` (a captioner's or an autoencoder's)."""
    return " ".join(f"{k}={v:.4f}" for k in HEADLINE if (v := _number(result.get(k))) is not None)


def sweep_name(step: int, axes: Sequence[str]) -> str:
    """Base name of a sweep's files: ``sweep_step<N>_<axis>_<axis>``."""
    return f"sweep_step{_check_step(step)}_" + "_".join(re.sub(r"[^A-Za-z0-9.]", "-", a) for a in axes)


def write_sweep(workdir: str | os.PathLike, step: int, records: Sequence[Mapping[str, Any]], axes: Sequence[str]
                ) -> tuple[epath.Path, list[epath.Path]]:
    """Writes a sweep of checkpoint `step` over the sampler settings `axes`: ``eval/<name>.txt`` (the table,
    with a column per axis beyond T and w) and ``eval/<name>_vs_<axis>.png`` per axis (`plot_sweep`), and with
    CLIPScores ``eval/<name>_clipscore_tradeoff.png`` (`plot_tradeoff`, along guidance when swept). Returns the paths."""
    if not axes:
        raise ValueError("a sweep needs at least one swept setting")
    name = sweep_name(step, axes)
    records = [{**r, "step": step} for r in records]
    table_path = eval_dir(workdir) / f"{name}.txt"
    shown = [a for a in axes if a not in ("steps", "guidance")]  # the table has T and w already
    _write_atomically(table_path, format_table(records, sampler_fields=shown).encode("utf-8"))
    plots = []
    for axis in axes:
        path = eval_dir(workdir) / f"{name}_vs_{re.sub(r'[^A-Za-z0-9.]', '-', axis)}.png"
        plot_sweep(records, axes, axis, path)
        plots.append(path)
    if any(_number(r.get("clip_score")) is not None for r in records):
        along = "guidance" if "guidance" in axes else axes[0]
        path = eval_dir(workdir) / f"{name}_clipscore_tradeoff.png"
        plot_tradeoff(records, axes, along, path)
        plots.append(path)
    return table_path, plots
