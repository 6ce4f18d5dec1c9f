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
    question: str | None = None
    """The question without its options and answer instruction (context first, as in ``prompt``): what
    ``--option-scoring rank`` asks before scoring each option's text (SEED-Bench's answer ranking)."""

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
                    answers=[str(a) for a in r.get("answers", [r["answer"]])], options=r.get("options"),
                    question=r.get("question"))


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
                              answers=[letters[int(p["answer"])]], options=options,
                              question=f"{context}{p['question']}"))
    return items


# -- benchmarks of the papers' tables, in their official layouts -----------------------------------------


def _options_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    lines = "\n".join(f"{k}. {v}" for k, v in options.items())
    context = f"{hint}\n" if hint else ""
    return f"{context}{question}\n{lines}\n{LETTER_ANSWER}"


def _gqa(records: dict, root: Path, path: Path) -> list[EvalItem]:
    items = []
    for qid, q in records.items():
        for key in ("question", "answer", "imageId"):
            if key not in q:
                raise ValueError(f"{path}: GQA question {qid} has no {key!r}")
        items.append(EvalItem(id=str(qid), task="open", category=str((q.get("types") or {}).get("structural", "gqa")),
                              prompt=f"{q['question']}\n{SHORT_ANSWER}", answer=str(q["answer"]),
                              image=root / f"{q['imageId']}.jpg", answers=[str(q["answer"])]))
    return items


def _textvqa(records: dict, root: Path, path: Path) -> list[EvalItem]:
    items = []
    for q in records["data"]:
        if not q.get("answers"):
            raise ValueError(f"{path}: TextVQA question {q.get('question_id')} has no 'answers' (the test split "
                             "has none; use the val file)")
        answers = [str(a) for a in q["answers"]]
        # The reference for exact match is the most frequent answer; scoring is the VQA accuracy over all 10.
        top = max(dict.fromkeys(answers), key=answers.count)
        items.append(EvalItem(id=str(q["question_id"]), task="open", category="textvqa",
                              prompt=f"{q['question']}\n{SHORT_ANSWER}", answer=top,
                              image=root / f"{q['image_id']}.jpg", answers=answers))
    return items


def _seed(records: dict, root: Path, path: Path) -> list[EvalItem]:
    types = {int(v): k for k, v in records["question_type"].items()}
    items = []
    for q in records["questions"]:
        if q.get("data_type", "image") != "image":
            continue  # the video questions need frames, not one image
        options = {k.upper(): str(q[f"choice_{k}"]) for k in "abcd"}
        items.append(EvalItem(id=str(q["question_id"]), task="mc",
                              category=types.get(int(q.get("question_type_id", -1)), "seed"),
                              prompt=_options_prompt(q["question"], options), answer=str(q["answer"]).strip().upper(),
                              image=root / q["data_id"], answers=[str(q["answer"]).strip().upper()], options=options,
                              question=str(q["question"])))
    return items


def _mme(root: Path, image_root) -> list[EvalItem]:
    if not root.is_dir():
        raise ValueError(f"MME: {root} is not the release folder (one folder per subtask)")
    items = []
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = task_dir / "questions_answers_YN" if (task_dir / "questions_answers_YN").is_dir() else task_dir
        img_dir = task_dir / "images" if (task_dir / "images").is_dir() else task_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            image = next((p for p in img_dir.glob(f"{txt.stem}.*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")),
                         None)
            if image is None:
                raise ValueError(f"MME: no image for {txt} in {img_dir}")
            lines = [x for x in txt.read_text(encoding="utf-8").splitlines() if x.strip()]
            for k, line in enumerate(lines):
                question, sep, answer = line.rpartition("\t")
                if not sep:
                    raise ValueError(f"MME: {txt} line {k + 1} is not 'question<TAB>answer': {line!r}")
                items.append(EvalItem(id=f"{task_dir.name}/{txt.stem}/{k}", task="yesno", category=task_dir.name,
                                      prompt=question.strip(), answer=_yes_no(answer), image=image,
                                      answers=[_yes_no(answer)]))
    if not items:
        raise ValueError(f"MME: {root} holds no subtask folders with question files")
    return items


