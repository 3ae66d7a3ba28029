"""Importing the authors' released checkpoint (`ladic-convert official`).

The state dict is built from the release's own tensor list (tests/fixtures/ladic_official_state_dict.txt,
783 names, a copy of the reference) with every width shrunk so that it matches the ``runlocal`` variant
of configs/ladic_official.py: 768 -> 16 (text, latent and ViT width), 1536 -> 32, 2304 -> 48,
3072 -> 64, 197 -> 5 image tokens; the space encoder keeps layers 0-1, the ViT block 0, the diffuser
layers 0-1. Vocabulary, position and time tables keep their sizes. Values are random, written with
torch.save; the converted model is then compared with a float64 torch forward written here from the
formulas of the reference (ladic_official.md), reading the release's tensors by their names.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from ladic_jax.cli import caption as caption_cli
from ladic_jax.cli import convert as convert_cli
from ladic_jax.encoders.checkpoint_names import CheckpointMismatchError
from ladic_jax.families.ladic import LadicModel
from ladic_jax import official_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTING = os.path.join(REPO, "tests", "fixtures", "ladic_official_state_dict.txt")
CONFIG = os.path.join(REPO, "configs", "ladic_official.py") + ":runlocal"
SIZE_MAP = {768: 16, 1536: 32, 2304: 48, 3072: 64, 197: 5}
KEEP_LAYERS = {"space_encoder": 2, "visual_encoder": 1, "diffuser": 2}
D, IMAGE, HEADS = 16, 32, {"text": 2, "vit": 2, "diffuser": 4}  # the runlocal variant's sizes


def _listing():
    """[(name, shape, dtype)] of the release, shrunk to the runlocal sizes."""
    out = []
    for line in open(LISTING):
        name, rest = line.split(" ", 1)
        shape = tuple(int(s) for s in re.findall(r"\d+", rest.rsplit(")", 1)[0]))
        layer = re.match(r"^(space_encoder|visual_encoder|diffuser)\.(?:encoder\.layer|blocks)\.(\d+)\.", name)
        if layer and int(layer.group(2)) >= KEEP_LAYERS[layer.group(1)]:
            continue
        out.append((name, tuple(SIZE_MAP.get(s, s) for s in shape), rest.split()[-1]))
    return out


def make_state_dict(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape, dtype in _listing():
        if dtype == "int64":
            sd[name] = torch.arange(shape[-1]).expand(shape).clone()
        elif name.endswith("LayerNorm.weight") or re.search(r"norm\d?\.weight$", name):
            sd[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".weight") and len(shape) >= 2 and "embed" not in name:
            sd[name] = torch.randn(shape, generator=g) / math.sqrt(np.prod(shape[1:]))
        else:
            sd[name] = 0.3 * torch.randn(shape, generator=g)
    sd["lm_head.predictions.bias"] = sd["lm_head.predictions.decoder.bias"].clone()  # tied in HF BERT
    return sd


def write_stats(directory, seed=1):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(directory, exist_ok=True)
    mean, std = 0.2 * torch.randn(D, generator=g), 0.5 + torch.rand(D, generator=g)
    torch.save(mean, os.path.join(directory, "mean_emb_split.pickle"))
    torch.save(std, os.path.join(directory, "std_emb_split.pickle"))
    return mean.double(), std.double()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    sd = make_state_dict()
    ckpt = str(tmp / "pytorch_model.bin")
    torch.save(sd, ckpt)
    mean, std = write_stats(str(tmp / "stats"))
    out = str(tmp / "converted")
    convert_cli.main(["official", "--checkpoint", ckpt, "--stats_dir", str(tmp / "stats"), "--workdir", out,
                      "--config", CONFIG])
    from ladic_jax.captioning import Captioner
    cap = Captioner(out)
    return dict(sd={k: v.double() for k, v in sd.items()}, mean=mean, std=std, out=out, cap=cap,
                ckpt=ckpt, stats=str(tmp / "stats"), tmp=tmp)


# ----------------------------------------------------------------------------- the reference forward


def ln(x, sd, name, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def attend(q, k, v, heads, mask=None):
    b, lq, w = q.shape
    split = lambda a: a.reshape(b, a.shape[1], heads, w // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(w // heads)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, lq, w)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_vit(sd, pixels_nhwc):
    """timm BLIP ViT: patch conv, [CLS] + positions, pre-LN blocks (fused qkv), final LayerNorm (eps 1e-6)."""
    p = "visual_encoder."
    x = torch.nn.functional.conv2d(torch.as_tensor(pixels_nhwc, dtype=torch.float64).permute(0, 3, 1, 2),
                                   sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], 1, -1), x], 1) + sd[p + "pos_embed"]
    for i in range(KEEP_LAYERS["visual_encoder"]):
        b = f"{p}blocks.{i}."
        q, k, v = lin(ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").chunk(3, -1)
        x = x + lin(attend(q, k, v, HEADS["vit"]), sd, b + "attn.proj")
        x = x + lin(gelu(lin(ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return ln(x, sd, p + "norm", 1e-6)


def time_row(t, width):
    i = torch.arange(0, width, 2, dtype=torch.float64)
    angle = t * torch.exp(-i * math.log(10000.0) / width)
    return torch.stack([torch.sin(angle), torch.cos(angle)], -1).reshape(width)


def ref_diffuser(sd, x_t, x_sc, t, v):
    """Steps 1, 2 and 4 of ladic_official.md: the MED BERT over [x_t ; x_sc] with the LayerNorm-ed time row."""
    x = torch.cat([x_t, x_sc], -1)
    width = x.shape[-1]
    x = x + ln(time_row(t, width), sd, "time_layer_norm", 1e-12)
    h = ln(x + sd["diffuser.embeddings.position_embeddings.weight"][: x.shape[1]], sd,
           "diffuser.embeddings.LayerNorm", 1e-12)
    for i in range(KEEP_LAYERS["diffuser"]):
        p = f"diffuser.encoder.layer.{i}."
        a = attend(lin(h, sd, p + "attention.self.query"), lin(h, sd, p + "attention.self.key"),
                   lin(h, sd, p + "attention.self.value"), HEADS["diffuser"])
        h = ln(h + lin(a, sd, p + "attention.output.dense"), sd, p + "attention.output.LayerNorm", 1e-12)
        c = attend(lin(h, sd, p + "crossattention.self.query"), lin(v, sd, p + "crossattention.self.key"),
                   lin(v, sd, p + "crossattention.self.value"), HEADS["diffuser"])
        h = ln(h + lin(c, sd, p + "crossattention.output.dense"), sd, p + "crossattention.output.LayerNorm", 1e-12)
        f = lin(gelu(lin(h, sd, p + "intermediate.dense")), sd, p + "output.dense")
        h = ln(h + f, sd, p + "output.LayerNorm", 1e-12)
    return h[:, :24, : width // 2]


def ref_space_encoder(sd, ids, mask):
    p = "space_encoder."
    ids = torch.as_tensor(ids)
    mask = torch.as_tensor(mask).bool()
    h = (sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][: ids.shape[1]]
         + sd[p + "embeddings.token_type_embeddings.weight"][0])
    h = ln(h, sd, p + "embeddings.LayerNorm", 1e-12)
    for i in range(KEEP_LAYERS["space_encoder"]):
        b = f"{p}encoder.layer.{i}."
        a = attend(lin(h, sd, b + "attention.self.query"), lin(h, sd, b + "attention.self.key"),
                   lin(h, sd, b + "attention.self.value"), HEADS["text"], mask)
        h = ln(h + lin(a, sd, b + "attention.output.dense"), sd, b + "attention.output.LayerNorm", 1e-12)
        h = ln(h + lin(gelu(lin(h, sd, b + "intermediate.dense")), sd, b + "output.dense"), sd,
               b + "output.LayerNorm", 1e-12)
    return h


def ref_lm_head(sd, h):
    p = "lm_head.predictions."
    h = ln(gelu(lin(h, sd, p + "transform.dense")), sd, p + "transform.LayerNorm", 1e-12)
    return lin(h, sd, p + "decoder")


def _close(ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours, np.float64), ref.detach().numpy()
    assert ours.shape == ref.shape
    err = np.max(np.abs(ours - ref))
    assert err <= tol, f"max abs difference {err:.2e} > {tol}"
    return err


# ----------------------------------------------------------------------------- tests


def test_denoising_call_matches_the_release_forward(release):
    """x̂0 = 2 f(x_t, v(image), t+5) - f(x_t, v(zero image), t+5), read from the release's tensors."""
    cap, sd = release["cap"], release["sd"]
    family, params = cap.sk.family, cap.params
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    x_t = rng.normal(size=(2, 24, D)).astype(np.float32)
    x_sc = rng.normal(size=(2, 24, D)).astype(np.float32)
    cfg = cap.config.sampler
    context = family.sampling_context(params, {"image": jnp.asarray(images)}, cfg)
    v, v0 = ref_vit(sd, images), ref_vit(sd, np.zeros_like(images))
    x_t64, x_sc64 = torch.as_tensor(x_t, dtype=torch.float64), torch.as_tensor(x_sc, dtype=torch.float64)
    for t in (300, 996, 999):
        ours = family.predict_x0(params, context, jnp.asarray(x_t), t, jnp.asarray(x_sc), cfg)
        t_model = min(999, t + 5)
        ref = 2 * ref_diffuser(sd, x_t64, x_sc64, t_model, v) - ref_diffuser(sd, x_t64, x_sc64, t_model, v0)
        _close(ours, ref)
    # the guidance matters: without it the result is the conditional call alone
    cfg0 = cfg.copy_and_resolve_references()
    cfg0.guidance = 0.0
    ours = family.predict_x0(params, family.sampling_context(params, {"image": jnp.asarray(images)}, cfg0),
                             jnp.asarray(x_t), 300, jnp.asarray(x_sc), cfg0)
    _close(ours, ref_diffuser(sd, x_t64, x_sc64, 305, v))


