"""Caption metrics: COCO scores (pycocoevalcap), diversity, and MBR candidate selection.

The COCO scores are pycocoevalcap's, computed the way its ``COCOEvalCap`` does: every caption goes
through the Stanford PTB tokenizer (lower-cased, punctuation removed), then BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D (pycocoevalcap's ``Cider``) and SPICE score the tokenized text. Around them this module adds:

- input validation, with errors that name the offending image id;
- empty predictions scored as empty captions (zero for that image) instead of reaching a scorer's edge
  cases;
- a Java check up front (the tokenizer, METEOR and SPICE run on the JVM);
- SPICE only when the Stanford CoreNLP 3.6.0 jars are already in ``pycocoevalcap/spice/lib``. Without
  them pycocoevalcap would try to download them; here SPICE is reported unavailable instead.

Diversity (Prefix-diffusion, DESIGN §6): ``distinct_n`` = distinct n-grams over all captions / total
words; ``vocab_usage`` = distinct words / vocabulary size.

``mbr_select`` is Minimum Bayes Risk selection (LaDiC table 7): of several sampled candidates per image,
keep the one that agrees most with the others.
"""

from __future__ import annotations

import collections
import functools
import math
import numbers
import os
import shutil
import subprocess
import zipfile
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as spice_module
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

ImageId = int | str

COCO_METRIC_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice")

SPICE_DIR = os.path.dirname(os.path.abspath(spice_module.__file__))
SPICE_JAR = "spice-1.0.jar"
# What SPICE needs in its lib/ beside its own jars; pycocoevalcap downloads them if the first is missing.
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


class JavaNotFoundError(RuntimeError):
    """The JVM that the PTB tokenizer, METEOR and SPICE need is missing or broken."""


# ---------------------------------------------------------------------------------------------------------
# Environment: Java and the SPICE jars.
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _java_version(java: str) -> str:
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise JavaNotFoundError(f"`{java} -version` could not be run: {e}") from e
    if result.returncode != 0:
        raise JavaNotFoundError(f"`{java} -version` failed with exit code {result.returncode}: "
                                f"{result.stderr.strip()[:500]}")
    output = (result.stderr or result.stdout).strip()  # `java -version` prints to stderr.
    return output.splitlines()[0] if output else java


