"""bench/demo_comparison compares like with like: the text and image files ask the same questions with the
same answers about the same scenes, and differ only in how the scene is given."""

import json

import PIL.Image

from bench.demo_comparison import write_held_out, write_stage2


def test_text_and_image_files_hold_the_same_questions_and_answers(tmp_path):
    text = json.loads(write_stage2(tmp_path, "text", 40).read_text())
    image = json.loads(write_stage2(tmp_path, "image", 40).read_text())
    assert len(text) == len(image) == 40
    answers = []
    for t, i in zip(text, image):
        (t_h, t_g), (i_h, i_g) = t["conversations"], i["conversations"]
        sentence, question = t_h["value"].split("\n", 1)
        assert "image" not in t and "<image>" not in t_h["value"]
        assert i_h["value"] == f"<image>\n{question}" and t_g == i_g
        assert question.startswith("Are the shapes in the image ")  # colour yes/no
        colour = question.split("?")[0].split()[-1]
        assert (f" {colour} " in f" {sentence.lower()} ") == (t_g["value"] == "yes"), (sentence, question, t_g)
        assert PIL.Image.open(tmp_path / i["image"]).size == (64, 64)
        answers.append(t_g["value"])
    assert {"yes", "no"} == set(answers) and 10 <= answers.count("yes") <= 30


def test_both_gives_the_image_always_and_the_sentence_in_about_half(tmp_path):
    image = json.loads(write_stage2(tmp_path, "image", 60).read_text())
    both = json.loads(write_stage2(tmp_path, "both", 60).read_text())
    with_sentence = 0
    for i, b in zip(image, both):
        (i_h, i_g), (b_h, b_g) = i["conversations"], b["conversations"]
        assert b["image"] == i["image"] and b_g == i_g
        assert b_h["value"].startswith("<image>\n") and b_h["value"].endswith(i_h["value"].removeprefix("<image>\n"))
        with_sentence += b_h["value"] != i_h["value"]
    assert 15 <= with_sentence <= 45


def test_held_out_items_are_other_scenes_given_by_the_image_alone(tmp_path):
    train = {r["image"] for r in json.loads(write_stage2(tmp_path, "image", 20).read_text())}
    held = [json.loads(line) for line in write_held_out(tmp_path, n=20).read_text().splitlines()]
    assert len(held) == 20 and not train & {h["image"] for h in held}
    assert all(h["task"] == "yesno" and h["answer"] in ("yes", "no") and "." not in h["prompt"].split("\n")[0]
               for h in held)
