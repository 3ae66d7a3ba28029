"""The one evaluator: sample captions for an evaluation split, score them, write the results.

Works for every family through the shared sampler loop. Every example is scored exactly once on any
number of processes (the eval input pads with ``_mask``); token ids are gathered to process 0, which
decodes, scores with pycocoevalcap and writes ``WORKDIR/eval/step_<N>.json`` plus the captions. Bad
records the input pipeline skipped are not scored: the result counts them per reason (``data/...``,
as in training) and lists them by id (``skipped``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from ladic_jax import sampler as sampler_lib
from ladic_jax import sharding
from ladic_jax.data import bad_records
from ladic_jax.data import pipeline
from ladic_jax.evaluation import clip_score
from ladic_jax.evaluation import metrics as metrics_lib
from ladic_jax.evaluation import report
from ladic_jax.evaluation import shapes_semantics

log = logging.getLogger(__name__)


def sampler_config(config, **overrides):
    """config.sampler with overrides (e.g. steps=30, guidance=0.0), unlocked copy, validated.

    Fields of the shared loop that the config lacks (a run saved before they existed) take their
    defaults (``ladic_jax.sampler.default_fields``).
    """
    cfg = sampler_lib.complete(config.sampler.copy_and_resolve_references())
    with cfg.unlocked():
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
    sampler_lib.validate_sampler(cfg)
    return cfg


def mbr_sample(sample: Callable[[jax.Array], Any], rng: jax.Array, n: int,
               decode: Callable[[Any], list[str]], metric: str = "bleu",
               rank: Callable[[list[list[str]]], list[int]] | None = None,
               ) -> tuple[list[str], list[int], list[Any], list[list[str]]]:
    """Selection among ``n`` sampled candidates per image: Minimum Bayes Risk (LaDiC table 7) or, with
    ``metric="clip"``, re-ranking by CLIP image-text cosine (Prefix-diffusion; ``rank``, see ``clip_ranker``).

    Candidate 0 is ``sample(rng)`` (so n = 1 is plain sampling), candidate c ``sample(fold_in(rng, c))``.
    Each is decoded to captions; per image the candidate with the highest mean agreement with the
    others is kept, by ``metrics.mbr_select`` (add-one smoothed sentence BLEU-4, or CIDEr-D), or the one
    ``rank`` picks. Selection runs on the decoded words, beside the jitted sampler: that is the text the
    metrics score, with special tokens dropped and word pieces joined, and its n(n-1) pairs per image cost
    far less than sampling the candidates.

    Returns the chosen captions, the chosen candidate per image, the n raw outputs and their captions.
    """
    outputs = [sample(rng if c == 0 else jax.random.fold_in(rng, c)) for c in range(n)]
    texts = [decode(out) for out in outputs]
    if n == 1:
        return texts[0], [0] * len(texts[0]), outputs, texts
    pools = [list(pool) for pool in zip(*texts)]
    if metric == "clip":
        if rank is None:
            raise ValueError("sampler.mbr_metric='clip' needs a CLIP to rank the candidates with")
        chosen = rank(pools)
    else:
        chosen = metrics_lib.mbr_select(pools, metric)
    return [texts[c][i] for i, c in enumerate(chosen)], chosen, outputs, texts


def clip_ranker(scorer: clip_score.ClipScorer, image_emb: np.ndarray) -> Callable[[list[list[str]]], list[int]]:
    """``rank`` for ``mbr_sample``: per image, the candidate of highest cosine between its ``scorer`` text
    embedding and the image's embedding (``image_emb`` (B, D), L2-normalised)."""
    def rank(pools: list[list[str]]) -> list[int]:
        n = len(pools[0])
        texts = scorer.text_embeddings([c for pool in pools for c in pool])
        return metrics_lib.select_by_score(np.einsum("bd,bnd->bn", image_emb, texts.reshape(len(pools), n, -1)))
    return rank


def own_clip_scorer(family, params, config) -> clip_score.ClipScorer:
    """The family's own CLIP as a scorer (for ``sampler.mbr_metric="clip"``), images normalised as the input's."""
    own = family.own_clip(params)
    if own is None:
        raise ValueError(f"config.sampler.mbr_metric='clip': family {family.name!r} has no CLIP of its own")
    module, clip_params, cfg = own
    return clip_score.ClipScorer(module, clip_params, cfg, family.clip_tokenizer, config.input.image_mean,
                                 config.input.image_std, prompt=config.eval.get("clip_prompt", clip_score.DEFAULT_PROMPT))


# Skipped bad records named in the printed summary (the eval json lists all).
_SHOWN_SKIPS = 20


class CaptionBatch(NamedTuple):
    ids: np.ndarray
    captions: list[str]
    references: list[list[str]] | None
    seconds: float
    extras: list[dict]
    image_emb: np.ndarray | None