def require_java() -> str:
    """Returns the first line of `java -version`; raises JavaNotFoundError saying what to install."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "caption metrics need Java: pycocoevalcap's PTB tokenizer, METEOR and SPICE run on the "
            "JVM, but no `java` executable is on PATH. Install a Java runtime (e.g. `apt-get install "
            "openjdk-17-jre-headless`) so that `java -version` works.")
    return _java_version(java)


def spice_status(lib_dir: str | os.PathLike | None = None) -> str:
    """Says whether SPICE can run offline: "ok", or "unavailable: <why>".

    Args:
      lib_dir: SPICE's library directory; default pycocoevalcap's own ``spice/lib``. ``spice-1.0.jar``
        is looked for in its parent directory, as in pycocoevalcap's layout.

    SPICE needs Java and, in ``lib_dir``, the Stanford CoreNLP 3.6.0 jar and models jar. A missing or
    unreadable jar (e.g. from an interrupted download) makes SPICE unavailable. Nothing is downloaded.
    """
    lib_dir = os.path.join(SPICE_DIR, "lib") if lib_dir is None else os.fspath(lib_dir)
    required = [os.path.join(os.path.dirname(os.path.abspath(lib_dir)), SPICE_JAR)]
    required += [os.path.join(lib_dir, name) for name in SPICE_CORENLP_JARS]
    problems = []
    for path in required:
        if not os.path.isfile(path):
            problems.append(f"{os.path.basename(path)} is missing")
        elif not zipfile.is_zipfile(path):
            problems.append(f"{os.path.basename(path)} is not a valid jar")
    if problems:
        return (f"unavailable: {'; '.join(problems)} (looked in {lib_dir}; SPICE needs the Stanford "
                "CoreNLP 3.6.0 jars there, see pycocoevalcap/spice/get_stanford_models.py)")
    if shutil.which("java") is None:
        return "unavailable: no `java` executable on PATH"
    return "ok"


# ---------------------------------------------------------------------------------------------------------
# Input validation.
# ---------------------------------------------------------------------------------------------------------


def _check_id(image_id: object, where: str) -> None:
    if isinstance(image_id, bool) or not isinstance(image_id, (numbers.Integral, str)):
        raise TypeError(f"{where}: image id {image_id!r} has type {type(image_id).__name__}; "
                        "expected int or str")


def validate_captions(predictions: Mapping[ImageId, str],
                      references: Mapping[ImageId, Sequence[str]]) -> list[ImageId]:
    """Checks predictions and references; returns the image ids in the order of `predictions`.

    The two id sets must be equal and non-empty; each prediction a str (possibly empty); each
    reference list a non-empty list of non-blank str. Errors name the first offending image id.
    """
    if not isinstance(predictions, Mapping):
        raise TypeError("predictions must be a dict image_id -> caption, got "
                        f"{type(predictions).__name__}")
    if not isinstance(references, Mapping):
        raise TypeError("references must be a dict image_id -> list of captions, got "
                        f"{type(references).__name__}")
    if not predictions:
        raise ValueError("predictions is empty: there are no images to score")
    for image_id in predictions:
        _check_id(image_id, "predictions")
    for image_id in references:
        _check_id(image_id, "references")
    no_refs = [i for i in predictions if i not in references]
    no_pred = [i for i in references if i not in predictions]
    if no_refs or no_pred:
        parts = []
        if no_refs:
            parts.append(f"{len(no_refs)} predicted image id(s) have no references, e.g. {no_refs[:5]!r}")
        if no_pred:
            parts.append(f"{len(no_pred)} referenced image id(s) have no prediction, e.g. {no_pred[:5]!r}")
        raise ValueError("predictions and references must have the same image ids: " + "; ".join(parts))
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for image {image_id!r} must be a str, got "
                            f"{type(caption).__name__}: {caption!r:.80}")
    for image_id in predictions:
        refs = references[image_id]
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(f"references for image {image_id!r} must be a list of str, got "
                            f"{type(refs).__name__}: {refs!r:.80}")
        if not refs:
            raise ValueError(f"references for image {image_id!r} are an empty list; each image needs "
                             "at least one reference caption")
        for k, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise TypeError(f"reference {k} of image {image_id!r} must be a str, got "
                                f"{type(ref).__name__}")
            if not ref.strip():
                raise ValueError(f"reference {k} of image {image_id!r} is blank: {ref!r}")
    return list(predictions)


# ---------------------------------------------------------------------------------------------------------
# COCO caption metrics.
# ---------------------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    # The PTB tokenizer reads one caption per line: a line break inside a caption (\r, \u2028, ...;
    # pycocoevalcap replaces only \n) would shift every later caption onto the wrong image. Whitespace
    # is no token, so collapsing it changes no score.
    return " ".join(text.split())


def ptb_tokenize(predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]],
                 image_ids: Sequence[ImageId]) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """PTB-tokenizes as pycocoevalcap and returns (gts, res), keyed by position in `image_ids`.

    Positional int keys keep pycocoevalcap away from mixed int/str ids (SPICE sorts them). Blank
    predictions skip the tokenizer and come back as "". A reference that is empty after tokenization
    (punctuation only) is an error: nothing could match it.
    """
    to_tokenize: dict[str, list[dict[str, str]]] = {}
    for index, image_id in enumerate(image_ids):
        to_tokenize[f"r{index}"] = [{"caption": _one_line(r)} for r in references[image_id]]
        hypothesis = _one_line(predictions[image_id])
        if hypothesis:
            to_tokenize[f"h{index}"] = [{"caption": hypothesis}]
    tokenized = PTBTokenizer().tokenize(to_tokenize)

    gts, res = {}, {}
    for index, image_id in enumerate(image_ids):
        refs = tokenized.get(f"r{index}", [])
        if len(refs) != len(references[image_id]):
            raise RuntimeError(f"the PTB tokenizer returned {len(refs)} references for image "
                               f"{image_id!r}, expected {len(references[image_id])}")
        for k, ref in enumerate(refs):
            if not ref.strip():
                raise ValueError(f"reference {k} of image {image_id!r} ({references[image_id][k]!r}) is "
                                 "empty after PTB tokenization (punctuation only?)")
        hypothesis = tokenized.get(f"h{index}", [""])
        if len(hypothesis) != 1:
            raise RuntimeError(f"the PTB tokenizer returned {len(hypothesis)} predictions for image "
                               f"{image_id!r}, expected 1")
        gts[index], res[index] = refs, hypothesis
    return gts, res


class CaptionScorer:
    """pycocoevalcap's scorers, held ready for several evaluations.

    METEOR runs in a JVM that takes seconds to start; a scorer starts it once and reuses it for every
    call (e.g. for every checkpoint of a run). Use it as a context manager or call `close()`.

    Args:
      spice: None = SPICE when its jars are present, else reported unavailable; True = SPICE required
        (raise when unavailable or failing); False = skip SPICE.
    """

    def __init__(self, *, spice: bool | None = None):
        if spice not in (None, True, False):
            raise TypeError(f"spice must be None, True or False, got {spice!r}")
        self._meteor = None
        self.java_version = require_java()
        self._spice_mode = spice
        if spice:
            status = spice_status()
            if status != "ok":
                raise RuntimeError(f"SPICE was required (spice=True) but is {status}")
        self._meteor = Meteor()

    def close(self) -> None:
        """Stops the METEOR JVM. Safe to call more than once."""
        meteor, self._meteor = getattr(self, "_meteor", None), None
        if meteor is None:
            return
        process = meteor.meteor_p
        with meteor.lock:
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None and not stream.closed:
                    stream.close()
            if process.poll() is None:
                process.kill()
            process.wait()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        self.close()

    def _live_meteor(self) -> Meteor:
        if self._meteor is None:
            raise RuntimeError("this CaptionScorer has been closed")
        code = self._meteor.meteor_p.poll()
        if code is not None:
            raise RuntimeError(f"the METEOR JVM has exited with code {code}")
        return self._meteor

    def __call__(self, predictions: Mapping[ImageId, str],
                 references: Mapping[ImageId, Sequence[str]]) -> dict:
        """Scores `predictions` against `references`; see `caption_metrics`."""
        image_ids = validate_captions(predictions, references)
        meteor = self._live_meteor()
        gts, res = ptb_tokenize(predictions, references, image_ids)

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        # METEOR reads "|||"-separated fields from one line. pycocoevalcap strips "|||" from the
        # hypothesis only; in a reference it would split it into two.
        meteor_gts = {k: [r.replace("|||", "") for r in refs] for k, refs in gts.items()}
        meteor_score, _ = meteor.compute_score(meteor_gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        spice, status = self._spice(gts, res)
        return {
            "bleu_1": float(bleu[0]),
            "bleu_2": float(bleu[1]),
            "bleu_3": float(bleu[2]),
            "bleu_4": float(bleu[3]),
            "meteor": float(meteor_score),
            "rouge_l": float(rouge),
            "cider": float(cider),
            "spice": spice,
            "spice_status": status,
        }

    def _spice(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float | None, str]:
        if self._spice_mode is False:
            return None, "disabled"
        status = spice_status()
        if status != "ok":
            if self._spice_mode:
                raise RuntimeError(f"SPICE was required (spice=True) but is {status}")
            return None, status
        try:
            # The jars are present (checked above), so Spice() will not try to download them.
            score, _ = Spice().compute_score(gts, res)
        except (subprocess.CalledProcessError, OSError, ValueError) as e:
            if self._spice_mode:
                raise RuntimeError(f"SPICE failed: {e}") from e
            return None, f"failed: {type(e).__name__}: {e}"
        return float(score), "ok"


def caption_metrics(predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]],
                    *, spice: bool | None = None) -> dict:
    """COCO caption metrics of `predictions` (one caption per image) against `references`.

    Returns floats ``bleu_1`` .. ``bleu_4``, ``meteor``, ``rouge_l``, ``cider`` (CIDEr-D as
    pycocoevalcap's ``Cider``), ``spice`` (float, or None when not computed) and ``spice_status`` ("ok",
    "disabled", or why SPICE is unavailable). Scores are fractions; papers print them x100 (CIDEr 1.262
    prints as 126.2). An empty prediction is an empty caption: zero for that image.

    Args:
      predictions: image id -> generated caption.
      references: image id -> reference captions, for the same ids.
      spice: None = SPICE when available; True = require it; False = skip it.

    Starts a METEOR JVM for this call; to score many sets, keep one `CaptionScorer` instead.
    """
    validate_captions(predictions, references)  # Before starting any JVM.
    with CaptionScorer(spice=spice) as scorer:
        return scorer(predictions, references)


# ---------------------------------------------------------------------------------------------------------
# Diversity.
# ---------------------------------------------------------------------------------------------------------


def _split_captions(captions: Sequence[str], name: str = "captions") -> list[list[str]]:
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(captions).__name__}")
    words = []
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(caption).__name__}")
        words.append(caption.split())
    return words


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def distinct_n(captions: Sequence[str], n: int) -> float:
    """Dist-n: distinct n-grams over all captions / total number of words (Prefix-diffusion).

    Words are whitespace-separated tokens compared exactly (sampled captions are already lower-case);
    n-grams do not cross caption boundaries. 0.0 when there are no words.
    """
    _check_positive_int(n, "n")
    tokenized = _split_captions(captions)
    total_words = sum(len(words) for words in tokenized)
    if total_words == 0:
        return 0.0
    ngrams = {tuple(words[i:i + n]) for words in tokenized for i in range(len(words) - n + 1)}
    return len(ngrams) / total_words


def self_bleu(pools: Sequence[Sequence[str]]) -> float | None:
    """Self-BLEU-4 of each image's candidates: the mean, over images and their candidates, of the sentence
    BLEU-4 of a candidate with the image's other candidates as references (pycocoevalcap's BLEU on
    whitespace words). High: the candidates repeat each other; low: diverse. None when no image has two."""
    gts, res = {}, {}
    for i, pool in enumerate(pools):
        words = [" ".join(c.split()) or "<empty>" for c in pool]
        if len(words) < 2:
            continue
        for j, hyp in enumerate(words):
            res[(i, j)] = [hyp]
            gts[(i, j)] = words[:j] + words[j + 1:]
    if not res:
        return None
    _, per_sentence = Bleu(4).compute_score(gts, res, verbose=0)
    return float(np.mean(per_sentence[3]))


def diversity(captions: Sequence[str], references: Sequence[Sequence[str]],
              pools: Sequence[Sequence[str]] | None = None) -> dict[str, float | None]:
    """The diversity scores of a set of output captions: ``dist_1..3`` (``distinct_n``), ``vocab_usage``
    (distinct output words / distinct words of the references, normalised as captions are) and, with several candidates
    per image (``pools``), ``self_bleu``."""
    out: dict[str, float | None] = {f"dist_{n}": distinct_n(captions, n) for n in (1, 2, 3)}
    from ladic_jax.data.text import normalize_caption
    ref_words = {w for refs in references for r in refs for w in normalize_caption(r).split()}
    out["vocab_usage"] = vocab_usage(captions, len(ref_words)) if ref_words else None
    if pools is not None:
        out["self_bleu"] = self_bleu(pools)
    return out


def select_by_score(scores: np.ndarray) -> list[int]:
    """Per row of a (images, candidates) score matrix, the index of the highest score (the first of equal
    maxima): candidate re-ranking, e.g. by CLIP image-text cosine (Prefix-diffusion)."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be (images, candidates) with at least one candidate, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    return [int(i) for i in np.argmax(scores, axis=1)]