def _ai2d(root: Path, image_root) -> list[EvalItem]:
    qdir = root / "questions"
    if not qdir.is_dir():
        raise ValueError(f"AI2D: {root} has no questions/ folder (the release layout: questions/, images/)")
    ids_file = root / "ai2d_test_ids.csv"
    keep = {x.strip() for x in ids_file.read_text().splitlines() if x.strip()} if ids_file.exists() else None
    images = Path(image_root) if image_root else root / "images"
    items = []
    for f in sorted(qdir.glob("*.json"), key=lambda p: (len(p.name), p.name)):
        doc = json.loads(f.read_text(encoding="utf-8"))
        name = doc["imageName"]
        if keep is not None and name.split(".")[0] not in keep:
            continue
        for text, q in doc["questions"].items():
            letters = [chr(ord("A") + i) for i in range(len(q["answerTexts"]))]
            options = dict(zip(letters, [str(a) for a in q["answerTexts"]]))
            answer = letters[int(q["correctAnswer"])]
            items.append(EvalItem(id=str(q["questionId"]), task="mc", category="ai2d", prompt=_options_prompt(text,
                                  options), answer=answer, image=images / name, answers=[answer], options=options,
                                  question=text))
    return items


def _mmbench_image_dir(path: Path, image_root) -> Path:
    if image_root:
        return Path(image_root)
    h = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    base = Path(os.environ.get("BARNFAST_CACHE") or Path.home() / ".cache" / "barnfast")
    return base / "mmbench" / h


