"""Caption metrics against pycocoevalcap called directly and against BLEU written from its formula."""

import collections
import math
import os
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from ladic_jax.evaluation import metrics

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")

# Already lower-case and without punctuation, so the PTB tokenizer leaves them as they are.
BLEU_CASES = {
    "circle": ("a red circle above a small blue square",
               ["a red circle above a blue square", "there is a red circle over a small blue square",
                "a small blue square below a red circle"]),
    "short": ("a green triangle", ["a big green triangle", "one green triangle on the left"]),
    "clip": ("the the the cat", ["the cat sat on the mat", "a cat is on the mat"]),
    "tie": ("a cat on a mat", ["a cat on mat", "a cat sits on a mat"]),
}


def reference_corpus_bleu(hypotheses, references, max_n=4):
    """Corpus BLEU-1..max_n from Papineni et al., with pycocoevalcap's conventions.

    Modified precision p_n = sum of clipped n-gram matches / sum of hypothesis n-grams over the corpus;
    BLEU_n = BP * (p_1 ... p_n)^(1/n); BP = exp(1 - r/c) when c < r, where c = total hypothesis length
    and r = sum of the reference lengths closest to each hypothesis length (a tie takes the shorter).
    pycocoevalcap adds 1e-15 to each match count and 1e-9 to each n-gram count.
    """
    matches, totals = [0] * max_n, [0] * max_n
    c = r = 0
    for hyp, refs in zip(hypotheses, references):
        hyp, refs = hyp.split(), [x.split() for x in refs]
        c += len(hyp)
        ref_lengths = sorted({len(x) for x in refs})
        best_distance = min(abs(length - len(hyp)) for length in ref_lengths)
        r += [length for length in ref_lengths if abs(length - len(hyp)) == best_distance][0]
        for n in range(1, max_n + 1):
            grams = lambda words: collections.Counter(  # noqa: E731
                " ".join(words[i:i + n]) for i in range(len(words) - n + 1))
            hyp_grams = grams(hyp)
            most_in_a_ref = collections.Counter()
            for ref in refs:
                most_in_a_ref |= grams(ref)  # | takes the maximum count.
            matches[n - 1] += sum((hyp_grams & most_in_a_ref).values())  # & takes the minimum.
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if c == 0:
        return [0.0] * max_n
    brevity = 1.0 if c >= r else math.exp(1.0 - r / c)
    precisions = [(m + 1e-15) / (t + 1e-9) for m, t in zip(matches, totals)]
    return [brevity * math.prod(precisions[:n]) ** (1.0 / n) for n in range(1, max_n + 1)]


@pytest.fixture(scope="module")
def scorer():
    with metrics.CaptionScorer() as s:
        yield s


@pytest.fixture(scope="module")
def reference_meteor(scorer):
    """pycocoevalcap's own Meteor object. A METEOR JVM takes ~10 s to start on this machine, so the
    scorer's is reused: it is an unmodified `pycocoevalcap.meteor.meteor.Meteor`, stateless between
    calls."""
    assert type(scorer._meteor) is Meteor
    return scorer._meteor


def test_reference_bleu_hand_values():
    # "the the the cat" vs refs with at most two "the": 3 of 4 unigrams match; both refs have 6 words,
    # so BP = exp(1 - 6/4).
    hyp, refs = BLEU_CASES["clip"]
    assert reference_corpus_bleu([hyp], [refs])[0] == pytest.approx(0.75 * math.exp(-0.5), rel=1e-9)
    # Length 5 between refs of 4 and 6: the shorter is closest, no brevity penalty, all unigrams match.
    hyp, refs = BLEU_CASES["tie"]
    assert reference_corpus_bleu([hyp], [refs])[0] == pytest.approx(1.0, rel=1e-9)
    # "a green triangle": p1 = 3/3, p2 = 1/2 ("green triangle" matches, "a green" not), closest ref has
    # 4 words so BP = exp(1 - 4/3); its only trigram does not match -> BLEU-3 ~ 0.
    hyp, refs = BLEU_CASES["short"]
    b1, b2, b3, _ = reference_corpus_bleu([hyp], [refs])
    assert b1 == pytest.approx(math.exp(1 - 4 / 3), rel=1e-9)
    assert b2 == pytest.approx(math.exp(1 - 4 / 3) * math.sqrt(0.5), rel=1e-9)
    assert b3 < 1e-4


