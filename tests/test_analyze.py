"""barnfast.evaluation.analyze on a finished -tiny sweep: every section with real numbers, figures, analysis.json."""

import json

import numpy as np
import pytest

from barnfast.evaluation import analyze, scores
from tests.test_sweep import BACKBONES, finished_sweep


def _records(out, b):
    return [json.loads(x) for t in ("open", "mc", "yesno")
            for x in (out / b / "eval" / f"eval_{t}.jsonl").read_text().splitlines()]


def test_report_has_every_section_numbers_and_figures():
    out, _ = finished_sweep()
    assert analyze.main([str(out)]) == 0
    report = (out / "report.md").read_text()
    for heading in ("## Headline", "## 1. Accuracy", "### Per category (perception vs reasoning)",
                    "### POPE metrics", "## 2. Overlap", "## 3. Calibration", "## 4. Representation stability"):
        assert heading in report
    assert report.count("How computed:") >= 7
    result = json.loads((out / "analysis.json").read_text())
    for name in ("accuracy.png", "overlap_upset.png", "reliability.png", "cka_stability.png"):
        path = out / "figures" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert f"figures/{name}" in report
    for b in BACKBONES:
        recs = _records(out, b)
        acc = result["accuracy"][b]
        assert acc["overall"] == pytest.approx(np.mean([r["correct"] for r in recs]))
        assert f"| {b} | {acc['overall']:.3f} |" in report
        closed = [r for r in recs if r["task"] != "open"]
        cal = scores.calibration([r["confidence"] for r in closed], [r["correct"] for r in closed])
        assert result["calibration"][b]["closed"]["ece"] == pytest.approx(cal["ece"])
        assert len(result["stability"][b]["cka"]["noise"]) >= 2
    (pair,) = result["overlap"]
    assert (pair["old"], pair["new"]) == BACKBONES
    t = pair["table"]
    assert sum(t.values()) == result["n_common_items"] == 24
    a = {(r["task"], r["id"]): r["correct"] for r in _records(out, BACKBONES[0])}
    b = {(r["task"], r["id"]): r["correct"] for r in _records(out, BACKBONES[1])}
    assert t["n01"] == sum(b[k] and not a[k] for k in a) and t["n10"] == sum(a[k] and not b[k] for k in a)
    assert pair["mcnemar_p"] == pytest.approx(scores.mcnemar_exact(t["n10"], t["n01"]))
    assert pair["gain"]["net"] == t["n01"] - t["n10"]
    assert sum(u["count"] for u in result["upset"]) == 24


def test_report_proves_control_first_and_gives_intervals_chance_and_training_side():
    out, _ = finished_sweep()
    assert analyze.main([str(out)]) == 0
    report = (out / "report.md").read_text()
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections[0].startswith("## 0. Control") and "**controlled: yes**" in report
    control = json.loads((out / "control.json").read_text())
    manifests = [control["runs"][b]["manifests"]["stage2"]["sha256"] for b in BACKBONES]
    assert manifests[0] == manifests[1] and manifests[0][:12] in report
    result = json.loads((out / "analysis.json").read_text())
    assert set(result["statistics"]) == {"eval_open", "eval_mc", "eval_yesno"}  # every file found
    yn = result["statistics"]["eval_yesno"]
    assert yn["chance"] == 0.5 and yn["n"] == 8
    for b in BACKBONES:
        recs = [r for r in _records(out, b) if r["task"] == "yesno"]
        m = yn["models"][b]
        assert m["accuracy"] == pytest.approx(np.mean([r["correct"] for r in recs]))
        assert m["ci"] == pytest.approx(scores.bootstrap_ci([float(r["correct"]) for r in recs]))
        constant = len({r["prediction"] for r in recs}) == 1
        assert constant == any("constant answer" in w for w in m["warnings"])
        assert "### eval_yesno (n=8, chance 0.500)" in report
    assert "One seed only" in report and result["seeds"] is None
    for b in BACKBONES:
        tr = result["training"][b]
        rows = [json.loads(x) for x in (out / b / "metrics.jsonl").read_text().splitlines()]
        s2 = [r for r in rows if r["stage"] == "stage2"]
        assert tr["stages"]["stage2"]["steps"] == len(s2) == 2
        assert tr["stages"]["stage2"]["bpb_last"] == pytest.approx(
            s2[-1]["loss"] * s2[-1]["target_tokens"] / (np.log(2) * s2[-1]["target_bytes"]))
        assert tr["variant"] == "base"
    assert (out / "figures" / "training_bpb.png").read_bytes()[:4] == b"\x89PNG"
