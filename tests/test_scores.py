"""barnfast.evaluation.scores against hand-computed cases."""

import math

import numpy as np
import pytest

from barnfast.evaluation import scores


def test_normalize_answer_vqa_rules():
    assert scores.normalize_answer(" Two  Circles.") == "2 circles"
    assert scores.normalize_answer("The centre!") == "centre"
    assert scores.normalize_answer("isnt it") == "isn't it"
    assert scores.normalize_answer("1,000") == "1000"
    assert scores.exact_match("Two", ["2"]) and not scores.exact_match("three", ["2", "two"])


def test_vqa_accuracy_hand_cases():
    # 10 annotators, 2 say "red": each annotator's subset of 9 holds 2 "red" (8 of them) or 1 (the 2
    # who said it) → (8 * 2/3 + 2 * 1/3) / 10 = 0.6.
    answers = ["red"] * 2 + ["blue"] * 8
    assert scores.vqa_accuracy("Red", answers) == pytest.approx(0.6)
    # 3 say it: 7 subsets hold 3 (→1), 3 hold 2 (→2/3): (7 + 2) / 10 = 0.9.
    assert scores.vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert scores.vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert scores.vqa_accuracy("green", answers) == 0.0
    assert scores.vqa_accuracy("two", ["2"]) == 1.0


def test_pope_metrics_hand_case():
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    preds = ["yes", "yes", "no", "yes", "no", "No"]
    m = scores.pope_metrics(preds, labels)
    # tp=2 fp=1 fn=1 tn=2 → precision 2/3, recall 2/3, F1 2/3, accuracy 4/6, yes-ratio 3/6
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(4 / 6)
    assert m["yes_ratio"] == pytest.approx(0.5)
    m = scores.pope_metrics(["yes", "yes", "yes", "yes"], ["yes", "no", "no", "no"])
    # precision 1/4, recall 1 → F1 = 2 * 0.25 / 1.25 = 0.4
    assert m["f1"] == pytest.approx(0.4) and m["yes_ratio"] == 1.0


def test_calibration_ece_mce_brier_hand_case():
    conf = [0.9, 0.9, 0.55, 0.3]
    correct = [1, 0, 1, 0]
    c = scores.calibration(conf, correct, n_bins=15)
    # bins: {0.9, 0.9} acc .5 gap .4 weight 1/2; {0.55} acc 1 gap .45 weight 1/4; {0.3} gap .3 weight 1/4
    assert c["ece"] == pytest.approx(0.5 * 0.4 + 0.25 * 0.45 + 0.25 * 0.3)
    assert c["mce"] == pytest.approx(0.45)
    assert c["brier"] == pytest.approx((0.01 + 0.81 + 0.2025 + 0.09) / 4)
    assert sum(b["count"] for b in c["bins"]) == 4 and len(c["bins"]) == 15
    assert c["bins"][13]["count"] == 2 and c["bins"][13]["accuracy"] == 0.5
    perfect = scores.calibration([1.0, 1.0, 0.0], [1, 1, 0])
    assert perfect["ece"] == pytest.approx(0.0) and perfect["brier"] == 0.0
    with pytest.raises(ValueError):
        scores.calibration([1.2], [1])


def test_multiclass_brier():
    assert scores.multiclass_brier([[0.5, 0.5], [1.0, 0.0, 0.0]], [0, 1]) == pytest.approx((0.5 + 2.0) / 2)


def test_contingency_mcnemar_phi_gain():
    a = [1] * 5 + [1] * 1 + [0] * 9 + [0] * 5  # n11=5, n10=1, n01=9, n00=5
    b = [1] * 5 + [0] * 1 + [1] * 9 + [0] * 5
    t = scores.contingency(a, b)
    assert t == {"n11": 5, "n10": 1, "n01": 9, "n00": 5}
    # exact: 2 * P(X <= 1 | n=10, 1/2) = 2 * 11 / 1024
    assert scores.mcnemar_exact(t["n10"], t["n01"]) == pytest.approx(22 / 1024)
    assert scores.mcnemar_exact(0, 0) == 1.0 and scores.mcnemar_exact(3, 3) == 1.0
    # phi = (5*5 - 1*9) / sqrt(6 * 14 * 14 * 6) = 16 / 84
    assert scores.phi_coefficient(t) == pytest.approx(16 / 84)
    assert scores.phi_coefficient(scores.contingency([1, 0, 1], [1, 0, 1])) == pytest.approx(1.0)
    assert math.isnan(scores.phi_coefficient(scores.contingency([1, 1], [1, 0])))
    g = scores.gain_split(t)
    assert (g["more"], g["different"], g["net"]) == (9, 1, 8) and g["net_share"] == pytest.approx(8 / 20)


