"""The built-in synthetic dataset: determinism, layout, fields, and answers true to the drawn images."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from barnfast.data import synthetic
from barnfast.data.llava import load_llava_json, validate_sample
from barnfast.data.synthetic import (
    ANSWER_VARIANTS,
    CATEGORIES,
    COLOURS,
    DESCRIBE_PROMPTS,
    SHAPES,
    answer_of,
    ensure_synthetic,
    generate,
)

ARGS = dict(num_stage1=24, num_stage2=60, num_eval=22, image_size=64, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, **ARGS)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _eval_records(root: Path) -> dict[str, list[dict]]:
    return {task: _jsonl(root / f"eval_{task}.jsonl") for task in ("open", "mc", "yesno")}


def test_deterministic_bytes(dataset, tmp_path):
    generate(tmp_path / "again", **ARGS)
    assert _files(dataset) == _files(tmp_path / "again")
    generate(tmp_path / "other", **{**ARGS, "seed": 4})
    other = _files(tmp_path / "other")
    ours = _files(dataset)
    assert all(other[f] != ours[f] for f in ("stage1.json", "stage2.json", "eval_open.jsonl"))
    assert other["images/s1_00000.png"] != ours["images/s1_00000.png"]


def test_item_independent_of_other_split_sizes(dataset, tmp_path):
    generate(tmp_path / "bigger", **{**ARGS, "num_stage1": 30, "num_eval": 5})
    assert (tmp_path / "bigger/images/s2_00007.png").read_bytes() == (dataset / "images/s2_00007.png").read_bytes()
    assert (tmp_path / "bigger/stage2.json").read_bytes() == (dataset / "stage2.json").read_bytes()


def test_counts_and_manifest(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["args"] == ARGS
    stage1, stage2 = load_llava_json(dataset / "stage1.json"), load_llava_json(dataset / "stage2.json")
    evals = _eval_records(dataset)
    assert len(stage1) == 24 and len(stage2) == 60 and all(len(r) == 22 for r in evals.values())
    assert manifest["counts"] == {
        "stage1": 24,
        "stage2": 60,
        "eval_open": 22,
        "eval_mc": 22,
        "eval_yesno": 22,
        "stage2_text_only": sum(not s.images for s in stage2),
    }
    for path in manifest["files"].values():
        assert (dataset / path).exists()
    # Every referenced image exists, is a 64x64 RGB PNG, and no PNG is unreferenced.
    referenced = {p for s in stage1 + stage2 for p in s.images} | {r["image"] for rs in evals.values() for r in rs}
    assert referenced == {str(p.relative_to(dataset)) for p in (dataset / "images").glob("*.png")}
    with PIL.Image.open(dataset / next(iter(sorted(referenced)))) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)


def test_stage1_captions(dataset):
    samples = load_llava_json(dataset / "stage1.json")
    for s in samples:
        validate_sample(s)
        human, gpt = s.conversations
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and len(s.images) == 1
        assert gpt["from"] == "gpt" and gpt["value"].endswith(".")
        assert any(c in gpt["value"] for c in COLOURS) and any(sh in gpt["value"] for sh in SHAPES)
    assert len({s.conversations[0]["value"] for s in samples}) > 1  # prompts vary


def test_stage2_instructions(dataset):
    samples = load_llava_json(dataset / "stage2.json")
    for s in samples:
        validate_sample(s)  # roles alternate from human, placeholder count == number of images
        roles = [t["from"] for t in s.conversations]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        described = s.conversations[0]["value"].replace("<image>", "").strip() in DESCRIBE_PROMPTS
        if described:  # a description sample: one turn, answered by a caption
            assert len(roles) == 2 and s.conversations[1]["value"].endswith(".")
        else:
            assert all(len(t["value"]) < 30 for t in s.conversations if t["from"] == "gpt")  # short answers
    with_image = [s for s in samples if s.images]
    text_only = [s for s in samples if not s.images]
    assert text_only and all("<image>" not in t["value"] for s in text_only for t in s.conversations)
    first = [s.conversations[0]["value"] for s in with_image]
    assert (
        any(v.endswith("\n<image>") for v in first) and sum(v.startswith("<image>\n") for v in first) > len(first) // 2
    )
    assert any(len(s.conversations) > 2 for s in with_image)
    answers = Counter(t["value"] for s in samples for t in s.conversations if t["from"] == "gpt")
    assert {"yes", "no"} & answers.keys() and {"A", "B", "C", "D"} & answers.keys()
    descriptions = [s for s in with_image if s.conversations[0]["value"].replace("<image>", "").strip()
                    in DESCRIBE_PROMPTS]
    assert 0 < len(descriptions) < len(with_image)


def test_eval_fields(dataset):
    evals = _eval_records(dataset)
    for task, records in evals.items():
        assert len({r["question_id"] for r in records}) == len(records)
        for r in records:
            assert r["task"] == task and r["category"] in CATEGORIES
            assert r["question"] and r["prompt"].startswith(r["question"]) and (dataset / r["image"]).exists()
        counts = Counter(r["category"] for r in records)
        assert set(counts) == set(CATEGORIES) and max(counts.values()) - min(counts.values()) <= 1
    for r in evals["open"]:
        assert len(r["answers"]) == 10 and set(r["answers"]) <= set(ANSWER_VARIANTS[r["answer"]])
        assert Counter(r["answers"]).most_common(1)[0][0] == r["answer"]
    assert any(len(set(r["answers"])) > 1 for r in evals["open"])  # annotators vary
    for r in evals["mc"]:
        assert list(r["options"]) == ["A", "B", "C", "D"] and len(set(r["options"].values())) == 4
        assert r["answer"] in r["options"] and r["prompt"].endswith("directly.")
    assert len({r["answer"] for r in evals["mc"]}) > 1


def test_yesno_balanced(dataset):
    records = _eval_records(dataset)["yesno"]
    answers = Counter(r["answer"] for r in records)
    assert set(answers) == {"yes", "no"} and abs(answers["yes"] - answers["no"]) <= 1
    for category in CATEGORIES:
        per = Counter(r["answer"] for r in records if r["category"] == category)
        assert abs(per["yes"] - per["no"]) <= 1, (category, per)
    # Balance is not tied to the index order.
    assert [r["answer"] for r in records] != ["yes", "no"] * (len(records) // 2)


def test_answers_consistent_with_attributes(dataset):
    evals = _eval_records(dataset)
    for r in evals["open"]:
        assert r["answer"] == answer_of(r["attributes"], r["category"])
    for r in evals["mc"]:
        assert r["options"][r["answer"]] == answer_of(r["attributes"], r["category"])
    for r in evals["yesno"]:
        truth = answer_of(r["attributes"], r["category"])
        q = r["question"]
        mentioned = truth in q.split() or truth in q or (r["category"] == "count" and _count_word(truth) in q.split())
        assert mentioned == (r["answer"] == "yes"), (q, r["attributes"], r["answer"])


def _count_word(digit: str) -> str:
    return {"1": "one", "2": "two", "3": "three", "4": "four"}[digit]


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    seen = np.zeros_like(mask)
    comps = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, comp = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            comp.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(comp)
    return comps


def test_images_show_the_attributes(dataset):
    """Count, colour and position read back from the pixels equal the recorded attributes."""
    records = [r for rs in _eval_records(dataset).values() for r in rs]
    for r in records:
        attrs = r["attributes"]
        arr = np.asarray(PIL.Image.open(dataset / r["image"]).convert("RGB")).astype(int)
        background = arr[0, 0]
        mask = np.abs(arr - background).sum(-1) > 60
        comps = _components(mask)
        assert len(comps) == attrs["count"], (r["image"], attrs, len(comps))
        fill = arr[mask].mean(0)
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - fill).sum())
        assert nearest == attrs["colour"], (r["image"], attrs, fill)
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / 64, ys.mean() / 64
        where = {"left": cx < 0.3, "right": cx > 0.7, "top": cy < 0.3, "bottom": cy > 0.7}
        where["centre"] = 0.3 < cx < 0.7 and 0.3 < cy < 0.7
        assert [k for k, v in where.items() if v] == [attrs["position"]], (r["image"], attrs, cx, cy)
        # one object per cell of the patch lattice, centred in it (what the 4 x 4-patch tiny towers see whole)
        cell = 64 / synthetic.GRID
        for comp in comps:
            ys, xs = np.array([p[0] for p in comp]), np.array([p[1] for p in comp])
            for centre in ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2):
                offset = abs(centre / cell - (math.floor(centre / cell) + 0.5)) * cell
                # bbox centre: a triangle's is 0.25 r off its centroid, hence the 0.3 r allowance
                assert offset <= (0.3 * synthetic.RADIUS + synthetic.JITTER) * 64 + 1.0, (r["image"], centre, offset)
        assert len({(int(np.mean([p[1] for p in c]) // cell), int(np.mean([p[0] for p in c]) // cell))
                    for c in comps}) == len(comps)


def test_eval_images_disjoint_from_training(dataset):
    train = {s_img for f in ("stage1.json", "stage2.json") for s in load_llava_json(dataset / f) for s_img in s.images}
    evals = [r["image"] for rs in _eval_records(dataset).values() for r in rs]
    assert len(set(evals)) == len(evals) and not train & set(evals)
    train_bytes = {(dataset / p).read_bytes() for p in train}
    assert not train_bytes & {(dataset / p).read_bytes() for p in evals}


def test_ensure_synthetic_idempotent(tmp_path):
    small = dict(num_stage1=3, num_stage2=3, num_eval=2, image_size=32, seed=0)
    first = ensure_synthetic(tmp_path, **small)
    stamp = (tmp_path / "stage1.json").stat().st_mtime_ns
    (tmp_path / "images/s1_00000.png").write_bytes(b"sentinel: not regenerated")
    assert ensure_synthetic(tmp_path, **small) == first
    assert (tmp_path / "stage1.json").stat().st_mtime_ns == stamp
    assert (tmp_path / "images/s1_00000.png").read_bytes() == b"sentinel: not regenerated"
    # Different arguments (or a missing data file) → generated again.
    second = ensure_synthetic(tmp_path, **{**small, "num_stage1": 4})
    assert second["counts"]["stage1"] == 4 and (tmp_path / "images/s1_00000.png").read_bytes().startswith(b"\x89PNG")
    (tmp_path / "eval_mc.jsonl").unlink()
    assert ensure_synthetic(tmp_path, **{**small, "num_stage1": 4})["counts"] == second["counts"]
    assert (tmp_path / "eval_mc.jsonl").exists()
    with pytest.raises(TypeError, match="num_stages"):
        ensure_synthetic(tmp_path, num_stages=3)
    with pytest.raises(ValueError, match="num_eval"):
        generate(tmp_path, num_eval=-1)


def test_cli(tmp_path, dataset):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "barnfast.data.synthetic", "--out", str(out)]
    cmd += ["--num-stage1", "24", "--num-stage2", "60", "--num-eval", "22", "--image-size", "64", "--seed", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["counts"]["stage2"] == 60
    assert "RuntimeWarning" not in proc.stderr
    assert _files(out) == _files(dataset)
