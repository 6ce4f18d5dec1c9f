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