def test_text_space_and_decoding_match_the_release(release):
    cap, sd = release["cap"], release["sd"]
    family, params = cap.sk.family, cap.params
    mean, std = release["mean"], release["std"]
    tok = family.tokenizer
    enc = tok(["a dog on the table", "two cats"], padding="max_length", max_length=24, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    x0, targets = family.text_latents(params, jnp.asarray(ids), jnp.asarray(mask))
    ref = (ref_space_encoder(sd, ids, mask) - mean) / std
    period = ref_space_encoder(sd, np.array([[101, 1012, 102]]), np.ones((1, 3)))[0, 1]  # raw, not normalised
    special = torch.as_tensor(np.isin(ids, [0, 101, 102]))
    ref = torch.where(special[..., None], period, ref)
    _close(x0, ref)
    assert np.array_equal(np.asarray(targets), np.where(np.isin(ids, [0, 101, 102]), 1012, ids))

    x_hat = np.random.default_rng(1).normal(size=(2, 24, D)).astype(np.float32)
    logits = family._apply(params, jnp.asarray(x_hat), method=LadicModel.decode_logits)
    _close(logits, ref_lm_head(sd, torch.as_tensor(x_hat, dtype=torch.float64) * std + mean), tol=2e-4)


def test_schedule_sampler_and_postprocessing_are_the_release(release):
    family = release["cap"].sk.family
    betas = np.concatenate([[0.0], np.linspace(1e-4, 0.02, 1000)])
    abar = np.cumprod(1 - betas)[:1000]
    np.testing.assert_allclose(np.asarray(family.diffusion.alphas_cumprod), abar, rtol=1e-6)
    x0, eps = np.ones((1, 1, 2), np.float32), np.full((1, 1, 2), 0.5, np.float32)
    t = jnp.asarray([500])
    assert np.allclose(family.diffusion.q_sample(x0, t, eps), np.sqrt(abar[500]) + 4 * np.sqrt(1 - abar[500]) * 0.5)
    cfg = release["cap"].config.sampler.copy_and_resolve_references()
    for steps in (5, 10, 50):  # the release: t = 999; while t > 0: ...; t -= 1000 // steps
        cfg.steps = steps
        ts, t_ = [], 999
        while t_ > 0:
            ts.append(t_)
            t_ -= 1000 // steps
        assert list(family.timesteps(cfg)) == ts
    assert cfg.method == "renoise" and cfg.t_offset == 5 and family.diffusion.sample_noise_factor == 1.0
    tok = family.tokenizer
    ids = [101] + tok.convert_tokens_to_ids("a a dog on on the table . . .".split()) + [102, 0, 0]
    lead = tok.convert_tokens_to_ids(". a cat".split()) + [0] * 3
    assert family.decode(np.array([ids, lead + [0] * (len(ids) - len(lead))])) == ["a dog on the table.", "a cat."]


def test_caption_and_eval_clis_work_on_the_converted_run(release, tmp_path, capsys, real_data_dir):
    out = release["out"]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 50), np.uint8), "L").save(tmp_path / "b.jpg")
    caption_cli.main(["--workdir", out, "--json", "--steps", "2", str(tmp_path / "a.png"), str(tmp_path / "b.jpg")])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [os.path.basename(r["path"]) for r in records] == ["a.png", "b.jpg"]
    assert all(r["error"] is None and r["caption"].endswith(".") for r in records)

    from ladic_jax.cli import eval as eval_cli
    from ladic_jax.evaluation import report
    eval_cli.main(["--workdir", out, "--sampling-steps", "2", f"--config.input.data_dir={real_data_dir}"])
    res = json.loads(report.metrics_path(out, 0).read_text())  # 2 = the config's own steps
    assert res["num_images"] == 2 and "bleu_4" in res  # karpathy_captions/coco's fake test split, 1 corrupt


