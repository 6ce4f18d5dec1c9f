"""Reader for the LLaVA conversation format.

A file is a JSON list (``.json``) or one JSON object per line (``.jsonl``) of records::

    {"id": "000123", "image": "coco/000123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

``image`` is a path relative to the image root, a list of such paths (one ``<image>`` placeholder
each, in order), or absent for a text-only sample. A record without ``id`` gets its index in the
file (as a string).

Two kinds of errors, so that one bad sample does not stop a run over 665K:

* a structurally broken FILE (a ``.json`` that is not valid JSON or not UTF-8, top level not a list,
  a record that is not an object, no records at all) raises ``ValueError`` naming the file and the
  line (or record index) at load time;
* a broken SAMPLE (no or empty ``conversations``, a turn that is not ``{"from": "human"|"gpt",
  "value": str}``, ``image`` of the wrong type, placeholders not matching the images, an id already
  used by an earlier record, and in a ``.jsonl`` a line that is not valid JSON, not UTF-8 or not an
  object) is still returned, with ``Sample.error`` set; :func:`validate_sample` raises ``SampleError``
  with the reason, and the trainer calls it when it encodes the sample (recording the sample as
  skipped). Of records sharing an id the first is kept: ids key the skipped list, the non-finite
  log and the sweep's proof of identical data order, so they must name one sample each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from barnfast.errors import SampleError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("human", "gpt")


@dataclass
class Sample:
    id: str
    images: list[str]  # relative to the image root; [] for text-only
    conversations: list[dict]  # [{"from": "human"|"gpt", "value": str}, ...]
    error: str | None = None  # a per-sample structural problem found at load; validate_sample raises it


_BAD_LINE = object()  # a .jsonl line that could not be read; its reason travels beside it


def _read_records(path: Path) -> list[tuple[str | None, object]]:
    """``(label, record)`` per record: ``label`` is ``"line N"`` in a ``.jsonl`` (None in a ``.json``);
    a ``.jsonl`` line that is not JSON or not UTF-8 gives ``(label, (_BAD_LINE, reason))``."""
    raw = path.read_bytes()
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            label = f"line {lineno}"
            try:
                records.append((label, json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as e:
                records.append((label, (_BAD_LINE, f"{path} {label} is not UTF-8 text ({e.reason} at byte {e.start})")))
            except json.JSONDecodeError as e:
                records.append((label, (_BAD_LINE, f"{path} {label} is not valid JSON: {e}")))
        return records
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text ({e.reason} at byte {e.start}); "
                         f"LLaVA files are UTF-8 JSON") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: top level must be a list of records, got {type(records).__name__}")
    return [(None, r) for r in records]


def _images_of(raw) -> tuple[list[str], str | None]:
    if raw is None:
        return [], None
    if isinstance(raw, str):
        return ([raw], None) if raw else ([], "empty image path")
    if isinstance(raw, list) and all(isinstance(p, str) and p for p in raw):
        return list(raw), None
    return [], f"image must be a path or a list of paths, got {raw!r}"


def load_llava_json(path: str | Path) -> list[Sample]:
    """All records of a LLaVA ``.json`` / ``.jsonl`` file as :class:`Sample`, in file order.

    Raises ``ValueError`` (naming the file and record index) only for a broken file; per-sample
    problems are kept in ``Sample.error`` / left for :func:`validate_sample`.
    """
    path = Path(path)
    samples = []
    first_of: dict[str, int] = {}
    for index, (label, record) in enumerate(_read_records(path)):
        if isinstance(record, tuple) and record and record[0] is _BAD_LINE:
            samples.append(Sample(id=f"{path.name}:{label}", images=[], conversations=[], error=record[1]))
            continue
        if not isinstance(record, dict):
            if label is None:
                raise ValueError(f"{path}: record {index} must be a JSON object, got {type(record).__name__}")
            samples.append(Sample(id=f"{path.name}:{label}", images=[], conversations=[],
                                  error=f"{path} {label} must be a JSON object, got {type(record).__name__}"))
            continue
        sample_id = str(record.get("id", index))
        images, error = _images_of(record.get("image"))
        conversations = record.get("conversations")
        if conversations is None:
            conversations = []
        elif not isinstance(conversations, list):
            error = error or f"conversations must be a list, got {type(conversations).__name__}"
            conversations = []
        where = label or f"record {index}"
        if sample_id in first_of:
            error = f"duplicate id {sample_id!r} ({where}; the first, record {first_of[sample_id]}, is kept)"
        else:
            first_of[sample_id] = index
        samples.append(Sample(id=sample_id, images=images, conversations=conversations, error=error))
    if not samples:
        raise ValueError(f"{path}: holds no records (empty dataset); nothing to train on")
    return samples


def validate_sample(sample: Sample) -> None:
    """Raise ``SampleError`` naming the reason if ``sample`` cannot be trained on.

    Checks: the load-time ``error``; a non-empty conversation of ``{"from": "human"|"gpt", "value": str}``
    turns starting with ``human`` and containing at least one ``gpt`` turn; as many ``<image>``
    placeholders in the human turns as images. (Image files are checked when loaded: ``load_image``.)
    """
    if sample.error:
        raise SampleError(f"sample {sample.id}: {sample.error}")
    if not sample.conversations:
        raise SampleError(f"sample {sample.id}: no conversations")
    placeholders = 0
    for i, turn in enumerate(sample.conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise SampleError(
                f"sample {sample.id}: turn {i} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r}"
            )
        if turn["from"] == "human":
            placeholders += turn["value"].count(IMAGE_PLACEHOLDER)
    if sample.conversations[0]["from"] != "human":
        raise SampleError(f"sample {sample.id}: conversation must start with a human turn")
    if not any(turn["from"] == "gpt" for turn in sample.conversations):
        raise SampleError(f"sample {sample.id}: no gpt turn to train on")
    if placeholders != len(sample.images):
        raise SampleError(
            f"sample {sample.id}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(sample.images)} image(s)"
        )
