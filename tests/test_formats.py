"""Benchmark files in their official release layouts, written by hand here (a few items each), read by
barnfast.evaluation.formats, and their benchmark-specific scores (MME acc+, MMBench circular, TextVQA)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from barnfast.evaluation import formats, scores
from barnfast.evaluation.formats import benchmark_scores, load_items


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _b64_png(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_gqa_testdev_balanced_questions(tmp_path):
    qs = {"20968409": {"question": "Is the sky blue?", "answer": "yes", "imageId": "n161313", "fullAnswer": "Yes.",
                       "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
          "201640614": {"question": "What colour is the car?", "answer": "red", "imageId": "n57423",
                        "types": {"structural": "query", "semantic": "attr", "detailed": "colour"}}}
    f = tmp_path / "testdev_balanced_questions.json"
    f.write_text(json.dumps(qs))
    items = load_items(f, image_root=tmp_path / "images")  # auto-detected
    assert [(i.id, i.task, i.category, i.answer) for i in items] == [("20968409", "open", "verify", "yes"),
                                                                     ("201640614", "open", "query", "red")]
    assert items[0].image == tmp_path / "images" / "n161313.jpg"
    assert items[1].prompt == f"What colour is the car?\n{formats.SHORT_ANSWER}"


def test_textvqa_val_json_and_vqa_accuracy(tmp_path):
    doc = {"dataset_name": "textvqa", "dataset_version": "0.5.1", "dataset_type": "val", "data": [
        {"question_id": 34602, "question": "what is the brand?", "image_id": "003a8ae2ef43b901", "image_classes": [],
         "answers": ["Nokia"] * 3 + ["nokia."] * 2 + ["toshiba"] * 5}]}
    f = tmp_path / "TextVQA_0.5.1_val.json"
    f.write_text(json.dumps(doc))
    (item,) = load_items(f, image_root=tmp_path / "train_images")
    assert item.task == "open" and len(item.answers) == 10 and item.answer == "toshiba"
    assert item.image == tmp_path / "train_images" / "003a8ae2ef43b901.jpg"
    # The official normalisation makes "Nokia" and "nokia." one answer: 5 matches of 10 → accuracy 1.
    assert scores.vqa_accuracy("NOKIA", item.answers) == 1.0
    rec = {"id": "34602", "task": "open", "category": "textvqa", "correct": False, "prediction": "NOKIA",
           "vqa_accuracy": scores.vqa_accuracy("NOKIA", item.answers)}
    assert benchmark_scores("textvqa", [rec])["vqa_accuracy"] == 1.0


def _mme_release(root: Path) -> Path:
    # Two layouts of the release: files side by side (existence), images/ + questions_answers_YN/ (artwork).
    for stem in ("000000006040", "000000044279"):
        _png(root / "existence" / f"{stem}.jpg")
        (root / "existence" / f"{stem}.txt").write_text(
            "Is there a train in this image? Please answer yes or no.\tYes\n"
            "Is there a bed in this image? Please answer yes or no.\tNo\n")
    _png(root / "artwork" / "images" / "10002.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Rubens? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet? Please answer yes or no.\tNo\n")
    return root


def test_mme_release_folder_and_acc_plus(tmp_path):
    root = _mme_release(tmp_path / "MME_Benchmark_release_version")
    items = load_items(root)  # a folder without questions/ is MME
    assert len(items) == 6 and {i.task for i in items} == {"yesno"}
    assert {i.category for i in items} == {"existence", "artwork"}
    art = [i for i in items if i.category == "artwork"]
    assert art[0].image == root / "artwork" / "images" / "10002.jpg" and [i.answer for i in art] == ["yes", "no"]
    # existence: image 1 both right, image 2 one right → acc 3/4, acc+ 1/2, score 125; artwork: both wrong.
    right = {"existence/000000006040/0", "existence/000000006040/1", "existence/000000044279/0"}
    recs = [{"id": i.id, "category": i.category, "correct": i.id in right} for i in items]
    s = benchmark_scores("mme", recs)
    assert s["subtasks"]["existence"] == pytest.approx({"acc": 0.75, "acc_plus": 0.5, "score": 125.0})
    assert s["subtasks"]["artwork"] == {"acc": 0.0, "acc_plus": 0.0, "score": 0.0}
    assert s["perception"] == pytest.approx(125.0) and s["cognition"] == 0


def test_mmbench_tsv_base64_images_and_circular_evaluation(tmp_path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split"]
    rows = [[0, "Which colour is shown?", "nan", "red", "green", "blue", "nan", "A", "color", _b64_png((255, 0, 0)),
             "perception", "dev"],
            [1, "How many squares?", "A toy.", "one", "two", "nan", "nan", "B", "count", _b64_png((0, 0, 255)),
             "perception", "dev"]]
    f = tmp_path / "MMBench_DEV_EN.tsv"
    f.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
    items = load_items(f, image_root=tmp_path / "imgs")
    # 3 + 2 rotations; the answer letter follows its text.
    assert [i.id for i in items] == ["0@0", "0@1", "0@2", "1@0", "1@1"]
    assert [(i.options[i.answer]) for i in items] == ["red"] * 3 + ["two"] * 2
    assert items[1].options == {"A": "green", "B": "blue", "C": "red"} and items[1].answer == "C"
    assert items[3].prompt.startswith("A toy.\nHow many squares?\nA. one\nB. two\n")
    assert items[3].question == "A toy.\nHow many squares?" and items[0].question == "Which colour is shown?"
    with Image.open(items[0].image) as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)
    # Question 0 right in every rotation, question 1 right only in the first: circular 1/2, first-rotation 1.
    recs = [{"id": i.id, "category": i.category, "correct": i.id != "1@1"} for i in items]
    s = benchmark_scores("mmbench", recs)
    assert s["circular_accuracy"] == 0.5 and s["first_rotation_accuracy"] == 1.0 and s["n_questions"] == 2
    assert s["circular_accuracy_by_category"] == {"color": 1.0, "count": 0.0}


def test_seed_bench_json_image_questions_only(tmp_path):
    doc = {"question_type": {"Scene Understanding": 1, "Instance Counting": 4},
           "questions": [
               {"answer": "B", "choice_a": "one", "choice_b": "two", "choice_c": "three", "choice_d": "four",
                "data_id": "1454426_2591111986", "data_type": "image", "question": "How many cats?",
                "question_id": "101669", "question_type_id": 4},
               {"answer": "A", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w",
                "data_id": "v1.mp4", "data_type": "video", "question": "?", "question_id": "9", "question_type_id": 1}]}
    f = tmp_path / "SEED-Bench.json"
    f.write_text(json.dumps(doc))
    (item,) = load_items(f, image_root=tmp_path / "SEED-Bench-image")
    assert (item.id, item.task, item.category, item.answer) == ("101669", "mc", "Instance Counting", "B")
    assert item.options == {"A": "one", "B": "two", "C": "three", "D": "four"}
    assert item.question == "How many cats?"  # what SEED-Bench's answer ranking asks (--option-scoring rank)
    assert item.image == tmp_path / "SEED-Bench-image" / "1454426_2591111986"


def test_ai2d_release_folder_with_test_ids(tmp_path):
    root = tmp_path / "ai2d"
    for n in (0, 1):
        _png(root / "images" / f"{n}.png")
        (root / "questions").mkdir(parents=True, exist_ok=True)
        (root / "questions" / f"{n}.png.json").write_text(json.dumps({"imageName": f"{n}.png", "questions": {
            f"Which stage comes after the egg ({n})?": {"abcLabel": False, "answerTexts": ["larva", "pupa", "adult",
                                                                                            "egg"],
                                                       "correctAnswer": 0, "questionId": f"{n}.png-0"}}}))
    (root / "ai2d_test_ids.csv").write_text("1\n")
    (item,) = load_items(root)  # a folder with questions/ is AI2D; only test id 1
    assert (item.id, item.task, item.answer, item.options["A"]) == ("1.png-0", "mc", "A", "larva")
    assert item.image == root / "images" / "1.png" and item.question == "Which stage comes after the egg (1)?"


def test_pope_and_scienceqa_layouts_are_still_detected(tmp_path):
    pope = tmp_path / "coco_pope_adversarial.json"
    pope.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "no"}) + "\n")
    (item,) = load_items(pope)
    assert (item.task, item.category, item.answer) == ("yesno", "adversarial", "no")
    recs = [{"prediction": "yes", "answer": "no", "correct": False, "category": "adversarial", "id": "1"}]
    assert benchmark_scores("pope", recs)["pope"]["yes_ratio"] == 1.0