def _mismatch(tensors, release) -> str:
    family = release["cap"].sk.family
    leaves = jax.tree_util.tree_flatten_with_path(release["cap"].params)[0]
    template = {"/".join(str(k.key) for k in p): tuple(a.shape) for p, a in leaves}
    with pytest.raises(CheckpointMismatchError) as e:
        official_checkpoint.release_params({k: v.numpy() for k, v in tensors.items()}, template, family)
    return str(e.value)


def test_missing_misshaped_and_unknown_tensors_are_named(release):
    sd = make_state_dict()
    name = "diffuser.encoder.layer.1.crossattention.self.key.weight"
    missing = dict(sd)
    del missing[name]
    assert "missing tensors" in (msg := _mismatch(missing, release)) and name in msg
    bad = dict(sd, **{"time_layer_norm.weight": torch.ones(33)})
    assert "shape mismatches" in (msg := _mismatch(bad, release)) and "time_layer_norm.weight" in msg
    extra = dict(sd, **{"diffuser.encoder.layer.2.output.dense.weight": torch.ones(32, 64)})
    assert "unused tensors" in (msg := _mismatch(extra, release))
    assert "diffuser.encoder.layer.2.output.dense.weight" in msg


def test_cli_names_a_missing_tensor_and_refuses_unsafe_or_bad_files(release, tmp_path, capsys):
    sd = make_state_dict()
    del sd["visual_encoder.blocks.0.attn.qkv.bias"]
    torch.save(sd, tmp_path / "missing.bin")
    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "pickled.bin")
    os.makedirs(tmp_path / "bad_stats")
    torch.save(torch.ones(7), tmp_path / "bad_stats" / "mean_emb_split.pickle")
    torch.save(torch.ones(16), tmp_path / "bad_stats" / "std_emb_split.pickle")
    cases = [
        ("missing.bin", release["stats"], "visual_encoder.blocks.0.attn.qkv.bias"),
        ("pickled.bin", release["stats"], "weights_only=True"),
        ("no_such.bin", release["stats"], "no such file"),
        (release["ckpt"], str(tmp_path / "bad_stats"), "mean_emb_split.pickle has shape (7,)"),
        (release["ckpt"], str(tmp_path), "mean_emb_split.pickle not found"),
    ]
    for i, (ckpt, stats, expected) in enumerate(cases):
        with pytest.raises(SystemExit):
            convert_cli.main(["official", "--checkpoint", str(tmp_path / ckpt), "--stats_dir", stats,
                              "--workdir", str(tmp_path / f"out{i}"), "--config", CONFIG])
        err = capsys.readouterr().err
        assert expected in err, err
    with pytest.raises(SystemExit):  # never overwrites a run
        convert_cli.main(["official", "--checkpoint", release["ckpt"], "--stats_dir", release["stats"],
                          "--workdir", release["out"], "--config", CONFIG])
    assert "already holds checkpoints" in capsys.readouterr().err