def vocab_usage(captions: Sequence[str], vocab_size: int) -> float:
    """Distinct words over all captions / `vocab_size` (the size of the model's vocabulary)."""
    _check_positive_int(vocab_size, "vocab_size")
    tokenized = _split_captions(captions)
    return len({word for words in tokenized for word in words}) / vocab_size


# ---------------------------------------------------------------------------------------------------------
# Minimum Bayes Risk selection.
# ---------------------------------------------------------------------------------------------------------

_MAX_N = 4
_CIDER_SIGMA = 6.0

NgramCounts = list[collections.Counter]


def _ngram_counts(words: Sequence[str]) -> NgramCounts:
    """Counts of the 1..4-grams of `words`, one Counter per order."""
    return [collections.Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1))
            for k in range(1, _MAX_N + 1)]


def _sentence_bleu(hyp: NgramCounts, hyp_len: int, ref: NgramCounts, ref_len: int) -> float:
    """BLEU-4 of one hypothesis against one reference, add-one smoothed for n > 1.

    Lin & Och (2004): p_1 = m_1 / g_1, p_n = (m_n + 1) / (g_n + 1) for n > 1, so that two close
    candidates without a common 4-gram are not scored zero.
    """
    if hyp_len == 0:
        return 0.0
    log_precision = 0.0
    for k in range(_MAX_N):
        matches = sum(min(count, ref[k][gram]) for gram, count in hyp[k].items() if gram in ref[k])
        guesses = max(hyp_len - k, 0)
        if k == 0:
            if matches == 0:
                return 0.0
            log_precision += math.log(matches / guesses)
        else:
            log_precision += math.log((matches + 1) / (guesses + 1))
    log_brevity = min(0.0, 1.0 - ref_len / hyp_len)
    return math.exp(log_brevity + log_precision / _MAX_N)


