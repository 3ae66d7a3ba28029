"""Every command fails early, once, clearly on a user error: each console script (and scripts/benchmark.py,
scripts/aot_check.py) is run as a subprocess with a bad override or flag value, a bad path, a tokenizer that
does not load, a missing data directory or an unprepared dataset; it must exit with status 2, print no
traceback, and end stderr with one ``error:`` line naming what is wrong (argparse's own errors and
ladic-data's carry the program's name before ``error:``).

The run the eval and caption cases use is a tiny random release converted by ``ladic-convert official``
(the same tiny release as tests/test_official_checkpoint.py), which is also the check that the conversion
succeeds when its tokenizer loads; ``ladic-convert official`` with a tokenizer that does not load must
write nothing.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tiny_setup import REPO

TESTS = os.path.join(REPO, "tests")
TINY_CONFIG = os.path.join(REPO, "tests", "training", "tiny_config.py")
OFFICIAL = os.path.join(REPO, "configs", "ladic_official.py") + ":runlocal"
NO_HUB_TOKENIZER = "ladic-test/no-such-tokenizer"  # a hub id in no cache (and the hub is offline)
ERROR_LINE = re.compile(r"^([\w.-]+( \w+)?: )?error: ")  # "error: ...", "ladic-eval: error: ...", "ladic-data show: error: ..."


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def last(self) -> str:
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""


def _command(name: str) -> list[str]:
    """The console script installed beside this Python (the venv's bin), else its module."""
    if name.endswith(".py"):
        return [sys.executable, os.path.join(REPO, "scripts", name)]
    script = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "ladic_jax.cli." + name.removeprefix("ladic-").replace("-", "_")]


def run(name: str, *args: str) -> Result:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2")
    p = subprocess.run([*_command(name), *map(str, args)], capture_output=True, text=True, env=env, timeout=300,
                       cwd=REPO)
    return Result(p.returncode, p.stdout, p.stderr)


def run_all(*commands: list) -> list[Result]:
    """Runs the commands (each [script, arg, ...]) two at a time: most of each one's seconds are imports."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda c: run(*c), commands))


def assert_user_errors(*cases: tuple[list, tuple[str, ...]]) -> list[Result]:
    """Runs every (command, names) case (``run_all``) and checks each with ``assert_user_error``."""
    results = run_all(*(command for command, _ in cases))
    for (command, names), r in zip(cases, results):
        assert_user_error(r, *names, command=command)
    return results


def assert_user_error(r: Result, *names: str, command=None) -> None:
    """Exit status 2, no traceback, stderr ending in one error line that names each of ``names``."""
    context = f"{' '.join(map(str, command or ()))}: exit status {r.code}; stderr:\n{r.err[-3000:]}"
    assert r.code == 2, context
    assert "Traceback" not in r.err, context
    assert ERROR_LINE.match(r.last), context
    assert sum(bool(ERROR_LINE.match(line)) for line in r.err.splitlines()) == 1, context
    for name in names:
        assert name in r.last, f"{name!r} not in the error line; {context}"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny random release checkpoint and its statistics (as tests/test_official_checkpoint.py makes them)."""
    import torch
    sys.path.insert(0, TESTS)
    try:
        import test_official_checkpoint as official
    finally:
        sys.path.remove(TESTS)
    tmp = tmp_path_factory.mktemp("cli_errors_release")
    torch.save(official.make_state_dict(), tmp / "pytorch_model.bin")
    official.write_stats(str(tmp / "stats"))
    return tmp


@pytest.fixture(scope="module")
def converted(release):
    """The release converted by the console script (its tokenizer loads: the conversion succeeds)."""
    out = release / "converted"
    r = run("ladic-convert", "official", "--checkpoint", release / "pytorch_model.bin", "--stats_dir",
            release / "stats", "--workdir", out, "--config", OFFICIAL)
    assert r.code == 0, r.err[-3000:]
    return str(out)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import numpy as np
    from PIL import Image
    path = tmp_path_factory.mktemp("cli_errors_image") / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    return str(path)


# --------------------------------------------------------------------------- ladic-train


def test_train(tiny_data_dir, tmp_path):
    workdir = tmp_path / "run"
    base = ["ladic-train", "--config", TINY_CONFIG, "--workdir", workdir]
    data = f"--config.input.data_dir={tiny_data_dir}"
    (tmp_path / "empty").mkdir()
    assert_user_errors(
        ([*base, data, "--config.total_steps=ten"], ("config.total_steps", "'ten'")),
        (["ladic-train", "--config", tmp_path / "no_such_config.py", "--workdir", workdir],
         ("no_such_config.py", "does not exist")),
        ([*base, data, f"--config.input.tokenizer={tmp_path}/no_tokenizer"],
         (f"{tmp_path}/no_tokenizer", "config.input.tokenizer", "--config.input.tokenizer=")),
        ([*base, f"--config.input.data_dir={tmp_path}/no_data"],
         (f"config.input.data_dir='{tmp_path}/no_data'", "--config.input.data_dir=DIR",
          "ladic-data build shapes_captions --config tiny")),
        ([*base, f"--config.input.data_dir={tmp_path}/empty"],
         ("'shapes_captions/tiny' is not prepared", "ladic-data build shapes_captions --config tiny")))
    assert not workdir.exists()  # every check ran before the run directory was made