def test_full_size_config_takes_exactly_the_release_tensors():
    """The real 783-tensor listing (zero-cost broadcast arrays) against the full-size variant's parameters."""
    from ladic_jax import config as config_lib
    from ladic_jax.families.base import get_family
    from ladic_jax.trainer import dummy_batch
    config = config_lib.load_config(CONFIG.replace(":runlocal", ""))
    family = get_family(config)
    abstract = jax.eval_shape(lambda r: family.init(r, dummy_batch(config)), jax.random.key(0))
    template = {"/".join(str(k.key) for k in p): tuple(a.shape)
                for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    tensors = {}
    for line in open(LISTING):
        name, rest = line.split(" ", 1)
        shape = tuple(int(s) for s in re.findall(r"\d+", rest.rsplit(")", 1)[0]))
        tensors[name] = np.broadcast_to(np.float32(0), shape)
    assert len(tensors) == 783
    params, ignored = official_checkpoint.release_params(tensors, template, family)
    assert set(template) - set(params) == {"latent_mean", "latent_std", "diffuser/null_condition"}
    others = sorted(i.split()[0] for i in ignored if not i.startswith("space_decoder."))
    assert len(ignored) - len(others) == 205 and others == [
        "diffuser.embeddings.position_ids", "diffuser.embeddings.word_embeddings.weight",
        "lm_head.predictions.bias", "space_encoder.embeddings.position_ids"]
    assert len(params) == 783 - 209 + 12 * 4  # a fused qkv weight/bias fills three parameters each
    assert template["diffuser/block_0/cross_attn/key/kernel"] == (768, 1536)
    ignored_names = {i.split()[0] for i in ignored}
    release_size = sum(a.size for name, a in tensors.items() if name not in ignored_names)
    assert sum(int(np.prod(s)) for s in template.values()) == release_size + 3 * 768  # + mean, std, null


def test_training_drops_the_image_by_zeroing_it(release):
    """The release's classifier-free-guidance training: a dropped image is an all-zero normalised image."""
    from ladic_jax.families.base import get_family
    cap = release["cap"]
    tok = cap.sk.family.tokenizer
    enc = tok(["a dog on the table", "two cats"], padding="max_length", max_length=24, return_tensors="np")
    image = np.random.default_rng(2).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    batch = {"tokens": jnp.asarray(enc["input_ids"], jnp.int32),
             "token_mask": jnp.asarray(enc["attention_mask"], jnp.int32)}

    def loss_fn(uncond_prob):
        config = cap.config.copy_and_resolve_references()
        config.model.uncond_prob = uncond_prob
        family = get_family(config)
        fn = jax.jit(lambda p, b: family.loss(p, b, jax.random.key(4)))
        return lambda img: tuple(float(v) for v in jax.tree.leaves(fn(cap.params, dict(batch, image=img))))

    always_drop, never_drop = loss_fn(1.0), loss_fn(0.0)
    dropped, zero = always_drop(image), never_drop(np.zeros_like(image))
    assert np.all(np.isfinite(dropped)) and dropped == pytest.approx(zero, rel=1e-6)
    assert never_drop(image) != pytest.approx(zero, rel=1e-3)  # the image does matter when kept


def test_a_fine_tuning_step_of_the_converted_release_runs_with_the_release_switches(release, tmp_path,
                                                                                     real_data_dir):
    """ladic-train on the converted run: one step with the release's training (no clipping, decay on every
    parameter, target dropout), from the converted weights; the frozen encoders stay as converted."""
    import shutil
    from ladic_jax import checkpoint as ckpt_lib
    from ladic_jax.cli import train as train_cli
    run = str(tmp_path / "finetune")
    shutil.copytree(release["out"], run)
    train_cli.main(["--config", CONFIG, "--workdir", run, f"--config.input.data_dir={real_data_dir}",
                    "--config.total_steps=1", "--config.eval.at_end=false"])
    cfg = json.loads(open(os.path.join(run, "config.json")).read())
    assert cfg["optim"]["grad_clip"] == 0 and cfg["optim"]["weight_decay_mask"] == "all"
    assert cfg["model"]["text"]["target_dropout"] == 0.1
    logged = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "train/loss" in r]
    assert [r["step"] for r in logged] == [1] and np.isfinite(logged[0]["train/loss"])
    steps = ckpt_lib.Checkpointer(os.path.join(run, "checkpoints"), read_only=True).all_steps()
    assert 1 in steps, steps
    from ladic_jax.captioning import Captioner
    tuned = Captioner(run).params
    before = release["cap"].params
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), tuned, before)
    flat = {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(moved)[0]}
    assert all(v == 0 for k, v in flat.items() if k.startswith(("image/", "text/embeddings", "latent_"))), \
        {k: v for k, v in flat.items() if k.startswith(("image/", "latent_")) and v}
    trained_biases = [k for k, v in flat.items() if k.startswith("diffuser/") and k.endswith("bias") and v > 0]
    assert trained_biases, "no diffuser bias moved"