TfIdf = tuple[list[dict], list[float]]


def _tfidf(counts: NgramCounts, idf: Mapping[tuple[str, ...], float] | None) -> TfIdf:
    vectors, norms = [], []
    for counter in counts:
        vector = {gram: tf * (1.0 if idf is None else idf.get(gram, 0.0)) for gram, tf in counter.items()}
        vectors.append(vector)
        norms.append(math.sqrt(sum(v * v for v in vector.values())))
    return vectors, norms


def _sentence_cider(hyp: TfIdf, hyp_len: int, ref: TfIdf, ref_len: int) -> float:
    """CIDEr-D of one hypothesis against one reference: clipped tf-idf cosine x Gaussian length penalty."""
    (hyp_vectors, hyp_norms), (ref_vectors, ref_norms) = hyp, ref
    total = 0.0
    for k in range(_MAX_N):
        if hyp_norms[k] == 0 or ref_norms[k] == 0:
            continue
        ref_vector = ref_vectors[k]
        dot = sum(min(value, ref_vector[gram]) * ref_vector[gram]
                  for gram, value in hyp_vectors[k].items() if gram in ref_vector)
        total += dot / (hyp_norms[k] * ref_norms[k])
    penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * _CIDER_SIGMA ** 2))
    return 10.0 * penalty * total / _MAX_N


