"""Evaluation files → :class:`EvalItem` lists. Local files only; nothing is downloaded.

Formats (``--format``; ``auto`` tells them apart by their fields):

- ``synthetic``: barnfast's built-in ``eval_{open,mc,yesno}.jsonl`` (``question_id, image, prompt,
  answer, answers, options, category, task``); images relative to the file's folder.
- ``pope``: POPE's own question files (``coco_pope_{random,popular,adversarial}.json``, one JSON
  object per line: ``question_id, image, text, label`` yes/no); images under ``--image-root`` (COCO
  val2014). The prompt is LLaVA-1.5's: the question + "Answer the question using a single word or
  phrase."; the category is the file's subset (``adversarial`` ...).
- ``scienceqa``: ScienceQA's ``problems.json`` (``{pid: {question, choices, answer, hint, image,
  split, subject, ...}}``) with ``--split test`` (default); only problems with an image (the IMG
  subset, 2,017 of the 4,241 test items), images at ``<image-root>/<split>/<pid>/image.png``. The
  prompt is LLaVA-1.5's: ``Context: {hint}\\n{question}\\nA. ...\\nB. ...\\nAnswer with the option's
  letter from the given choices directly.``; the category is the subject.
- ``llava``: a generic LLaVA-style question file (JSONL or a JSON list) with ``question_id``,
  ``image`` (optional), ``text`` or ``prompt``, and the reference in ``answer`` / ``answers`` /
  ``label``; ``options`` (``{"A": ...}``) makes an item multiple choice, an answer of yes/no makes it
  yes/no, anything else is an open answer. ``category`` is optional. Images under ``--image-root``
  (default: the file's folder).

The benchmarks of the papers' tables, each read from its official release layout (the prompts are
LLaVA-1.5's evaluation prompts):

- ``gqa``: GQA's ``testdev_balanced_questions.json`` (``{qid: {question, answer, imageId, types:
  {structural, ...}}}``), images ``<image-root>/<imageId>.jpg``; open answer, exact match after the
  VQA normalisation; category = the structural type (verify, query, choose, logical, compare).
- ``textvqa``: TextVQA's ``TextVQA_0.5.1_val.json`` (``{"data": [{question_id, question, image_id,
  answers: [10 strings]}]}``), images ``<image-root>/<image_id>.jpg``; scored by the VQA accuracy of the
  official evaluator (``min(1, matches / 3)`` over the 10 leave-one-out subsets, after its answer
  normalisation: :func:`barnfast.evaluation.scores.normalize_answer`).
- ``mme``: the MME release folder (``--data MME_Benchmark_release_version``): one folder per subtask,
  each image with a ``<stem>.txt`` of two ``question<TAB>Yes|No`` lines, beside the image or under
  ``images/`` + ``questions_answers_YN/``; yes/no; :func:`benchmark_scores` gives MME's acc (per
  question), acc+ (per image: both questions right) and score = 100·(acc + acc+) per subtask, summed
  into perception and cognition.
- ``mmbench``: an MMBench TSV (``index, question, hint, A, B, C, D, answer, category, image`` = base64
  image, ``l2-category``, ``split``), images decoded once into ``<image-root>`` (default
  ``~/.cache/barnfast/mmbench/<sha256 of the file>``); circular evaluation: each question is asked once
  per rotation of its options (``<index>@<r>``), and :func:`benchmark_scores` counts it right only when
  every rotation is (rows with ``index >= 10**6`` are treated as the file's own rotations).
- ``seed``: SEED-Bench's ``SEED-Bench.json`` (``{question_type: {name: id}, questions: [{question_id,
  question, choice_a..d, answer, data_id, data_type, question_type_id}]}``), image questions only
  (``data_type == "image"``), images ``<image-root>/<data_id>``; 4 options; category = question type.
- ``ai2d``: the AI2D release folder (``questions/<image>.json`` with ``{imageName, questions: {text:
  {answerTexts, correctAnswer, questionId}}}`` and ``images/``); 4 options; ``ai2d_test_ids.csv`` in the
  folder (one image id per line) restricts it to the test split.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from barnfast.errors import SampleError

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
FORMATS = ("auto", "synthetic", "pope", "scienceqa", "llava", "gqa", "textvqa", "mme", "mmbench", "seed", "ai2d")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
CIRCULAR_OFFSET = 1_000_000  # MMBench: index + k·10^6 is the k-th rotation of question ``index``
TASKS = ("open", "mc", "yesno")


@dataclass
class EvalItem:
    """One question. ``answer``: the canonical reference (a letter for mc, yes/no for yesno);
    ``answers``: all annotators' answers (open; VQA accuracy when there are several)."""

    id: str
    task: str  # open | mc | yesno
    category: str
    prompt: str  # text after the image placeholder
    answer: str
    image: Path | None = None
    answers: list[str] = field(default_factory=list)
    options: dict[str, str] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"item {self.id}: task must be one of {TASKS}, got {self.task!r}")
        if self.task == "mc" and (not self.options or self.answer not in self.options):
            raise ValueError(f"item {self.id}: a multiple-choice item needs options containing its answer")
        if self.task == "yesno" and self.answer not in ("yes", "no"):
            raise ValueError(f"item {self.id}: a yes/no item's answer must be yes or no, got {self.answer!r}")