# --------------------------------------------------------------------------- ladic-convert


def test_convert(release, tmp_path):
    official = ["ladic-convert", "official", "--checkpoint", release / "pytorch_model.bin", "--stats_dir",
                release / "stats", "--workdir", tmp_path / "converted"]
    assert_user_errors(
        # a tokenizer that does not load: the conversion stops before it writes anything
        ([*official, "--config", OFFICIAL, f"--config.input.tokenizer={NO_HUB_TOKENIZER}"],
         (f"tokenizer {NO_HUB_TOKENIZER!r}", "config.input.tokenizer",
          "--config.input.tokenizer=/path/to/no-such-tokenizer", "nothing was written")),
        ([*official, "--config", OFFICIAL, "--config.input.no_such_field=1"], ("config.input.no_such_field",)),
        ([*official, "--config", tmp_path / "no_such_config.py"], ("no_such_config.py", "does not exist")),
        (["ladic-convert", "clip", "--workdir", tmp_path, "--out", tmp_path / "clip", "--config.input.tokenizer=x"],
         ("ladic-convert clip takes no config overrides",)),
        (["ladic-convert", "vqvae", "--workdir", tmp_path / "no_run", "--out", tmp_path / "vq"],
         ("config.json not found", "--workdir")))
    assert not (tmp_path / "converted").exists()


# --------------------------------------------------------------------------- ladic-eval


def test_eval(converted, tiny_data_dir, tmp_path):
    base = ["ladic-eval", "--workdir", converted, "--sampling-steps", "1"]
    assert_user_errors(
        ([*base, "--config.sampler.no_such_field=1"], ("config.sampler.no_such_field",)),
        (["ladic-eval", "--workdir", converted, "--step", "last"], ("--step", "'last'")),
        (["ladic-eval", "--workdir", tmp_path], ("config.json not found", "--workdir")),
        ([*base, f"--config.input.tokenizer={NO_HUB_TOKENIZER}"],
         (f"tokenizer {NO_HUB_TOKENIZER!r}", "--config.input.tokenizer=")),
        ([*base, f"--config.input.data_dir={tmp_path}/no_data"],
         (f"config.input.data_dir='{tmp_path}/no_data'", "--config.input.data_dir=DIR")),
        ([*base, f"--config.input.data_dir={tiny_data_dir}"],
         ("is not prepared", "ladic-data build karpathy_captions --config coco")))
    assert not os.path.exists(os.path.join(converted, "eval"))


# --------------------------------------------------------------------------- ladic-caption


def test_caption(converted, image, tmp_path):
    base = ["ladic-caption", "--workdir", converted, image]
    *_, tokenizer = assert_user_errors(
        ([*base, tmp_path / "no_such.png"], ("no such file or directory", f"{tmp_path}/no_such.png")),
        (["ladic-caption", "--workdir", tmp_path, image], ("config.json not found", "--workdir")),
        ([*base, "--config.sampler.steps=many"], ("config.sampler.steps", "'many'")),
        ([*base, "--step", "7"], ("--step 7", "available: [0]")),
        # the case: a run whose tokenizer does not load stops before its model is loaded and sampled
        ([*base, f"--config.input.tokenizer={NO_HUB_TOKENIZER}"],
         (f"tokenizer {NO_HUB_TOKENIZER!r}", "--config.input.tokenizer=")))
    assert tokenizer.out == ""


# --------------------------------------------------------------------------- ladic-data


def test_data(tiny_data_dir, tmp_path):
    out = tmp_path / "sheet.png"
    show = ["ladic-data", "show", "--out", out]
    assert_user_errors(
        ([*show, "--dataset", "shapes_captions/tiny", "--data_dir", tmp_path / "no_data"],
         ("--data_dir", "no_data", "is not a directory")),
        ([*show, "--dataset", "shapes_captions/long", "--data_dir", tiny_data_dir],
         ("is not prepared", "ladic-data build shapes_captions --config long")),
        ([*show, "--dataset", "shapes_captions/tiny", "--data_dir", tiny_data_dir, "--num", "all"], ("--num", "'all'")))
    assert not out.exists()


# --------------------------------------------------------------------------- ladic-aot-check, scripts/


def test_aot_check_and_benchmark(tmp_path):
    spec = os.path.join(REPO, "configs", "ladic_shapes.py") + ":runlocal"
    assert_user_errors(
        (["ladic-aot-check", "--config", spec, "--topology", "v5e:2x2", "--config.sampler.steps=abc"],
         ("config.sampler.steps", "'abc'")),
        (["aot_check.py", "--config", spec, "--topology", "v5e:2x2", "--json", tmp_path / "no_dir" / "fit.json"],
         ("--json", "no_dir", "does not exist")),
        # scripts/benchmark.py takes overrides as --config.a.b=value too (and names a bad one)
        (["benchmark.py", "--config", spec, "--config.sampler.no_such_field=1"], ("config.sampler.no_such_field",)))
