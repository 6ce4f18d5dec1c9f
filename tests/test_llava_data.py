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
        ("bad.json", "[{", r"bad.json: not valid JSON at line 1, column 3"),
        ("lines.json", json.dumps(RECORDS, indent=1)[:-40] + "\n}}\n", r"lines.json: not valid JSON at line \d\d"),
        ("empty.json", "[]", r"empty.json: holds no records \(empty dataset\)"),
        ("empty.jsonl", "\n\n", r"empty.jsonl: holds no records \(empty dataset\)"),
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


def test_non_utf8_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n{"id": "a",\n "conversations": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"latin1.json: line 3 is not UTF-8 text"):
        load_llava_json(path)


def test_bad_jsonl_lines_are_samples_skipped_and_listed(tmp_path):
    """One bad line of a 665K-line JSONL is one bad sample, not a refused file."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n{nope\n[1, 2]\n" + b'{"id": "\xff"}\n'
                     + json.dumps(RECORDS[3]).encode() + b"\n")
    samples = load_llava_json(path)
    assert [s.id for s in samples] == ["a", "data.jsonl:line 2", "data.jsonl:line 3", "data.jsonl:line 4", "n"]
    validate_sample(samples[0])
    validate_sample(samples[4])
    for s, reason in zip(samples[1:4], ["line 2 is not valid JSON", "line 3 must be a JSON object",
                                        "line 4 is not UTF-8 text"]):
        with pytest.raises(SampleError, match=reason):
            validate_sample(s)


def test_duplicate_ids_keep_the_first_and_flag_the_rest(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([RECORDS[0], RECORDS[3], {**RECORDS[0], "image": "y.png"}]))
    first, _, dup = load_llava_json(path)
    validate_sample(first)
    assert dup.images == ["y.png"]
    with pytest.raises(SampleError, match=r"sample a: duplicate id 'a' \(record 2; the first, record 0, is kept\)"):
        validate_sample(dup)


@pytest.mark.parametrize("relative, ok", [("a/x.png", True), ("a/../x.png", True), ("../out.png", False),
                                          ("a/../../out.png", False), ("link.png", False), ("ABS", False)])
def test_image_paths_must_stay_inside_the_image_root(tmp_path, relative, ok):
    from barnfast.data.images import resolve_image_path

    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "out.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "out.png")
    relative = str(tmp_path / "out.png") if relative == "ABS" else relative
    if ok:
        assert resolve_image_path(root, relative) == root / relative
    else:
        with pytest.raises(SampleError, match="absolute|leaves the image root"):
            resolve_image_path(root, relative)
    assert resolve_image_path(root, relative, allow_outside=True).resolve().exists() or ok
