"""bench/demo_comparison compares like with like: the text and image files ask the same questions with the
same answers about the same scenes, and differ only in how the scene is given."""

import json

import PIL.Image

from bench.demo_comparison import write_stage2


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