def test_linear_cka_identical_invariant_and_independent():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16))
    assert scores.linear_cka(x, x) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    assert scores.linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0)  # rotation, scale, shift
    # Independent (n, 5) Gaussians: E[CKA] ~ q / n = 0.0025 for n=2000.
    big = rng.standard_normal((2000, 5))
    other = rng.standard_normal((2000, 5))
    assert scores.linear_cka(big, other) < 0.02
    # One feature each: linear CKA is the squared Pearson correlation. x=(1,2,3,4), y=(1,3,2,4): r = 0.8.
    assert scores.linear_cka(np.array([[1.0], [2], [3], [4]]), np.array([[1.0], [3], [2], [4]])) == \
        pytest.approx(0.64)
    assert math.isnan(scores.linear_cka(np.ones((4, 2)), x[:4]))


def test_chance_accuracy_from_option_counts():
    recs = [{"task": "mc", "option_probs": {"A": 0.5, "B": 0.3, "C": 0.1, "D": 0.1}},
            {"task": "yesno", "option_probs": {"yes": 0.9, "no": 0.1}}]
    assert scores.chance_accuracy(recs) == pytest.approx((0.25 + 0.5) / 2)
    assert scores.chance_accuracy([{"task": "open", "option_probs": None}]) is None


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small = rng.random(40) < 0.6
    big = rng.random(4000) < 0.6
    lo, hi = scores.bootstrap_ci(small)
    assert lo <= small.mean() <= hi
    blo, bhi = scores.bootstrap_ci(big)
    # Normal approximation: half-width ≈ 1.96 · sqrt(p(1-p)/n) = 0.0152 at n=4000, p=0.6.
    assert (bhi - blo) / 2 == pytest.approx(1.96 * math.sqrt(0.24 / 4000), rel=0.15)
    assert bhi - blo < hi - lo
    assert scores.bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_paired_bootstrap_diff_uses_the_pairing():
    # b = a shifted: every item b solves, a solves too, plus 10 more: the paired interval excludes 0.
    a = np.array([1] * 50 + [0] * 50, dtype=float)
    b = a.copy()
    b[50:60] = 1
    d = scores.paired_bootstrap_diff(a, b)
    assert d["diff"] == pytest.approx(0.1) and 0 < d["lo"] <= 0.1 <= d["hi"]
    same = scores.paired_bootstrap_diff(a, a)
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)


def test_clopper_pearson_and_discordant_split_hand_cases():
    # k=0 of n=10: upper bound 1 - 0.025^(1/10) = 0.3085 (the exact formula at the edge).
    lo, hi = scores.clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** 0.1)
    lo, hi = scores.clopper_pearson(5, 10)
    assert lo == pytest.approx(0.187086, abs=1e-5) and hi == pytest.approx(0.812914, abs=1e-5)
    s = scores.discordant_split(n10=1, n01=9)
    assert s["new_share"] == pytest.approx(0.9) and s["n_discordant"] == 10
    assert s["lo"] > 0.5 and s["mcnemar_p"] == pytest.approx(22 / 1024)  # the new model solves more of them
    assert scores.discordant_split(0, 0)["new_share"] is None


def test_answer_warnings_constant_and_chance():
    recs = [{"prediction": "A"}] * 6
    w = scores.answer_warnings(recs, (0.1, 0.5), 0.25)
    assert any("constant answer 'A'" in x for x in w) and any("contains chance 0.250" in x for x in w)
    assert scores.answer_warnings([{"prediction": "A"}, {"prediction": "B"}], (0.6, 0.9), 0.25) == []


def test_mean_std_over_seeds():
    assert scores.mean_std([0.5, 0.7, 0.6]) == (pytest.approx(0.6), pytest.approx(0.1))
    assert scores.mean_std([0.5]) == (0.5, None)