def test_bleu_matches_closed_form(scorer):
    predictions = {k: hyp for k, (hyp, _) in BLEU_CASES.items()}
    references = {k: refs for k, (_, refs) in BLEU_CASES.items()}
    result = scorer(predictions, references)
    expected = reference_corpus_bleu(list(predictions.values()), list(references.values()))
    got = [result[f"bleu_{n}"] for n in range(1, 5)]
    np.testing.assert_allclose(got, expected, rtol=1e-7)
    assert 0.3 < got[3] < got[2] < got[1] < got[0] < 1.0


def test_single_image_bleu_matches_hand_value(scorer):
    hyp, refs = BLEU_CASES["clip"]
    result = scorer({0: hyp}, {0: refs})
    assert result["bleu_1"] == pytest.approx(0.75 * math.exp(-0.5), rel=1e-7)


RAW_PREDICTIONS = {
    1: "A red circle, above a small blue square.",
    "img_2": "There is a green triangle!",
    3: "Two cats sitting on the mat",
    4: "a yellow square left of a big red circle",
    5: "A dog runs on the grass.",
    6: "blue blue blue",
}
RAW_REFERENCES = {
    1: ["A red circle above a blue square.", "There's a small blue square under a big red circle.",
        "a red circle over a small blue square"],
    "img_2": ["A big green triangle.", "One green triangle, on the left."],
    3: ["Two cats sit on a mat.", "A pair of cats on the mat", "cats resting on a rug"],
    4: ["A yellow square to the left of a large red circle.", "a red circle right of a yellow square"],
    5: ["A dog running on grass.", "The dog runs across a field.", "a brown dog on the lawn"],
    6: ["A blue circle.", "one blue circle in the middle"],
}


