"""The LLaVA JSON / JSONL reader: image field forms, ids, file-level vs per-sample errors."""

from __future__ import annotations

import json

import pytest

from barnfast.data.llava import Sample, load_llava_json, validate_sample
from barnfast.errors import SampleError

CONV = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
TEXT = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
TWO = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]

RECORDS = [
    {"id": "a", "image": "x/1.png", "conversations": CONV},
    {"id": 7, "image": ["1.png", "2.png"], "conversations": TWO},
    {"conversations": TEXT},  # no id, no image
    {"id": "n", "image": None, "conversations": TEXT},
]


def _check(samples: list[Sample]):
    assert [s.id for s in samples] == ["a", "7", "2", "n"]
    assert [s.images for s in samples] == [["x/1.png"], ["1.png", "2.png"], [], []]
    assert samples[0].conversations == CONV and samples[2].conversations == TEXT
    for s in samples:
        assert s.error is None
        validate_sample(s)


def test_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    _check(load_llava_json(path))


def test_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in RECORDS[2:])
    )
    _check(load_llava_json(str(path)))


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("top.json", json.dumps({"id": "a"}), r"top.json: top level must be a list"),
        ("rec.json", json.dumps([RECORDS[0], "oops"]), r"rec.json: record 1 must be a JSON object"),
        ("bad.json", "[{", r"bad.json: not valid JSON"),
        ("bad.jsonl", json.dumps(RECORDS[0]) + "\n{nope\n", r"bad.jsonl: line 2 is not valid JSON"),
        ("rec.jsonl", json.dumps(RECORDS[0]) + "\n[1, 2]\n", r"rec.jsonl: record 1 must be a JSON object"),
    ],
)
def test_broken_file_raises_value_error(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_llava_json(path)
    assert not isinstance(info.value, SampleError)


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"id": "s", "image": "a.png"}, "no conversations"),
        ({"id": "s", "conversations": []}, "no conversations"),
        ({"id": "s", "conversations": "hi"}, "conversations must be a list"),
        ({"id": "s", "image": 3, "conversations": CONV}, "image must be a path or a list"),
        ({"id": "s", "image": "", "conversations": CONV}, "empty image path"),
        ({"id": "s", "image": ["a.png", 2], "conversations": CONV}, "image must be a path or a list"),
        ({"id": "s", "conversations": [{"from": "user", "value": "x"}]}, "turn 0 must be"),
        ({"id": "s", "conversations": [{"from": "human", "value": 1}]}, "turn 0 must be"),
        ({"id": "s", "conversations": [{"from": "gpt", "value": "x"}]}, "conversation must start with a human turn"),
        ({"id": "s", "conversations": [{"from": "human", "value": "x"}]}, "no gpt turn"),
        ({"id": "s", "image": "a.png", "conversations": TEXT}, r"0 <image> placeholder\(s\) for 1 image"),
        ({"id": "s", "conversations": CONV}, r"1 <image> placeholder\(s\) for 0 image"),
        ({"id": "s", "image": ["a.png"], "conversations": TWO}, r"2 <image> placeholder\(s\) for 1 image"),
    ],
)
def test_broken_sample_loads_then_fails_validation(tmp_path, record, reason):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([RECORDS[0], record]))
    samples = load_llava_json(path)  # the file as a whole is fine
    assert len(samples) == 2
    validate_sample(samples[0])
    with pytest.raises(SampleError, match=f"sample s: {reason}"):
        validate_sample(samples[1])


def test_placeholder_at_end_and_multi_turn():
    sample = Sample(
        id="m",
        images=["a.png"],
        conversations=[
            {"from": "human", "value": "What colour?\n<image>"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many?"},
            {"from": "gpt", "value": "2"},
        ],
    )
    validate_sample(sample)