class Evaluator:
    """``Evaluator(family, config, mesh).run(params, step=..., workdir=...)`` -> metrics dict."""

    def __init__(self, family, config, mesh):
        self.family = family
        self.config = config
        self.mesh = mesh
        self._sample_fns = sampler_lib.SampleFns(family, mesh)
        self._scorer = None  # one METEOR JVM for all evaluations of this evaluator
        self._loaded_clip = None  # the CLIP of config.eval.clip, when it names a checkpoint: loaded now, so
        self._clip_scorer(None)   # that a missing one stops a run at its start, not at its first evaluation
        self.data_counts, self.skipped = bad_records.Counts(), []  # of the last caption_batches
        self._reconstruct = None  # jitted Family.reconstruct, for families evaluated by reconstruction

    def _clip_scorer(self, params) -> clip_score.ClipScorer | None:
        """The CLIP that ``config.eval.clip`` names: "" (none), "self" (the family's own, with these
        params), or a CLIP directory / hub id (loaded once, placed on the mesh)."""
        spec = self.config.eval.get("clip", "") or ""
        prompt = self.config.eval.get("clip_prompt", clip_score.DEFAULT_PROMPT)
        if not spec or (spec == "self" and params is None):
            return None
        if spec == "self":
            own = self.family.own_clip(params)
            if own is None:
                raise ValueError(f"config.eval.clip='self', but family {self.family.name!r} has no CLIP of its own; "
                                 "name a CLIP directory or hub id instead")
            module, clip_params, cfg = own
            inp = self.config.input
            return clip_score.ClipScorer(module, clip_params, cfg, self.family.tokenizer, inp.image_mean,
                                         inp.image_std, prompt=prompt)
        if self._loaded_clip is None:
            try:
                self._loaded_clip = clip_score.ClipScorer.load(spec, prompt=prompt)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"config.eval.clip={spec!r}: {e}") from e
            self._loaded_clip.params = jax.jit(lambda p: p, out_shardings=sharding.replicated(self.mesh))(
                jax.tree.map(np.asarray, self._loaded_clip.params))
        return self._loaded_clip

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None

    def caption_batches(self, params, *, sampler_cfg, split=None, limit=None, rng=None, trajectory=False,
                        clip=None):
        """Yields a ``CaptionBatch`` (image_ids, captions, references, sampling seconds, extras, image
        embeddings) per evaluation batch, valid examples only (``self.data_counts`` and ``self.skipped`` then
        tell what bad records were met). ``extras`` holds one dict per image: its MBR ``candidates`` (when
        ``sampler_cfg.mbr`` > 1) and, with ``trajectory``, its ``latent_distance`` per loop step (mean over
        the candidates). With a ``clip`` scorer, the images' CLIP embeddings (computed on the devices)."""
        fn = self._sample_fns(sampler_cfg, trajectory)
        rng = jax.random.key(self.config.seed + 1) if rng is None else rng
        n = int(sampler_cfg.mbr)
        it = pipeline.make_eval_iterator(self.config.input, self.family.tokenizer, split=split, limit=limit)
        self.data_counts, self.skipped = bad_records.Counts(), []
        ranker = None  # the family's own CLIP, built at the first batch that re-ranks candidates by it
        for i, batch in enumerate(it):
            gb = sharding.global_batch(batch, self.mesh)
            mask = sharding.to_host(gb["_mask"]).astype(bool)
            self._note_bad_records(sharding.to_host(gb["image_id"]), sharding.to_host(gb["_data_flags"]))
            t0 = time.perf_counter()
            out = lambda key: jax.tree.map(lambda a: sharding.to_host(a)[mask], fn(params, gb, key))  # noqa: E731
            decode = lambda o: self.family.decode(o["tokens"] if trajectory else o)  # noqa: E731
            rank = None
            if n > 1 and sampler_cfg.mbr_metric == "clip":
                if ranker is None:
                    ranker = own_clip_scorer(self.family, params, self.config)
                rank = clip_ranker(ranker, sharding.to_host(ranker.image_embeddings_on_device(
                    gb["image"], self.config.input.image_mean, self.config.input.image_std))[mask])
            captions, _, outputs, texts = mbr_sample(out, jax.random.fold_in(rng, i), n, decode,
                                                     sampler_cfg.mbr_metric, rank)
            dt = time.perf_counter() - t0
            ids = sharding.to_host(gb["image_id"])[mask]
            refs = self._gather_references(batch)
            extras = [{} for _ in ids]
            if n > 1:
                for j, e in enumerate(extras):
                    e["candidates"] = [t[j] for t in texts]
            if trajectory:
                distance = np.mean([o["latent_distance"] for o in outputs], axis=0)
                for e, d in zip(extras, distance):
                    e["latent_distance"] = d.tolist()
            emb = None
            if clip is not None:
                emb = sharding.to_host(clip.image_embeddings_on_device(
                    gb["image"], self.config.input.image_mean, self.config.input.image_std))[mask]
            yield CaptionBatch(ids, captions, [refs[int(k)] for k in ids] if refs is not None else None, dt, extras,
                               emb)

    def _semantic_accuracy(self, preds: dict[int, str], records: list[dict], result: dict) -> None:
        """On the synthetic shapes data, whose scenes the generator knows: the ``sem_*`` scores of
        ``shapes_semantics.score_captions`` in the result and, per caption record, ``semantic`` ("ok" or
        what is wrong). Nothing on other datasets."""
        if not preds:
            return
        found = shapes_semantics.scenes_for_dataset(self.config.input.dataset, preds)
        if found is None:
            return
        scenes, gap = found
        result.update(shapes_semantics.score_captions(preds, scenes, gap))
        verdicts = shapes_semantics.per_caption(preds, scenes, gap)
        for r in records:
            r["semantic"] = verdicts[r["image_id"]].reason

    def _note_bad_records(self, ids: np.ndarray, flags: np.ndarray) -> None:
        """Counts what the input pipeline did to the records (all processes'; padding has id -1)."""
        real = ids >= 0
        self.data_counts.add(flags[real])
        for image_id, f in zip(ids[real], flags[real]):
            reason = bad_records.skip_reason(int(f))
            if reason is not None:
                self.skipped.append({"image_id": int(image_id), "reason": reason})

    def _gather_references(self, batch) -> dict[int, list[str]] | None:
        local = {int(i): list(r) for i, r, m in zip(batch["image_id"], batch["references"], batch["_mask"]) if m}
        if jax.process_count() == 1:
            return local
        # Strings cannot ride on device arrays: exchange them as JSON bytes through a padded uint8 array.
        blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
        size = int(np.max(multihost_utils.process_allgather(np.array([blob.size]))))
        padded = np.zeros(size, np.uint8)
        padded[: blob.size] = blob
        allb = multihost_utils.process_allgather(padded)
        merged: dict[int, list[str]] = {}
        for row in np.asarray(allb).reshape(jax.process_count(), size):
            merged.update({int(k): v for k, v in json.loads(bytes(row).rstrip(b"\0").decode()).items()})
        return merged

    def run(self, params, *, step: int, workdir: str | None, split=None, limit=None, write=True,
            tag: str = "", sampler_cfg=None, trajectory: bool = False, **sampler_overrides) -> dict:
        """Samples, scores and (``write``) stores one evaluation. The sampler config is ``sampler_cfg``
        or the run config's with ``sampler_overrides``. With ``trajectory``, the result also holds
        ``latent_distance``: per loop step (``trajectory_timesteps``), the mean over images of the
        distance between that step's latent prediction and the final one."""
        if self.family.evaluation == "reconstruction":
            return self._run_reconstruction(params, step=step, workdir=workdir, split=split, limit=limit,
                                            write=write, tag=tag)
        if sampler_cfg is None:
            sampler_cfg = sampler_config(self.config, **sampler_overrides)
        clip = self._clip_scorer(params)
        records, seconds, timed, first, image_emb = [], 0.0, 0, True, []
        for b in self.caption_batches(params, sampler_cfg=sampler_cfg, split=split, limit=limit,
                                      trajectory=trajectory, clip=clip):
            if first:  # the first call includes compilation: leave it out of the timing
                first = False
            else:
                seconds, timed = seconds + b.seconds, timed + len(b.ids)
            for i, c, r, e in zip(b.ids, b.captions, b.references, b.extras):
                records.append({"image_id": int(i), "caption": c, "references": r, **e})
            if clip is not None:
                image_emb.append(b.image_emb)
        n = len(records)
        result: dict[str, Any] = {"num_images": n, "sampling_steps": int(sampler_cfg.steps),
                                  **{f"data/{k}": v for k, v in self.data_counts.as_dict().items()},
                                  "skipped": self.skipped,
                                  "guidance": float(sampler_cfg.get("guidance", 0.0)),
                                  "seconds_per_image": seconds / timed if timed > 0 else None,
                                  "sampler": sampler_cfg.to_dict()}
        if clip is not None and records:  # on every process: the scorer's parameters may span all of them
            result.update(clip_score.evaluate_captions(
                clip, np.concatenate(image_emb), records, dataset=self.config.input.dataset,
                model_metrics=bool(self.config.eval.get("clip_model_metrics", False))))
        if trajectory and records:
            result["trajectory_timesteps"] = sampler_lib.loop_timesteps(self.family, sampler_cfg).tolist()
            result["latent_distance"] = np.mean([r["latent_distance"] for r in records], axis=0).tolist()
        if jax.process_index() == 0:
            if self.skipped:
                shown = ", ".join(f"{r['image_id']} ({r['reason']})" for r in self.skipped[:_SHOWN_SKIPS])
                hidden = len(self.skipped) - _SHOWN_SKIPS
                more = f" and {hidden} more" if hidden > 0 else ""
                print(f"[eval] {len(self.skipped)} bad records skipped, not scored: image ids {shown}{more} "
                      f"(all in the eval json)", flush=True)
            preds = {r["image_id"]: r["caption"] for r in records}
            refs = {r["image_id"]: r["references"] for r in records}
            if self._scorer is None:
                self._scorer = metrics_lib.CaptionScorer()
            result.update(self._scorer(preds, refs))
            caps = [r["caption"] for r in records]
            pools = [r["candidates"] for r in records] if int(sampler_cfg.mbr) > 1 else None
            result.update(metrics_lib.diversity(caps, [r["references"] for r in records], pools))
            self._semantic_accuracy(preds, records, result)
            if write and workdir:
                report.write_eval(workdir, step, result, records, tag=tag)
        return result

    def _run_reconstruction(self, params, *, step, workdir, split=None, limit=None, write=True, tag="") -> dict:
        """An image autoencoder's evaluation (``Family.evaluation == "reconstruction"``): per image the mean
        squared error in the input's normalisation and the PSNR of the [0, 1] pixels; over the split the
        codes' perplexity and the fraction of the codebook used; a sheet of originals beside their
        reconstructions (``eval/reconstructions_step_<N>.png``)."""
        if self._reconstruct is None:
            self._reconstruct = jax.jit(self.family.reconstruct, out_shardings={
                "image": sharding.batch_sharding(self.mesh, 4), "codes": sharding.batch_sharding(self.mesh, 2)})
        inp = self.config.input
        mean, std = np.asarray(inp.image_mean, np.float32), np.asarray(inp.image_std, np.float32)
        it = pipeline.make_eval_iterator(inp, self.family.tokenizer, split=split, limit=limit)
        self.data_counts, self.skipped = bad_records.Counts(), []
        mse, psnr, ids, shown, counts = [], [], [], [], None
        for batch in it:
            gb = sharding.global_batch(batch, self.mesh)
            mask = sharding.to_host(gb["_mask"]).astype(bool)
            self._note_bad_records(sharding.to_host(gb["image_id"]), sharding.to_host(gb["_data_flags"]))
            out = self._reconstruct(params, gb)
            recon = sharding.to_host(out["image"])[mask]
            codes = sharding.to_host(out["codes"])[mask]
            orig = sharding.to_host(gb["image"])[mask]
            err = np.mean(np.square(recon - orig), axis=(1, 2, 3))
            pix = lambda x: np.clip(x * std + mean, 0.0, 1.0)  # noqa: E731
            pix_err = np.mean(np.square(pix(recon) - pix(orig)), axis=(1, 2, 3))
            mse.extend(err.tolist())
            psnr.extend((10 * np.log10(1.0 / np.maximum(pix_err, 1e-10))).tolist())
            ids.extend(sharding.to_host(gb["image_id"])[mask].tolist())
            hist = np.bincount(codes.reshape(-1), minlength=self.family.num_codes)
            counts = hist if counts is None else counts + hist
            for o, r, e, i in zip(orig, recon, err, ids[-len(err):]):
                if len(shown) < 16:
                    shown.append((i, e, np.concatenate([pix(o), pix(r)], axis=1)))
        p = counts / max(counts.sum(), 1) if counts is not None else np.zeros(1)
        nz = p[p > 0]
        result = {"num_images": len(ids), "recon_mse": float(np.mean(mse)) if mse else None,
                  "psnr": float(np.mean(psnr)) if psnr else None,
                  "codebook_used": float(np.mean(counts > 0)) if counts is not None else None,
                  "code_perplexity": float(np.exp(-np.sum(nz * np.log(nz)))),
                  **{f"data/{k}": v for k, v in self.data_counts.as_dict().items()}, "skipped": self.skipped}
        if jax.process_index() == 0 and write and workdir:
            from ladic_jax.data import caption_sheet
            report.write_metrics(workdir, step, result, tag=tag)
            if shown:
                items = [caption_sheet.SheetItem(image=(img * 255).round().astype(np.uint8), captions=[],
                                                 label=f"{i}: original | reconstruction, MSE {e:.4f}")
                         for i, e, img in shown]
                sheet = caption_sheet.render_sheet(items, columns=4, tile=256)
                sheet.save(str(report.eval_dir(workdir) / f"reconstructions_step_{step}{tag}.png"))
        return result