def agreement_matrix(candidates: Sequence[str], metric: Literal["bleu", "cider"] = "bleu",
                     idf: Mapping[tuple[str, ...], float] | None = None) -> np.ndarray:
    """[i, j] = score of candidate i with candidate j as its only reference; the diagonal is 0.

    `idf` weights n-grams for "cider" (None = uniform).
    """
    words = [c.split() for c in candidates]
    counts = [_ngram_counts(w) for w in words]
    lengths = [len(w) for w in words]
    if metric == "bleu":
        features, pair_score = counts, _sentence_bleu
    elif metric == "cider":
        features, pair_score = [_tfidf(c, idf) for c in counts], _sentence_cider
    else:
        raise ValueError(f"metric must be 'bleu' or 'cider', got {metric!r}")
    scores = np.zeros((len(candidates), len(candidates)))
    for i in range(len(candidates)):
        for j in range(len(candidates)):
            if i != j:
                scores[i, j] = pair_score(features[i], lengths[i], features[j], lengths[j])
    return scores


def _pool_idf(candidates: Sequence[Sequence[str]]) -> dict[tuple[str, ...], float] | None:
    """CIDEr's idf with each image's candidate pool as one document; None (uniform) for one image."""
    if len(candidates) < 2:
        return None
    document_frequency: collections.Counter = collections.Counter()
    for pool in candidates:
        grams = set()
        for caption in pool:
            for counter in _ngram_counts(caption.split()):
                grams.update(counter)
        document_frequency.update(grams)
    log_documents = math.log(len(candidates))
    return {gram: log_documents - math.log(df) for gram, df in document_frequency.items()}


def mbr_select(candidates: Sequence[Sequence[str]],
               metric: Literal["bleu", "cider"] = "bleu") -> list[int]:
    """Minimum Bayes Risk: per image, the index of the candidate that agrees most with the others.

    A candidate's agreement is the mean, over the other candidates j, of its score with j as the only
    reference: add-one smoothed sentence BLEU-4 (default) or CIDEr-D with idf over the images'
    candidate pools (uniform n-gram weights for a single image). Ties go to the lowest index, so one
    candidate or n identical ones give 0.

    Args:
      candidates: per image, a list of candidate captions (whitespace-tokenized text).
      metric: "bleu" or "cider".
    """
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError("candidates must be a list (per image) of lists of str, got "
                        f"{type(candidates).__name__}")
    if metric not in ("bleu", "cider"):
        raise ValueError(f"metric must be 'bleu' or 'cider', got {metric!r}")
    for i, pool in enumerate(candidates):
        _split_captions(pool, name=f"candidates[{i}]")
        if not pool:
            raise ValueError(f"candidates[{i}] is empty: each image needs at least one candidate")
    idf = _pool_idf(candidates) if metric == "cider" else None
    chosen = []
    for pool in candidates:
        if len(pool) == 1:
            chosen.append(0)
            continue
        agreement = agreement_matrix(pool, metric, idf).sum(axis=1) / (len(pool) - 1)
        chosen.append(int(np.argmax(agreement)))  # argmax returns the first of equal maxima.
    return chosen
