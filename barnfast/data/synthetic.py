"""Built-in synthetic dataset in LLaVA format: coloured shapes with known attributes.

``python -m barnfast.data.synthetic --out DIR [--num-stage1 N --num-stage2 N --num-eval N
--image-size S --seed S]`` writes, under ``DIR``::

    images/s1_00000.png ...      stage-1 images      images/s2_00000.png ...  stage-2 images
    images/eval_open_00000.png, eval_mc_*, eval_yesno_*  held-out images (never in training)
    stage1.json       LLaVA captions: human "<image>\\n" + a prompt from CAPTION_PROMPTS,
                      gpt a caption such as "Two red circles on the left."
    stage2.json       LLaVA instructions: 1-3 questions about colour / shape / count / position
                      (short answers, some yes/no and A/B/C/D ones), or (30% of the image
                      samples) one description turn answered by a caption; ~10% put "<image>" at
                      the end of the first human turn; ~5% are text-only (no "image" key)
    eval_open.jsonl   {question_id, image, question, prompt, answer, answers[10], category, task="open"}
    eval_mc.jsonl     {..., options {"A".."D"}, answer "A".."D", task="mc"}
    eval_yesno.jsonl  {..., answer "yes"|"no" (balanced within one), task="yesno"}
    manifest.json     {format_version, args, counts, files}; written last, so its presence means
                      the dataset is complete

Each image is one scene: ``count`` (1-4) identical shapes of one ``colour`` grouped at one
``position`` (left/right/top/bottom/centre) on a light background, with small jitter of place,
size, colour and background. ``category`` is one of colour/shape/count/position. Canonical
answers are lower-case: a colour ("red"), a shape in the singular ("circle"), a digit ("2"),
a position ("left", "centre"). ``prompt`` is the full text to put after ``<image>\\n`` (LLaVA-1.5's
short-answer / letter-answer instruction appended); ``question`` is the bare question.

Every item is drawn from its own RNG stream ``(seed, split, index)``: the same arguments give
byte-identical files, and item ``i`` of a split does not change when another split's size does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
from tqdm import tqdm

FORMAT_VERSION = 3  # 3: 30% of stage-2 image samples are descriptions; 2: patch lattice (GRID), mix 40/25/35
# Share of each question kind among the stage-2 turns. Multiple choice is the hardest format for a tiny
# model (it must find the option whose word matches the image, then say that option's letter), and at
# 15% of the turns (v1) a 512-sample set held ~100 such turns: too few to learn the letter mapping.
# 40/25/35 gives every format several hundred turns at the tiny recipe's 2,048 samples (~1.9 turns each).
QUESTION_MIX = {"open": 0.40, "yesno": 0.25, "mc": 0.35}
# Share of the stage-2 image samples that are one description turn (a caption) instead of questions, as
# LLaVA-665k carries detailed-description conversations next to its VQA data. A tiny decoder starts from
# random weights: a caption names all four attributes of the image, so every description is four
# image-grounded targets, where a question turn has one. Measured (llama1-tiny, 4,096 stage-2 samples,
# lr 2e-3, 3 epochs): open exact match 0.26 without descriptions, 0.47 with 30% (colour 0.28 -> 0.65).
DESCRIBE_SHARE = 0.3
DESCRIBE_PROMPTS = (
    "Describe the image in one sentence.",
    "What do you see in this image?",
    "Tell me what is shown in the picture.",
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
COUNTS = (1, 2, 3, 4)
POSITIONS = ("left", "right", "top", "bottom", "centre")
CATEGORIES = ("colour", "shape", "count", "position")
TASKS = ("open", "mc", "yesno")

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# Equivalent answers an annotator may give (the open eval's `answers` draws from these).
ANSWER_VARIANTS: dict[str, tuple[str, ...]] = {
    **{c: (c,) for c in COLOURS},
    **{s: (s, s + "s") for s in SHAPES},
    **{str(n): (str(n), NUMBER_WORDS[n]) for n in COUNTS},
    **{p: (p, POSITION_PHRASES[p], f"{p} side") for p in ("left", "right")},
    **{p: (p, POSITION_PHRASES[p]) for p in ("top", "bottom")},
    "centre": ("centre", "center", "in the centre", "middle"),
}

CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short caption for this image.",
    "What is in this picture?",
    "Write a brief description of the image.",
    "Summarize the visual content of the image.",
    "Provide a one-sentence caption of the image.",
)
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."

_SPLITS = {"stage1": 1, "stage2": 2, "eval_open": 3, "eval_mc": 4, "eval_yesno": 5}
_IMAGE_PREFIX = {
    "stage1": "s1",
    "stage2": "s2",
    "eval_open": "eval_open",
    "eval_mc": "eval_mc",
    "eval_yesno": "eval_yesno",
}
DEFAULTS = dict(num_stage1=512, num_stage2=512, num_eval=100, image_size=64, seed=0)
PROGRESS_MIN_IMAGES = 5000  # below this, generation takes a few seconds and a bar is noise


# ---------------------------------------------------------------- scenes and drawing


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], index])


def _scene(rng: np.random.Generator) -> dict:
    return {
        "colour": str(rng.choice(list(COLOURS))),
        "shape": str(rng.choice(SHAPES)),
        "count": int(rng.choice(COUNTS)),
        "position": str(rng.choice(POSITIONS)),
    }


# Objects sit on a GRID x GRID lattice of cells, one object per cell, centred in it. The tiny vision towers
# see 56-pixel inputs as 4 x 4 patches of 14 pixels: with GRID = 4 every object fills one patch, centred,
# so the patch embedding of "a red circle" is the same vector wherever it is (up to the jitter), and
# colour, shape, count and position are all readable from the 16 visual tokens. With objects at free
# positions (v1: centres at 0.2/0.8, radius 0.08) an object straddled patch borders and a linear probe on
# the tiny CLIP's features read colour at 52% and shape at 57% (count 99%, position 100%; 200 train / 100
# test images); the tiny models then learned no visual answer at all. (A real 336-pixel tower has 24 x 24
# patches of its own; the lattice changes nothing for it.)
GRID = 4
RADIUS = 0.1  # of the image side: 0.2 across in a 0.25 cell, so neighbours are >= 0.05 (3 px at 64 px) apart
JITTER = 0.01  # per axis, of the image side


def _cells(position: str, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """The (column, row) cells of ``count`` objects at ``position``: left / right = a run in the outer
    column, top / bottom = a run in the outer row, centre = cells of the inner 2 x 2 block. A run of
    1 or 2 avoids the corners, so a group's centre of mass says one position word only."""
    if position == "centre":
        inner = [(1, 1), (2, 1), (1, 2), (2, 2)]
        if count == 2:  # two neighbours, side by side or one above the other
            pairs = [((1, 1), (2, 1)), ((1, 2), (2, 2)), ((1, 1), (1, 2)), ((2, 1), (2, 2))]
            return list(pairs[int(rng.integers(len(pairs)))])
        keep = rng.permutation(4)[:count]
        return [inner[int(i)] for i in sorted(keep)]
    starts = {1: (1, 2), 2: (1,), 3: (0, 1), 4: (0,)}[count]
    start = starts[int(rng.integers(len(starts)))]
    run = list(range(start, start + count))
    outer = {"left": 0, "top": 0, "right": GRID - 1, "bottom": GRID - 1}[position]
    if position in ("left", "right"):
        return [(outer, r) for r in run]
    return [(c, outer) for c in run]