def pycocoevalcap_direct(predictions, references, meteor):
    """What COCOEvalCap does: PTB-tokenize gts and res, then each scorer."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_score, _ = meteor.compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu_1": bleu[0], "bleu_2": bleu[1], "bleu_3": bleu[2], "bleu_4": bleu[3],
            "meteor": meteor_score, "rouge_l": rouge, "cider": cider}


def test_caption_metrics_equal_pycocoevalcap_direct(reference_meteor):
    result = metrics.caption_metrics(RAW_PREDICTIONS, RAW_REFERENCES)
    expected = pycocoevalcap_direct(RAW_PREDICTIONS, RAW_REFERENCES, reference_meteor)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        assert isinstance(result[key], float)
    assert set(result) == set(metrics.COCO_METRIC_KEYS) | {"spice_status"}
    # The numbers are not degenerate: partial overlap everywhere.
    assert 0.1 < result["bleu_4"] < 0.9 and 0.1 < result["meteor"] < 0.9 and 0.2 < result["cider"] < 5


def test_perfect_predictions(scorer):
    predictions = {k: refs[0] for k, refs in RAW_REFERENCES.items()}
    result = scorer(predictions, RAW_REFERENCES)
    for n in range(1, 5):
        assert result[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert result["rouge_l"] == pytest.approx(1.0, abs=1e-12)
    assert result["meteor"] > 0.95


def test_empty_predictions_score_zero(scorer):
    blank = {1: "", "img_2": "   ", 3: "..."}  # "..." is empty once the tokenizer drops punctuation.
    predictions = {k: blank.get(k, v) for k, v in RAW_PREDICTIONS.items()}
    result = scorer(predictions, RAW_REFERENCES)
    assert all(math.isfinite(result[k]) for k in metrics.COCO_METRIC_KEYS if k != "spice")
    # ROUGE-L is a mean over images: the blank ones must count as 0.
    rest = [k for k in RAW_PREDICTIONS if k not in blank]
    rest_rouge = scorer({k: RAW_PREDICTIONS[k] for k in rest}, {k: RAW_REFERENCES[k] for k in rest})
    assert result["rouge_l"] == pytest.approx(rest_rouge["rouge_l"] * len(rest) / len(predictions), rel=1e-12)
    # BLEU: an empty caption adds its closest reference length (the shortest) to r and nothing to c.
    tokenized = PTBTokenizer().tokenize(
        {("ref", k): [{"caption": c} for c in refs] for k, refs in RAW_REFERENCES.items()}
        | {("hyp", k): [{"caption": c}] for k, c in RAW_PREDICTIONS.items()})
    hypotheses = ["" if k in blank else tokenized["hyp", k][0] for k in RAW_PREDICTIONS]
    expected = reference_corpus_bleu(hypotheses, [tokenized["ref", k] for k in RAW_PREDICTIONS])
    np.testing.assert_allclose([result[f"bleu_{n}"] for n in range(1, 5)], expected, rtol=1e-7)

    all_blank = scorer({k: "" for k in RAW_REFERENCES}, RAW_REFERENCES)
    for key in ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider"):
        assert all_blank[key] == pytest.approx(0.0, abs=1e-12), key


def test_line_breaks_inside_captions_do_not_shift_images(scorer):
    predictions = {k: v.replace(" ", "\r", 1) for k, v in RAW_PREDICTIONS.items()}
    predictions[5] = "A dog\u2028runs on\nthe grass."
    shifted = scorer(predictions, RAW_REFERENCES)
    plain = scorer(RAW_PREDICTIONS, RAW_REFERENCES)
    for key in ("bleu_4", "meteor", "rouge_l", "cider"):
        assert shifted[key] == pytest.approx(plain[key], rel=1e-12), key


@pytest.mark.parametrize("predictions, references, error, match", [
    ({1: "a"}, {2: ["a"]}, ValueError, r"same image ids.*\[1\].*\[2\]"),
    ({1: "a", 2: "b"}, {1: ["a"]}, ValueError, r"have no references, e\.g\. \[2\]"),
    ({1: "a", 7: 5}, {1: ["a"], 7: ["b"]}, TypeError, r"prediction for image 7 must be a str"),
    ({1: "a", "x": "b"}, {1: ["a"], "x": []}, ValueError, r"references for image 'x' are an empty list"),
    ({1: "a"}, {1: "a cat"}, TypeError, r"references for image 1 must be a list of str"),
    ({1: "a"}, {1: ["a", None]}, TypeError, r"reference 1 of image 1 must be a str"),
    ({1: "a"}, {1: ["a", "  "]}, ValueError, r"reference 1 of image 1 is blank"),
    ({}, {}, ValueError, r"no images"),
    ({1.5: "a"}, {1.5: ["a"]}, TypeError, r"image id 1.5 has type float"),
])
def test_bad_input_is_rejected_before_any_jvm(monkeypatch, predictions, references, error, match):
    monkeypatch.setattr(metrics, "CaptionScorer", None)  # Would fail if reached.
    with pytest.raises(error, match=match):
        metrics.caption_metrics(predictions, references)


def test_punctuation_only_reference_is_rejected(scorer):
    with pytest.raises(ValueError, match=r"reference 1 of image 'b'.*empty after PTB tokenization"):
        scorer({"a": "a cat", "b": "a dog"}, {"a": ["a cat"], "b": ["a dog", ". , !"]})


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(metrics.JavaNotFoundError, match=r"need Java.*no `java` executable is on PATH"):
        metrics.caption_metrics({1: "a cat"}, {1: ["a cat"]})


def test_java_version_is_read():
    assert "version" in metrics.require_java()


# ------------------------------------------------------------------------------------------------------
# SPICE availability.
# ------------------------------------------------------------------------------------------------------


def _make_jar(path):
    with zipfile.ZipFile(path, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")


def test_spice_status_with_fake_lib_dir(tmp_path):
    lib = tmp_path / "spice" / "lib"
    lib.mkdir(parents=True)
    status = metrics.spice_status(lib)
    assert status.startswith("unavailable")
    for name in ("spice-1.0.jar", "stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        assert f"{name} is missing" in status
    _make_jar(tmp_path / "spice" / "spice-1.0.jar")
    _make_jar(lib / "stanford-corenlp-3.6.0.jar")
    status = metrics.spice_status(lib)
    assert "stanford-corenlp-3.6.0-models.jar is missing" in status
    assert "stanford-corenlp-3.6.0.jar is missing" not in status
    (lib / "stanford-corenlp-3.6.0-models.jar").write_bytes(b"half a download")
    assert "stanford-corenlp-3.6.0-models.jar is not a valid jar" in metrics.spice_status(lib)
    _make_jar(lib / "stanford-corenlp-3.6.0-models.jar")
    assert metrics.spice_status(lib) == "ok"


def test_spice_status_needs_java(tmp_path, monkeypatch):
    lib = tmp_path / "spice" / "lib"
    lib.mkdir(parents=True)
    for path in (tmp_path / "spice" / "spice-1.0.jar", lib / "stanford-corenlp-3.6.0.jar",
                 lib / "stanford-corenlp-3.6.0-models.jar"):
        _make_jar(path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert metrics.spice_status(lib) == "unavailable: no `java` executable on PATH"


JARS_PRESENT = all(os.path.exists(os.path.join(metrics.SPICE_DIR, "lib", name))
                   for name in metrics.SPICE_CORENLP_JARS)


@pytest.mark.skipif(JARS_PRESENT, reason="the CoreNLP jars are installed here; SPICE is available")
def test_spice_unavailable_without_jars_and_never_started(scorer, monkeypatch):
    def no_spice(*args, **kwargs):
        raise AssertionError("SPICE must not be started (it would try to download its jars)")

    monkeypatch.setattr(metrics, "Spice", no_spice)
    result = scorer({1: "a cat"}, {1: ["a cat", "the cat"]})
    assert result["spice"] is None
    assert result["spice_status"].startswith("unavailable")
    assert "stanford-corenlp-3.6.0.jar is missing" in result["spice_status"]
    with pytest.raises(RuntimeError, match="SPICE was required"):
        metrics.CaptionScorer(spice=True)  # Fails before starting METEOR.


def test_spice_wiring_and_modes(scorer, monkeypatch):
    seen = {}

    class FakeSpice:
        def compute_score(self, gts, res):
            seen["gts"], seen["res"] = gts, res
            return 0.25, []

    monkeypatch.setattr(metrics, "spice_status", lambda lib_dir=None: "ok")
    monkeypatch.setattr(metrics, "Spice", FakeSpice)
    result = scorer({"x": "A Cat."}, {"x": ["The cat!"]})
    assert (result["spice"], result["spice_status"]) == (0.25, "ok")
    assert seen == {"gts": {0: ["the cat"]}, "res": {0: ["a cat"]}}  # tokenized, positional ids.

    class FailingSpice:
        def compute_score(self, gts, res):
            raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    monkeypatch.setattr(metrics, "Spice", FailingSpice)
    result = scorer({"x": "a cat"}, {"x": ["the cat"]})
    assert result["spice"] is None and result["spice_status"].startswith("failed: CalledProcessError")

    monkeypatch.setattr(scorer, "_spice_mode", True)
    with pytest.raises(RuntimeError, match="SPICE failed"):
        scorer({"x": "a cat"}, {"x": ["the cat"]})
    monkeypatch.setattr(scorer, "_spice_mode", False)
    result = scorer({"x": "a cat"}, {"x": ["the cat"]})
    assert (result["spice"], result["spice_status"]) == (None, "disabled")


# ------------------------------------------------------------------------------------------------------
# Diversity and MBR.
# ------------------------------------------------------------------------------------------------------


def test_distinct_n_hand_example():
    captions = ["a red circle", "a red square", "a red circle"]  # 9 words.
    assert metrics.distinct_n(captions, 1) == pytest.approx(4 / 9)  # a red circle square
    assert metrics.distinct_n(captions, 2) == pytest.approx(3 / 9)  # a-red red-circle red-square
    assert metrics.distinct_n(captions, 3) == pytest.approx(2 / 9)
    assert metrics.distinct_n(captions, 4) == 0.0
    assert metrics.distinct_n(["a b", "c d"], 2) == pytest.approx(2 / 4)  # no n-gram across captions
    assert metrics.distinct_n(["", ""], 1) == 0.0
    with pytest.raises(ValueError, match="n must be a positive int"):
        metrics.distinct_n(captions, 0)
    with pytest.raises(TypeError, match=r"captions\[1\] must be a str"):
        metrics.distinct_n(["a", 3], 1)


def test_vocab_usage():
    assert metrics.vocab_usage(["a red circle", "a red square"], 10) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="vocab_size"):
        metrics.vocab_usage(["a"], 0)


def test_self_bleu_closed_form():
    # Two 5-word candidates sharing their first four words: with the other as the only reference,
    # p1..p4 = 4/5, 3/4, 2/3, 1/2 and no brevity penalty, so BLEU-4 = (0.2)^(1/4) for each.
    pools = [["a b c d e", "a b c d f"]]
    assert metrics.self_bleu(pools) == pytest.approx(0.2 ** 0.25, rel=1e-6)
    # Identical candidates repeat each other fully; a lone candidate per image gives nothing to compare.
    assert metrics.self_bleu([["a red circle x", "a red circle x", "a red circle x"]]) == pytest.approx(1.0)
    assert metrics.self_bleu([["a"], ["b"]]) is None
    # The mean is over every (image, candidate).
    assert metrics.self_bleu(pools + [["p q r s", "p q r s"]]) == pytest.approx((2 * 0.2 ** 0.25 + 2) / 4, rel=1e-6)


def test_diversity_scores():
    captions = ["a red circle", "a red square", "a red circle"]
    references = [["A red circle.", "one red circle"], ["a red square"], ["a big red circle"]]
    got = metrics.diversity(captions, references)
    assert got["dist_1"] == pytest.approx(4 / 9) and got["dist_3"] == pytest.approx(2 / 9)
    # Output words {a, red, circle, square} over the references' {a, red, circle, one, square, big}.
    assert got["vocab_usage"] == pytest.approx(4 / 6)
    assert "self_bleu" not in got
    assert metrics.diversity(captions, references, [["x y z w", "x y z w"]] * 3)["self_bleu"] == pytest.approx(1.0)


@pytest.mark.parametrize("metric", ["bleu", "cider"])
def test_mbr_select_hand_examples(metric):
    centre = "a red circle above a blue square"
    one_off = "a red circle above a green square"
    other_off = "a red circle below a blue square"
    odd = "a big yellow triangle"
    got = metrics.mbr_select([
        ["a cat"] * 5,                           # identical -> first
        ["two dogs"],                            # single -> 0
        [one_off, other_off, centre, odd],       # the centre agrees most with the rest
        [odd, centre, centre, one_off],          # the odd one out is never chosen
    ], metric=metric)
    assert got == [0, 0, 2, 1]


def test_mbr_agreement_of_identical_candidates_is_one():
    scores = metrics.agreement_matrix(["a b c d e", "a b c d e", "x y"])
    assert scores[0, 1] == pytest.approx(1.0) and scores[0, 0] == 0.0 and scores[0, 2] == 0.0


def test_mbr_select_rejects_bad_input():
    with pytest.raises(ValueError, match=r"candidates\[1\] is empty"):
        metrics.mbr_select([["a"], []])
    with pytest.raises(ValueError, match="metric must be"):
        metrics.mbr_select([["a"]], metric="rouge")
    with pytest.raises(TypeError, match="candidates must be a list"):
        metrics.mbr_select("a b")
