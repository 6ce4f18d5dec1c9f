"""Evaluation and analysis metrics, pure functions over numbers (numpy / scipy only, no model).

Answers:
- :func:`normalize_answer` — the VQA evaluation's normalisation (lower case, punctuation, number
  words → digits, articles and a few contractions), used by exact match and VQA accuracy.
- :func:`exact_match` — normalised prediction equals one of the normalised references.
- :func:`vqa_accuracy` — the VQA 10-annotator accuracy: ``min(1, #matches / 3)`` averaged over the
  10 leave-one-annotator-out subsets of 9 (Antol et al. 2015, the official ``vqaEval.py``).
- :func:`pope_metrics` — POPE (Li et al. 2023): accuracy, precision, recall, F1 with "yes" the
  positive class, and the yes-ratio (share of "yes" predictions).

Calibration (Guo et al. 2017):
- :func:`calibration` — ECE and MCE over ``n_bins`` equal-width confidence bins (15 by default;
  bin ``b`` holds ``b/n < conf <= (b+1)/n``, confidence 0 goes to the first bin), top-label Brier
  score ``mean((conf - correct)^2)``, and the per-bin table for a reliability diagram.
- :func:`multiclass_brier` — ``mean_i sum_k (p_ik - y_ik)^2`` over option probabilities.

Overlap of two models' per-item correctness (``a`` = old, ``b`` = new):
- :func:`contingency` — the 2x2 table ``n11`` (both right), ``n10`` (a right, b wrong), ``n01``,
  ``n00``.
- :func:`mcnemar_exact` — two-sided exact McNemar test: ``min(1, 2 * Binom(n10 + n01, 1/2).cdf(
  min(n10, n01)))``; p = 1 when the models never disagree.
- :func:`phi_coefficient` — Pearson correlation of the two 0/1 vectors ``(n11 n00 - n10 n01) /
  sqrt(n1. n0. n.1 n.0)``; NaN when a margin is 0 (a model right on all or no items).
- :func:`gain_split` — the net gain ``n01 - n10`` split into "more" (``n01``: solved by the new
  model, not by the old) and "different" (``n10``: solved by the old, lost by the new).

Uncertainty (what a reviewer asks before reading a difference):
- :func:`chance_accuracy` — the accuracy of guessing uniformly among each item's options (mc: 1/k,
  yes/no: 1/2); None for open answers (no finite option set).
- :func:`bootstrap_ci` — percentile bootstrap 95% interval of a mean of per-item scores (items
  resampled with replacement, 2,000 resamples, a fixed seed so the report is reproducible).
- :func:`paired_bootstrap_diff` — the same for the difference of two models' accuracy on the same
  items (the items are resampled jointly, so the interval accounts for their correlation).
- :func:`clopper_pearson` — the exact binomial interval of a proportion k/n.
- :func:`discordant_split` — of the items exactly one model solves, the share the new one solves,
  ``n01 / (n01 + n10)``, with its Clopper-Pearson interval: 0.5 inside the interval = no evidence that
  either model solves more of the questions they disagree on (the McNemar question, as an interval).
- :func:`answer_warnings` — a model whose answers are all the same, or whose accuracy interval
  contains chance, is flagged: its overlap statistics (phi, "different questions") are noise.
- :func:`mean_std` — mean and sample standard deviation (ddof 1) over seeds.

Representations:
- :func:`linear_cka` — linear CKA (Kornblith et al. 2019) of two ``(n, p)`` / ``(n, q)`` matrices of
  the same ``n`` items: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred
  ``Xc``, ``Yc``; 1 for representations equal up to rotation and isotropic scale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from scipy.stats import beta, binom

# -- answers ------------------------------------------------------------------------------------

# From the official VQA evaluation (vqaEval.py): contractions written without the apostrophe, number
# words, articles, and the punctuation it strips or deletes.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "isnt": "isn't", "shouldnt": "shouldn't", "wasnt": "wasn't", "werent": "weren't", "wont": "won't",
    "wouldnt": "wouldn't", "youre": "you're", "theyre": "they're", "whats": "what's", "thats": "that's",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """VQA normalisation: ``" Two  Circles."`` → ``"2 circles"``; ``"The centre"`` → ``"centre"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for word in out.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    """True when the normalised prediction equals one of the normalised references."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(r) for r in references)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against its annotators' answers (10 in VQA v2).

    For each annotator, ``min(1, matches among the other annotators / 3)``; the mean over annotators.
    With one answer it is plain exact match.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return float(np.mean(scores))


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE's binary metrics with "yes" the positive class.

    ``predictions``/``labels``: "yes"/"no" strings (a prediction that is neither counts as "no", as
    POPE's own script does). Precision and F1 are NaN-free: 0 when there are no positive predictions.
    """
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need equal, non-zero lengths, got {len(predictions)} predictions, {len(labels)} labels")
    pred = np.array([p.strip().lower().startswith("yes") for p in predictions])
    gold = np.array([g.strip().lower() == "yes" for g in labels])
    tp = int((pred & gold).sum())
    fp = int((pred & ~gold).sum())
    fn = int((~pred & gold).sum())
    tn = int((~pred & ~gold).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(gold), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": float(pred.mean()), "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": len(gold)}


# -- calibration --------------------------------------------------------------------------------


def calibration(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 15) -> dict:
    """ECE, MCE, top-label Brier and the reliability table over equal-width bins.

    ``confidence``: probability of the predicted answer, in [0, 1]. ``bins``: one dict per bin with
    ``lo``, ``hi``, ``count``, ``accuracy`` and ``confidence`` (None for an empty bin).
    """
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    if conf.shape != corr.shape or conf.ndim != 1 or conf.size == 0:
        raise ValueError(f"need two equal non-empty 1-D sequences, got {conf.shape} and {corr.shape}")
    if (conf < 0).any() or (conf > 1).any():
        raise ValueError("confidence must lie in [0, 1]")
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece, mce, bins = 0.0, 0.0, []
    for b in range(n_bins):
        mask = idx == b
        n = int(mask.sum())
        row = {"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": n, "accuracy": None, "confidence": None}
        if n:
            acc, cf = float(corr[mask].mean()), float(conf[mask].mean())
            gap = abs(acc - cf)
            ece += n / conf.size * gap
            mce = max(mce, gap)
            row.update(accuracy=acc, confidence=cf)
        bins.append(row)
    return {"ece": ece, "mce": mce, "brier": float(np.mean((conf - corr) ** 2)), "n": int(conf.size),
            "n_bins": n_bins, "bins": bins}


def multiclass_brier(probabilities: Sequence[Sequence[float]], targets: Sequence[int]) -> float:
    """``mean_i sum_k (p_ik - [k == t_i])^2`` (0 best, 2 worst); rows may differ in length."""
    if not targets:
        raise ValueError("multiclass_brier needs at least one item")
    total = 0.0
    for p, t in zip(probabilities, targets, strict=True):
        onehot = np.zeros(len(p))
        onehot[t] = 1.0
        total += float(((np.asarray(p, dtype=np.float64) - onehot) ** 2).sum())
    return total / len(targets)


# -- overlap of two models ----------------------------------------------------------------------


def contingency(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """2x2 table of per-item correctness: ``n11`` both right, ``n10`` only a, ``n01`` only b, ``n00``."""
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two equal 1-D sequences, got {x.shape} and {y.shape}")
    return {"n11": int((x & y).sum()), "n10": int((x & ~y).sum()), "n01": int((~x & y).sum()),
            "n00": int((~x & ~y).sum())}


def mcnemar_exact(n10: int, n01: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts."""
    n = n10 + n01
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(n10, n01), n, 0.5)))


def phi_coefficient(table: dict) -> float:
    """Phi (Matthews) correlation of the 2x2 table; NaN when a row or column total is 0."""
    n11, n10, n01, n00 = table["n11"], table["n10"], table["n01"], table["n00"]
    denom = (n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)
    if denom == 0:
        return math.nan
    return (n11 * n00 - n10 * n01) / math.sqrt(denom)


def gain_split(table: dict) -> dict:
    """Old (a) → new (b): ``more`` = n01, ``different`` = n10, ``net`` = more - different, as counts
    and as shares of all items."""
    n = sum(table[k] for k in ("n11", "n10", "n01", "n00"))
    more, diff = table["n01"], table["n10"]
    return {"more": more, "different": diff, "net": more - diff, "more_share": more / n if n else 0.0,
            "different_share": diff / n if n else 0.0, "net_share": (more - diff) / n if n else 0.0}


# -- representations ----------------------------------------------------------------------------


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of ``x`` (n, p) and ``y`` (n, q), rows = the same n items; float64 throughout."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"need (n, p) and (n, q) with the same n >= 2, got {x.shape} and {y.shape}")
    x = x - x.mean(axis=0, keepdims=True)
    y = y - y.mean(axis=0, keepdims=True)
    cross = np.linalg.norm(y.T @ x) ** 2
    denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if denom == 0:
        return math.nan  # a constant representation has no similarity structure
    return float(cross / denom)


# -- uncertainty ----------------------------------------------------------------------------------

N_BOOTSTRAP = 2000  # percentile-interval error ~ 1/sqrt(2000 * 0.025) ≈ 0.14 of the tail mass: stable to ~0.005
BOOTSTRAP_SEED = 0


def chance_accuracy(records: Sequence[dict]) -> float | None:
    """Mean over items of 1 / (number of options); None when any item is an open answer."""
    if not records:
        raise ValueError("chance_accuracy needs at least one record")
    shares = []
    for r in records:
        if r["task"] == "open":
            return None
        k = len(r.get("option_probs") or {}) or (2 if r["task"] == "yesno" else 0)
        if not k:
            raise ValueError(f"record {r.get('id')}: a {r['task']} record without option_probs")
        shares.append(1.0 / k)
    return float(np.mean(shares))


def bootstrap_ci(values: Sequence[float], *, n_boot: int = N_BOOTSTRAP, alpha: float = 0.05,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap ``(lo, hi)`` of the mean of ``values`` (per-item scores)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence, got shape {x.shape}")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], *, n_boot: int = N_BOOTSTRAP,
                          alpha: float = 0.05, seed: int = BOOTSTRAP_SEED) -> dict:
    """``mean(b) - mean(a)`` over the same items and its percentile bootstrap interval (items resampled jointly)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"need two equal non-empty 1-D sequences, got {x.shape} and {y.shape}")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    diffs = y[idx].mean(axis=1) - x[idx].mean(axis=1)
    return {"diff": float(y.mean() - x.mean()), "lo": float(np.quantile(diffs, alpha / 2)),
            "hi": float(np.quantile(diffs, 1 - alpha / 2))}


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact binomial interval of k successes in n trials; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def discordant_split(n10: int, n01: int, alpha: float = 0.05) -> dict:
    """Share of the discordant items solved by the new model (``n01 / (n10 + n01)``) and its exact interval."""
    n = n10 + n01
    lo, hi = clopper_pearson(n01, n, alpha)
    return {"n_discordant": n, "new_share": n01 / n if n else None, "lo": lo, "hi": hi,
            "mcnemar_p": mcnemar_exact(n10, n01)}


def answer_warnings(records: Sequence[dict], ci: tuple[float, float], chance: float | None) -> list[str]:
    """Warnings for one model on one task: constant answers; accuracy interval containing chance."""
    out = []
    preds = [str(r.get("prediction", "")).strip() for r in records]
    if len(preds) > 1 and len({p.lower() for p in preds}) == 1:
        out.append(f"constant answer {preds[0]!r} on all {len(preds)} items")
    if chance is not None and ci[0] <= chance <= ci[1]:
        out.append(f"accuracy 95% CI [{ci[0]:.3f}, {ci[1]:.3f}] contains chance {chance:.3f}")
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for one value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else None