def _read_records(path: Path) -> list | dict:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and path.suffix == ".json" and "\n{" not in stripped):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def detect_format(records: list | dict) -> str:
    if isinstance(records, dict):
        if isinstance(records.get("questions"), list) and "question_type" in records:
            return "seed"
        if isinstance(records.get("data"), list):
            return "textvqa"
        first = next(iter(records.values()), {})
        if isinstance(first, dict) and "choices" in first:
            return "scienceqa"
        if isinstance(first, dict) and "imageId" in first:
            return "gqa"
        raise ValueError("a JSON object file is read as ScienceQA problems.json, GQA questions, TextVQA or "
                         "SEED-Bench, but it matches none of their layouts")
    if not records:
        raise ValueError("empty evaluation file")
    first = records[0]
    if "task" in first and "prompt" in first:
        return "synthetic"
    if "label" in first and "text" in first:
        return "pope"
    return "llava"


def _yes_no(text: str) -> str:
    t = str(text).strip().lower()
    if t not in ("yes", "no"):
        raise ValueError(f"expected a yes/no label, got {text!r}")
    return t


IMAGE_PLACEHOLDER = "<image>"


def check_item(item: EvalItem) -> None:
    """SampleError for an item that cannot be scored as written: a text-only item whose prompt has an
    ``<image>`` placeholder (there is no image to put there), or an item with an image whose prompt has
    more than one placeholder."""
    n = item.prompt.count(IMAGE_PLACEHOLDER)
    if item.image is None and n:
        raise SampleError(f"text-only item (no image) but its prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s)")
    if item.image is not None and n > 1:
        raise SampleError(f"one image but {n} {IMAGE_PLACEHOLDER} placeholders in the prompt")


def _record_id(r, k: int) -> str:
    if isinstance(r, dict):
        for key in ("question_id", "id", "pid"):
            if r.get(key) is not None:
                return str(r[key])
    return f"#{k}"


def load_items(path: str | Path, fmt: str = "auto", image_root: str | Path | None = None,
               split: str = "test", limit: int | None = None, skipped: list[dict] | None = None) -> list[EvalItem]:
    """The items of an evaluation file (the first ``limit`` when given).

    A record that cannot be an item (a required field missing, a text-only prompt with ``<image>``, a
    multiple-choice question without ``options``, ...) raises a ValueError naming its id; with a list as
    ``skipped``, it is left out and listed there as ``{"id", "reason"}`` instead, as training does with
    bad samples."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto" and path.is_dir():
        fmt = "ai2d" if (path / "questions").is_dir() else "mme"
    if fmt == "auto" and path.suffix == ".tsv":
        fmt = "mmbench"
    if fmt in ("mme", "ai2d", "mmbench"):
        items = {"mme": _mme, "ai2d": _ai2d, "mmbench": _mmbench}[fmt](path, image_root)
        return items[:limit] if limit is not None else items
    records = _read_records(path)
    if isinstance(records, dict) and "question_id" in records:  # a one-line JSONL file (one POPE question)
        records = [records]
    fmt = detect_format(records) if fmt == "auto" else fmt
    root = Path(image_root) if image_root else path.parent
    if fmt == "scienceqa":
        items = _scienceqa(records, root, split)
    elif fmt in ("gqa", "textvqa", "seed"):
        if not isinstance(records, dict):
            raise ValueError(f"{path}: format {fmt!r} expects one JSON object (its official layout)")
        items = {"gqa": _gqa, "textvqa": _textvqa, "seed": _seed}[fmt](records, root, path)
    else:
        if isinstance(records, dict):
            raise ValueError(f"format {fmt!r} expects one record per line or a JSON list")
        parse = {"synthetic": _synthetic_one, "pope": _pope_one, "llava": _llava_one}[fmt]
        items = []
        for k, r in enumerate(records[:limit] if limit is not None else records):
            try:
                if not isinstance(r, dict):
                    raise SampleError(f"record is a {type(r).__name__}, not an object")
                item = parse(r, root, path)
                check_item(item)
            except (KeyError, TypeError, ValueError) as exc:
                reason = f"missing required field {exc}" if isinstance(exc, KeyError) else str(exc)
                if skipped is None:
                    raise ValueError(f"{path}: item {_record_id(r, k)}: {reason}") from None
                skipped.append({"id": _record_id(r, k), "reason": reason})
                continue
            items.append(item)
    return items[:limit] if limit is not None else items


def _synthetic_one(r, root: Path, path: Path) -> EvalItem:
    return EvalItem(id=str(r["question_id"]), task=r["task"], category=r["category"], prompt=r["prompt"],
                    answer=str(r["answer"]), image=root / r["image"] if r.get("image") else None,
                    answers=[str(a) for a in r.get("answers", [r["answer"]])], options=r.get("options"))


def _pope_one(r, root: Path, path: Path) -> EvalItem:
    subset = path.stem.rsplit("_", 1)[-1] if "_" in path.stem else path.stem  # coco_pope_adversarial → adversarial
    return EvalItem(id=str(r["question_id"]), task="yesno", category=str(r.get("category", subset)),
                    prompt=f"{r['text'].strip()}\n{SHORT_ANSWER}", answer=_yes_no(r["label"]),
                    image=root / r["image"], answers=[_yes_no(r["label"])])


def _scienceqa(problems: dict, root: Path, split: str) -> list[EvalItem]:
    items = []
    for pid, p in problems.items():
        if p.get("split") != split or not p.get("image"):
            continue
        letters = [chr(ord("A") + i) for i in range(len(p["choices"]))]
        options = dict(zip(letters, p["choices"]))
        lines = "\n".join(f"{k}. {v}" for k, v in options.items())
        context = f"Context: {p['hint']}\n" if p.get("hint") else ""
        prompt = f"{context}{p['question']}\n{lines}\n{LETTER_ANSWER}"
        items.append(EvalItem(id=str(pid), task="mc", category=str(p.get("subject", "scienceqa")), prompt=prompt,
                              answer=letters[int(p["answer"])], image=root / split / str(pid) / p["image"],
                              answers=[letters[int(p["answer"])]], options=options))
    return items


import os
import re
import sys
from collections import defaultdict