def _layout(position: str, count: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Object centres as fractions of the image side (cell centres, see :data:`GRID`)."""
    return [((c + 0.5) / GRID, (r + 0.5) / GRID) for c, r in _cells(position, count, rng)]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.5  # 0.45 left 1-pixel tips cut off at radius 0.1
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


def draw_scene(scene: dict, size: int, rng: np.random.Generator) -> PIL.Image.Image:
    """The RGB ``size x size`` image of ``scene`` (colour, shape, count, position), jittered by ``rng``."""
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    img = PIL.Image.new("RGB", (size, size), background)
    draw = PIL.ImageDraw.Draw(img)
    base = np.array(COLOURS[scene["colour"]])
    fill = tuple(int(v) for v in np.clip(base + rng.integers(-15, 16, size=3), 0, 255))
    radius = size * RADIUS * float(rng.uniform(0.95, 1.05))
    for fx, fy in _layout(scene["position"], scene["count"], rng):
        cx = (fx + float(rng.uniform(-JITTER, JITTER))) * size
        cy = (fy + float(rng.uniform(-JITTER, JITTER))) * size
        if scene["shape"] == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            draw.polygon(_polygon(scene["shape"], cx, cy, radius), fill=fill)
    return img


# ---------------------------------------------------------------- text


def _noun(scene: dict) -> str:
    return scene["shape"] + ("s" if scene["count"] > 1 else "")


def caption(scene: dict, rng: np.random.Generator) -> str:
    """E.g. "Two red circles on the left." (one of three phrasings)."""
    group = f"{NUMBER_WORDS[scene['count']]} {scene['colour']} {_noun(scene)} {POSITION_PHRASES[scene['position']]}"
    template = ("{g}.", "There {be} {g}.", "A picture of {g}.")[int(rng.integers(3))]
    text = template.format(g=group, be="is" if scene["count"] == 1 else "are")
    return text[0].upper() + text[1:]


def answer_of(scene: dict, category: str) -> str:
    """The canonical short answer of ``category`` for ``scene``."""
    return str(scene["count"]) if category == "count" else scene[category]


def _open_question(scene: dict, category: str, rng: np.random.Generator) -> str:
    noun, be = _noun(scene), "is" if scene["count"] == 1 else "are"
    templates = {
        "colour": (f"What colour {be} the {noun}?", "What colour are the shapes in the image?"),
        "shape": (
            f"What shape {be} the {'object' if scene['count'] == 1 else 'objects'}?",
            "What kind of shape is in the image?",
        ),
        "count": (f"How many {scene['shape']}s are there?", "How many shapes are in the image?"),
        "position": (f"Where {be} the {noun}?", "In which part of the image are the shapes?"),
    }[category]
    return templates[int(rng.integers(len(templates)))]


def _domain(category: str) -> list[str]:
    return {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": [str(n) for n in COUNTS],
        "position": list(POSITIONS),
    }[category]


def _yesno_question(scene: dict, category: str, value: str) -> str:
    if category == "colour":
        return f"Are the shapes in the image {value}?"
    if category == "shape":
        return f"Is there a {value} in the image?"
    if category == "count":
        n = int(value)
        if n == 1:
            return "Is there exactly one shape in the image?"
        return f"Are there exactly {NUMBER_WORDS[n]} shapes in the image?"
    return f"Are the shapes {POSITION_PHRASES[value]} of the image?"


def _mc_question(category: str) -> str:
    return {
        "colour": "What colour are the shapes?",
        "shape": "Which shape appears in the image?",
        "count": "How many shapes are in the image?",
        "position": "Where in the image are the shapes?",
    }[category]


def _mc_options(scene: dict, category: str, rng: np.random.Generator) -> tuple[dict[str, str], str]:
    truth = answer_of(scene, category)
    distractors = [v for v in _domain(category) if v != truth]
    chosen = [distractors[i] for i in rng.permutation(len(distractors))[:3]] + [truth]
    chosen = [chosen[i] for i in rng.permutation(4)]
    options = dict(zip("ABCD", chosen))
    return options, "ABCD"[chosen.index(truth)]


def _mc_prompt(question: str, options: dict[str, str]) -> str:
    lines = "\n".join(f"{k}. {v}" for k, v in options.items())
    return f"{question}\n{lines}\n{LETTER_ANSWER}"


def _yesno_value(scene: dict, category: str, answer_yes: bool, rng: np.random.Generator) -> str:
    truth = answer_of(scene, category)
    if answer_yes:
        return truth
    wrong = [v for v in _domain(category) if v != truth]
    return wrong[int(rng.integers(len(wrong)))]


def _qa_turn(scene: dict, rng: np.random.Generator) -> tuple[str, str]:
    """One training question (prompt with its answer instruction) and its answer, in the proportions of
    :data:`QUESTION_MIX`, so that every eval format is trained on."""
    category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    kind = float(rng.random())
    if kind < QUESTION_MIX["open"]:
        return f"{_open_question(scene, category, rng)}\n{SHORT_ANSWER}", answer_of(scene, category)
    if kind < QUESTION_MIX["open"] + QUESTION_MIX["yesno"]:
        yes = bool(rng.random() < 0.5)
        value = _yesno_value(scene, category, yes, rng)
        return f"{_yesno_question(scene, category, value)}\n{SHORT_ANSWER}", "yes" if yes else "no"
    options, letter = _mc_options(scene, category, rng)
    return _mc_prompt(_mc_question(category), options), letter


_SIDES = {"circle": 0, "triangle": 3, "square": 4, "diamond": 4}


def _text_only_turn(rng: np.random.Generator) -> tuple[str, str]:
    if rng.random() < 0.5:
        shape = list(_SIDES)[int(rng.integers(len(_SIDES)))]
        return f"How many straight sides does a {shape} have?\n{SHORT_ANSWER}", str(_SIDES[shape])
    a, b = (int(v) for v in rng.integers(1, 5, size=2))
    return f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?\n{SHORT_ANSWER}", str(a + b)


# ---------------------------------------------------------------- splits


def _image_name(split: str, index: int) -> str:
    return f"images/{_IMAGE_PREFIX[split]}_{index:05d}.png"


def _save_png(img: PIL.Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG", optimize=False)
    os.replace(tmp, path)  # atomic: concurrent generators (one per rank) write identical bytes


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _stage1(index: int, seed: int, size: int, out: Path) -> dict:
    rng = _rng(seed, "stage1", index)
    scene = _scene(rng)
    image = _image_name("stage1", index)
    _save_png(draw_scene(scene, size, rng), out / image)
    prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
    return {
        "id": f"s1_{index:05d}",
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": caption(scene, rng)},
        ],
    }


def _stage2(index: int, seed: int, size: int, out: Path) -> dict:
    rng = _rng(seed, "stage2", index)
    if rng.random() < 0.05:
        question, answer = _text_only_turn(rng)
        return {
            "id": f"s2_{index:05d}",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        }
    scene = _scene(rng)
    image = _image_name("stage2", index)
    _save_png(draw_scene(scene, size, rng), out / image)
    if rng.random() < DESCRIBE_SHARE:
        prompt = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
        conversations = [{"from": "human", "value": f"<image>\n{prompt}"},
                         {"from": "gpt", "value": caption(scene, rng)}]
        return {"id": f"s2_{index:05d}", "image": image, "conversations": conversations}
    num_turns = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    conversations = []
    for _ in range(num_turns):
        question, answer = _qa_turn(scene, rng)
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    first = conversations[0]["value"]
    conversations[0]["value"] = f"{first}\n<image>" if rng.random() < 0.1 else f"<image>\n{first}"
    return {"id": f"s2_{index:05d}", "image": image, "conversations": conversations}


def _eval_record(task: str, index: int, category: str, answer_yes: bool, seed: int, size: int, out: Path) -> dict:
    split = f"eval_{task}"
    rng = _rng(seed, split, index)
    scene = _scene(rng)
    image = _image_name(split, index)
    _save_png(draw_scene(scene, size, rng), out / image)
    record = {"question_id": f"{task}_{index:05d}", "image": image}
    if task == "open":
        question = _open_question(scene, category, rng)
        answer = answer_of(scene, category)
        variants = ANSWER_VARIANTS[answer]
        # 10 annotators: mostly the canonical answer, 0-3 of them an equivalent variant.
        answers = [answer] * 10
        for i in rng.permutation(10)[: int(rng.integers(0, 4))]:
            answers[int(i)] = variants[int(rng.integers(len(variants)))]
        record.update(question=question, prompt=f"{question}\n{SHORT_ANSWER}", answer=answer, answers=answers)
    elif task == "mc":
        question = _mc_question(category)
        options, letter = _mc_options(scene, category, rng)
        record.update(question=question, prompt=_mc_prompt(question, options), options=options, answer=letter)
    else:
        question = _yesno_question(scene, category, _yesno_value(scene, category, answer_yes, rng))
        record.update(question=question, prompt=f"{question}\n{SHORT_ANSWER}", answer="yes" if answer_yes else "no")
    record.update(category=category, task=task, attributes=scene)
    return record


def _eval_plan(task: str, num: int, seed: int) -> list[tuple[str, bool]]:
    """(category, answer_yes) per record: categories balanced (within one), and for yes/no the
    answers balanced within every category; the order is shuffled so neither follows the index."""
    # Index i: category i % 4; yes/no alternates inside every block of 4 and, per category, from
    # block to block, so both the overall and the per-category counts differ by at most one.
    k = len(CATEGORIES)
    plan = [(CATEGORIES[i % k], (i % k + i // k) % 2 == 0) for i in range(num)]
    order = np.random.default_rng([seed, _SPLITS[f"eval_{task}"], 1 << 30]).permutation(num)
    return [plan[int(i)] for i in order]


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=False) + "\n" for r in records)


def _args(**kwargs) -> dict:
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    args = {**DEFAULTS, **kwargs}
    for name in ("num_stage1", "num_stage2", "num_eval"):
        if int(args[name]) < 0:
            raise ValueError(f"{name} must be >= 0, got {args[name]}")
    if int(args["image_size"]) < 16:
        raise ValueError(f"image_size must be >= 16, got {args['image_size']}")
    return {k: int(args[k]) for k in DEFAULTS}


def generate(
    out_dir: str | Path,
    *,
    num_stage1: int = DEFAULTS["num_stage1"],
    num_stage2: int = DEFAULTS["num_stage2"],
    num_eval: int = DEFAULTS["num_eval"],
    image_size: int = DEFAULTS["image_size"],
    seed: int = DEFAULTS["seed"],
    progress: bool | None = None,
) -> dict:
    """Write the dataset under ``out_dir`` (see the module docstring) and return its manifest.

    The returned dict is ``manifest.json`` (paths relative to ``out_dir``) plus ``"root"``, the
    absolute ``out_dir``. ``progress``: tqdm bars; ``None`` shows them from PROGRESS_MIN_IMAGES images.
    """
    args = _args(num_stage1=num_stage1, num_stage2=num_stage2, num_eval=num_eval, image_size=image_size, seed=seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = args["num_stage1"] + args["num_stage2"] + 3 * args["num_eval"] >= PROGRESS_MIN_IMAGES
    size, seed = args["image_size"], args["seed"]

    def bar(n: int, desc: str):
        return tqdm(range(n), desc=desc, disable=not progress, unit="img")

    stage1 = [_stage1(i, seed, size, out) for i in bar(args["num_stage1"], "stage1")]
    stage2 = [_stage2(i, seed, size, out) for i in bar(args["num_stage2"], "stage2")]
    _write_text(out / "stage1.json", json.dumps(stage1, indent=1) + "\n")
    _write_text(out / "stage2.json", json.dumps(stage2, indent=1) + "\n")
    counts = {"stage1": len(stage1), "stage2": len(stage2)}
    files = {"images": "images", "stage1": "stage1.json", "stage2": "stage2.json"}
    for task in TASKS:
        plan = _eval_plan(task, args["num_eval"], seed)
        records = [
            _eval_record(task, i, category, yes, seed, size, out)
            for i, (category, yes) in zip(bar(len(plan), f"eval_{task}"), plan)
        ]
        _write_text(out / f"eval_{task}.jsonl", _jsonl(records))
        counts[f"eval_{task}"] = len(records)
        files[f"eval_{task}"] = f"eval_{task}.jsonl"
    counts["stage2_text_only"] = sum("image" not in r for r in stage2)
    manifest = {"format_version": FORMAT_VERSION, "args": args, "counts": counts, "files": files}
    _write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return {**manifest, "root": str(out.resolve())}


def ensure_synthetic(out_dir: str | Path, **kwargs) -> dict:
    """``generate(out_dir, **kwargs)`` unless ``out_dir/manifest.json`` already records the same
    arguments and format version and its data files exist; returns the manifest (with ``"root"``).

    Call it on one rank and barrier, or on all: files are replaced atomically with identical bytes.
    """
    progress = kwargs.pop("progress", None)
    args = _args(**kwargs)
    out = Path(out_dir)
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        manifest = None
    if (
        isinstance(manifest, dict)
        and manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("args") == args
        and all((out / p).exists() for p in manifest.get("files", {}).values())
    ):
        return {**manifest, "root": str(out.resolve())}
    return generate(out, progress=progress, **args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m barnfast.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--num-stage1", type=int, default=DEFAULTS["num_stage1"], help="caption samples")
    parser.add_argument("--num-stage2", type=int, default=DEFAULTS["num_stage2"], help="instruction samples")
    parser.add_argument("--num-eval", type=int, default=DEFAULTS["num_eval"], help="records per eval format")
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"], help="image side in pixels")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    a = parser.parse_args(argv)
    manifest = generate(
        a.out,
        num_stage1=a.num_stage1,
        num_stage2=a.num_stage2,
        num_eval=a.num_eval,
        image_size=a.image_size,
        seed=a.seed,
    )
    print(json.dumps({"root": manifest["root"], "counts": manifest["counts"]}))
    return manifest


if __name__ == "__main__":
    main()