def _mmbench(path: Path, image_root) -> list[EvalItem]:
    csv.field_size_limit(sys.maxsize)  # a base64 image is one field of ~100 kB
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"MMBench: {path} has no rows")
    missing = {"index", "question", "A", "B", "answer", "image"} - set(rows[0])
    if missing:
        raise ValueError(f"MMBench: {path} lacks the column(s) {sorted(missing)}")
    img_dir = _mmbench_image_dir(path, image_root)
    img_dir.mkdir(parents=True, exist_ok=True)
    own_rotations = any(int(r["index"]) >= CIRCULAR_OFFSET for r in rows)
    items = []
    for r in rows:
        index = int(r["index"])
        image = img_dir / f"{index % CIRCULAR_OFFSET}.png"
        if not image.exists() and r["image"].strip() and len(r["image"]) > 64:
            tmp = image.with_name(f".{image.name}.{os.getpid()}.tmp")
            tmp.write_bytes(base64.b64decode(r["image"]))
            tmp.replace(image)
        texts = [str(r[k]) for k in "ABCDEFGHI" if k in r and str(r[k]).strip() and str(r[k]).lower() != "nan"]
        answer_at = "ABCDEFGHI".index(r["answer"].strip().upper())
        hint = r.get("hint") if r.get("hint") and str(r.get("hint")).lower() != "nan" else None
        rounds = [0] if own_rotations else range(len(texts))
        for k in rounds:
            rotated = texts[k:] + texts[:k]  # round k: option k first; the answer moves with its text
            letters = [chr(ord("A") + i) for i in range(len(rotated))]
            answer = letters[(answer_at - k) % len(texts)]
            options = dict(zip(letters, rotated))
            group, rot = index % CIRCULAR_OFFSET, (index // CIRCULAR_OFFSET if own_rotations else k)
            items.append(EvalItem(id=f"{group}@{rot}", task="mc", category=str(r.get("category", "mmbench")),
                                  prompt=_options_prompt(r["question"], options, hint), answer=answer, image=image,
                                  answers=[answer], options=options,
                                  question=f"{hint}\n{r['question']}" if hint else str(r["question"])))
    return items


def benchmark_scores(fmt: str, records: list[dict]) -> dict:
    """The benchmark's own headline numbers from evaluation records (``barnfast.evaluation.evaluate``).

    ``mme``: per subtask acc, acc+ (an image counts when both of its questions are right) and score =
    100·(acc + acc+), summed into ``perception`` (10 subtasks) and ``cognition`` (4); ``mmbench``:
    circular accuracy (a question counts when all its rotations are right) and the first-rotation
    accuracy, overall and per category; ``textvqa``: mean VQA accuracy; ``pope``: POPE's metrics;
    others: accuracy, overall and per category.
    """
    from barnfast.evaluation import scores

    if not records:
        raise ValueError("benchmark_scores needs records")
    out: dict = {"format": fmt, "accuracy": sum(bool(r["correct"]) for r in records) / len(records)}
    by_cat = defaultdict(list)
    for r in records:
        by_cat[r["category"]].append(bool(r["correct"]))
    out["accuracy_by_category"] = {c: sum(v) / len(v) for c, v in sorted(by_cat.items())}
    if fmt == "mme":
        per_image = defaultdict(list)
        for r in records:
            task, stem, _ = r["id"].rsplit("/", 2)
            per_image[(task, stem)].append(bool(r["correct"]))
        subtasks = {}
        for task in sorted({t for t, _ in per_image}):
            imgs = [v for (t, _), v in per_image.items() if t == task]
            acc = sum(sum(v) for v in imgs) / sum(len(v) for v in imgs)
            acc_plus = sum(all(v) for v in imgs) / len(imgs)
            subtasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}
        out["subtasks"] = subtasks
        out["perception"] = sum(v["score"] for k, v in subtasks.items() if k in MME_PERCEPTION)
        out["cognition"] = sum(v["score"] for k, v in subtasks.items() if k in MME_COGNITION)
    elif fmt == "mmbench":
        groups = defaultdict(list)
        cats = {}
        for r in records:
            g, _, rot = r["id"].partition("@")
            groups[g].append((int(rot or 0), bool(r["correct"])))
            cats[g] = r["category"]
        circ = {g: all(c for _, c in v) for g, v in groups.items()}
        out["circular_accuracy"] = sum(circ.values()) / len(circ)
        out["first_rotation_accuracy"] = sum(dict(v)[min(dict(v))] for v in groups.values()) / len(groups)
        per_cat = defaultdict(list)
        for g, ok in circ.items():
            per_cat[cats[g]].append(ok)
        out["circular_accuracy_by_category"] = {c: sum(v) / len(v) for c, v in sorted(per_cat.items())}
        out["n_questions"] = len(groups)
    elif fmt == "textvqa":
        vqa = [r.get("vqa_accuracy") for r in records]
        out["vqa_accuracy"] = sum(v for v in vqa if v is not None) / len(vqa)
    elif fmt == "pope":
        out["pope"] = scores.pope_metrics([r["prediction"] for r in records], [r["answer"] for r in records])
    return out


_LETTER_OPTION_LINE = re.compile(r"^\s*\(?[A-Z][.):]\s", re.MULTILINE)


def _llava_one(r, root: Path, path: Path) -> EvalItem:
    prompt = r.get("text", r.get("prompt"))
    if prompt is None:
        raise SampleError("has neither 'text' nor 'prompt'")
    answers = r.get("answers") or [r.get("answer", r.get("label"))]
    if answers[0] is None:
        raise SampleError("has no 'answer', 'answers' or 'label'")
    answers = [str(a["answer"]) if isinstance(a, dict) else str(a) for a in answers]
    answer = str(r.get("answer", answers[0]))
    options = r.get("options")
    if not options and re.fullmatch(r"[A-Z]", answer.strip()) and (
            LETTER_ANSWER in prompt or len(_LETTER_OPTION_LINE.findall(prompt)) >= 2):
        # Scored as an open answer it would be exact match on a letter: flag it instead of mis-scoring it.
        raise SampleError(f"looks like multiple choice (answer {answer!r}, lettered options in the prompt) "
                          "but has no 'options' mapping")
    task = "mc" if options else ("yesno" if answer.strip().lower() in ("yes", "no") else "open")
    if task == "yesno":
        answer = answer.strip().lower()
    return EvalItem(id=str(r["question_id"]), task=task, category=str(r.get("category", "all")),
                    prompt=prompt, answer=answer, image=root / r["image"] if r.get("image") else None,
                    answers=answers, options=options, question=r.get("question"))
