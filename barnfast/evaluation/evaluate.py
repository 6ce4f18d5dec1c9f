"""Evaluate an exported barnfast model: ``python -m barnfast.evaluation.evaluate --model DIR --data FILE``.

    python -m barnfast.evaluation.evaluate --model out/llama1-tiny/export --data out/data/eval_mc.jsonl
    python -m barnfast.evaluation.evaluate --model out/llama3/export --data pope/coco_pope_adversarial.json \\
        --image-root coco/val2014 --output out/llama3/eval/pope_adversarial.jsonl
    python -m barnfast.evaluation.evaluate --model out/llama3/export --data scienceqa/problems.json \\
        --format scienceqa
        --image-root scienceqa/images

Writes one JSON line per item to ``--output`` (default ``<run>/eval/<data stem>.jsonl`` beside the
``export`` folder) and the summary to ``<output>.summary.json``; prints the summary. Fields of a
record: ``id, task, category, prediction, answer, correct, confidence, option_probs`` (mc / yes-no),
``vqa_accuracy`` (open), ``answer_logprobs`` (open: the greedy tokens').

How each task is scored (``score_item``):

- ``mc`` (ScienceQA / MMBench / SEED style): the log-probability of each option letter's first answer
  token (``--option-scoring first_token``, the default, as lmms-eval reads the generated letter; when two
  options begin with the same token, the mean log-probability of their answer tokens, which is what
  ``--option-scoring mean`` always uses), so an option's token count cannot matter; the prediction is
  the arg-max, ``option_probs`` the softmax over the options, ``confidence`` the prediction's share.
  ``--option-scoring rank`` is SEED-Bench's answer ranking instead: the question alone (no options, no
  letter instruction) and each option's text as the answer, mean log-probability; the record's
  ``option_probs`` are then over the options' texts, keyed by letter. It measures whether the model
  prefers the right content, not whether it reads the options and names a letter.
- ``yesno`` (POPE / MME style): the same over the two answers, where each answer's probability is the
  sum over its two spellings ("yes" + "Yes", "no" + "No"); the summary adds POPE's accuracy,
  precision, recall, F1 and yes-ratio.
- ``open``: greedy decoding with the backbone's stop tokens (``--max-new-tokens``, 16); ``correct``
  is normalised exact match against the reference answers (VQA normalisation); ``vqa_accuracy`` is
  the 10-annotator VQA accuracy when the item has several answers; ``confidence`` is the geometric
  mean of the chosen tokens' probabilities, the stop token included (``exp(mean log p)``).

Calibration in the summary (ECE/MCE over 15 equal-width bins, top-label Brier) is over the items of
the file. :func:`representation_stability` (used by the sweep and ``barnfast.evaluation.analyze``) compares the
decoder's hidden states of clean and slightly perturbed images with linear CKA, layer by layer.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from barnfast.errors import SampleError
from barnfast.evaluation import scores
from barnfast.evaluation.exported import ExportedVLM
from barnfast.evaluation.formats import FORMATS, EvalItem, load_items

YES_NO_SPELLINGS = {"yes": ("yes", "Yes"), "no": ("no", "No")}
# How mc / yes-no answers are scored (``--option-scoring``):
# - first_token: log p(first answer token | prompt), as lmms-eval / MMBench read the option letter the
#   model generates first; independent of how many tokens an answer takes, one forward per item.
# - mean: length-normalised log-likelihood (mean over the answer's tokens, the stop token excluded).
# - rank: SEED-Bench's answer ranking (its official evaluator, LLaVA-1.5's interface included): for mc, the
#   question alone (no options, no letter instruction, ``EvalItem.question``) and each option's text as the
#   answer, scored by its mean token log-probability; it asks whether the model prefers the right option's
#   content, not whether it can name the option's letter. yes/no items are scored as ``mean``.
# first_token falls back to mean for an item whose labels share a first token (multi-token answers).
OPTION_SCORING = ("first_token", "mean", "rank")
# Image-ablation controls (``--ablation``): each item again with its image replaced.
# - blank: a white image of the tower's input size (the synthetic scenes' background is near-white,
#   225-255, so this is the scene without its shapes);
# - other: the image of the item half the file away (index i + n//2 mod n), a real image of another scene.
ABLATIONS = ("blank", "other")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def score_choices(vlm: ExportedVLM, item: EvalItem, pixel_values, choices: dict[str, tuple[str, ...]],
                  method: str = "first_token", prompt_text: str | None = None) -> dict:
    """Probabilities of ``choices`` (label → spellings) as the answer, softmax over labels.

    A spelling's score is (``method``, see :data:`OPTION_SCORING`) the log-probability of its first answer
    token, or the mean log-probability of its answer tokens; a label's score is the log-sum-exp over its
    spellings. The answer tokens are those training labels (``ExportedVLM.answer_ids``, stop token dropped).
    ``prompt_text``: the text asked instead of ``item.prompt`` (``rank``: the bare question).
    """
    if method not in ("first_token", "mean"):  # rank is mean over the options' texts (see _answer)
        raise ValueError(f"choices are scored by first_token or mean, got {method!r}")
    text = item.prompt if prompt_text is None else prompt_text
    n_img = 1 if pixel_values is not None else 0
    prompt = vlm.prompt_ids(text, n_img)
    flat = [(label, s) for label, spellings in choices.items() for s in spellings]
    conts = [vlm.answer_ids(text, s, n_img, include_stop=False) for _, s in flat]
    first_of: dict[int, set[str]] = defaultdict(set)
    for (label, _), c in zip(flat, conts):
        first_of[c[0]].add(label)
    used = method
    if method == "first_token" and any(len(labels) > 1 for labels in first_of.values()):
        used = "mean"  # two labels begin with the same token: the first token cannot tell them apart
    if used == "first_token":
        logp = vlm.next_token_logprobs(prompt, pixel_values)
        scores_ = [float(logp[c[0]]) for c in conts]
    else:
        scores_ = [float(lp.mean()) for lp in vlm.continuation_logprobs(prompt, conts, pixel_values)]
    per_label: dict[str, list[float]] = defaultdict(list)
    for (label, _), sc in zip(flat, scores_):
        per_label[label].append(sc)
    labels = list(choices)
    totals = np.array([np.logaddexp.reduce(per_label[label]) for label in labels])
    probs = _softmax(totals)
    best = int(probs.argmax())
    return {"prediction": labels[best], "confidence": float(probs[best]),
            "option_probs": {label: float(p) for label, p in zip(labels, probs)},
            "option_logprobs": {label: float(t) for label, t in zip(labels, totals)}, "scoring": used}


def _answer(vlm: ExportedVLM, item: EvalItem, pv, max_new_tokens: int, option_scoring: str) -> dict:
    """Prediction fields of ``item`` answered with the pixels ``pv`` (None: text only)."""
    ranked = option_scoring == "rank"  # mc: the options' texts after the bare question; yes/no: mean
    method = "mean" if ranked else option_scoring
    if item.task == "mc":
        choices = {k: (v if ranked else k,) for k, v in item.options.items()}
        out = score_choices(vlm, item, pv, choices, method, item.question if ranked else None)
        return {**out, "scoring": "rank" if ranked else out["scoring"], "correct": out["prediction"] == item.answer}
    if item.task == "yesno":
        out = score_choices(vlm, item, pv, YES_NO_SPELLINGS, method)
        return {**out, "correct": out["prediction"] == item.answer}
    prompt = vlm.prompt_ids(item.prompt, 1 if pv is not None else 0)
    ids, logps, stopped = vlm.greedy(prompt, pv, max_new_tokens=max_new_tokens)
    pred = vlm.decode(ids)
    refs = item.answers or [item.answer]
    return {"prediction": pred, "correct": scores.exact_match(pred, [item.answer, *refs]),
            "confidence": float(math.exp(np.mean(logps))), "option_probs": None, "answer_logprobs": logps,
            "stopped": stopped, "vqa_accuracy": scores.vqa_accuracy(pred, refs) if len(refs) > 1 else None}


def blank_image(vlm: ExportedVLM) -> PIL.Image.Image:
    """The ``blank`` ablation's image: white, at the tower's input size."""
    size = vlm.vision.image_size
    return PIL.Image.new("RGB", (size, size), (255, 255, 255))


def score_item(vlm: ExportedVLM, item: EvalItem, max_new_tokens: int = 16, option_scoring: str = "first_token",
               ablations: dict[str, tuple[str, object]] | None = None) -> dict:
    """The record of one item (see the module docstring).

    ``ablations``: name → (what replaced the image, a PIL image or path); each adds
    ``record["ablation"][name] = {"prediction", "correct", "image"}`` for the item answered with that
    image instead of its own. Text-only items get none.
    """
    if max_new_tokens < 1 and item.task == "open":
        raise ValueError(f"max_new_tokens must be >= 1 for open answers, got {max_new_tokens}")
    pv = vlm.pixel_values([item.image]) if item.image is not None else None
    rec = {"id": item.id, "task": item.task, "category": item.category, "answer": item.answer}
    rec.update(_answer(vlm, item, pv, max_new_tokens, option_scoring))
    if ablations and pv is not None:
        rec["ablation"] = {}
        for name, (what, image) in ablations.items():
            try:
                apv = vlm.pixel_values([image])
            except SampleError:  # the substitute image is unreadable: that control is missing, the item is fine
                continue
            out = _answer(vlm, item, apv, max_new_tokens, option_scoring)
            rec["ablation"][name] = {"prediction": out["prediction"], "correct": out["correct"], "image": what}
    return rec


def _ablation_plan(vlm: ExportedVLM, items: list[EvalItem], kinds) -> list[dict | None]:
    """Per item, the ablations to run (see :data:`ABLATIONS`); None for text-only items."""
    unknown = set(kinds) - set(ABLATIONS)
    if unknown:
        raise ValueError(f"unknown ablations {sorted(unknown)}; known: {', '.join(ABLATIONS)}")
    with_image = [i for i, it in enumerate(items) if it.image is not None]
    pos = {i: k for k, i in enumerate(with_image)}
    blank = blank_image(vlm) if "blank" in kinds else None
    plans: list[dict | None] = []
    for i, it in enumerate(items):
        if it.image is None or not kinds:
            plans.append(None)
            continue
        plan = {}
        if "blank" in kinds:
            plan["blank"] = ("blank", blank)
        n = len(with_image)
        if "other" in kinds and n > 1:
            j = with_image[(pos[i] + max(1, n // 2)) % n]
            plan["other"] = (f"image of {items[j].id}", items[j].image)
        plans.append(plan)
    return plans


def _check_item(item: EvalItem, option_scoring: str = "first_token") -> None:
    """SampleError naming the problem of an item that cannot be scored (before any model work)."""
    if item.image is not None and not Path(item.image).is_file():
        raise SampleError(f"image not found: {item.image}")
    if option_scoring == "rank" and item.task == "mc" and not (item.question or "").strip():
        raise SampleError("has no bare question (a 'question' field without the options), which "
                          "--option-scoring rank asks before each option's text")


def evaluate(vlm: ExportedVLM, items: list[EvalItem], max_new_tokens: int = 16, progress: bool = True,
             option_scoring: str = "first_token", ablations=ABLATIONS, sink=None,
             skipped: list[dict] | None = None) -> list[dict]:
    """Records of ``items`` in order. ``sink(record)`` is called as each one is computed (the CLI appends
    it to the JSONL file). An item whose image is missing or unreadable is left out and, when ``skipped``
    is a list, listed there as ``{"id", "reason"}`` (else the SampleError is raised)."""
    if max_new_tokens < 1 and any(it.task == "open" for it in items):
        raise ValueError(f"max_new_tokens must be >= 1 for open answers, got {max_new_tokens}")
    if option_scoring not in OPTION_SCORING:
        raise ValueError(f"option scoring must be one of {OPTION_SCORING}, got {option_scoring!r}")

    def skip(it: EvalItem, exc: SampleError) -> None:
        if skipped is None:
            raise SampleError(f"item {it.id}: {exc}") from None
        skipped.append({"id": it.id, "reason": str(exc)})

    usable = []
    for it in items:  # before any model work, and so that no item borrows a missing image as "other"
        try:
            _check_item(it, option_scoring)
        except SampleError as exc:
            skip(it, exc)
            continue
        usable.append(it)
    items = usable
    plans = _ablation_plan(vlm, items, tuple(ablations or ()))
    records = []
    for it, plan in zip(tqdm(items, disable=not progress, desc="eval"), plans):
        try:
            rec = score_item(vlm, it, max_new_tokens, option_scoring, plan)
        except SampleError as exc:
            skip(it, exc)
            continue
        records.append(rec)
        if sink is not None:
            sink(rec)
    return records


def chance_accuracy(records: list[dict]) -> float | None:
    """Expected accuracy of a uniform random guess: mean 1/(number of options) over mc / yes-no
    records; None for open answers (no finite answer set)."""
    closed = [r for r in records if r.get("option_probs")]
    if not closed or len(closed) != len(records):
        return None
    return float(np.mean([1.0 / len(r["option_probs"]) for r in closed]))


def ablation_summary(records: list[dict]) -> dict:
    """Per task: accuracy with the item's own image and with each ablation, over the items that have
    every control (so the columns compare the same items), and the chance level."""
    out = {}
    for task in sorted({r["task"] for r in records}):
        rows = [r for r in records if r["task"] == task and r.get("ablation")]
        if not rows:
            continue
        kinds = sorted(set.intersection(*(set(r["ablation"]) for r in rows)))
        rows_all = [r for r in rows if all(k in r["ablation"] for k in kinds)]
        entry = {"n": len(rows_all), "image": float(np.mean([r["correct"] for r in rows_all])),
                 "chance": chance_accuracy(rows_all)}
        for k in kinds:
            entry[k] = float(np.mean([r["ablation"][k]["correct"] for r in rows_all]))
            # Answers that change with the image: how often the ablated prediction differs from the real one.
            entry[f"changed_{k}"] = float(np.mean([r["ablation"][k]["prediction"] != r["prediction"]
                                                   for r in rows_all]))
        out[task] = entry
    return out


def summarize(records: list[dict], n_bins: int = 15, skipped: list[dict] | None = None) -> dict:
    """Accuracy overall / per task / per category, POPE metrics (yes/no), exact match and VQA accuracy
    (open), calibration (ECE, MCE, Brier over ``n_bins`` equal-width bins), the image-ablation controls
    and the skipped items."""
    if not records:
        raise ValueError("no records to summarise" + (f" ({len(skipped)} items skipped)" if skipped else ""))
    out: dict = {"n": len(records), "accuracy": float(np.mean([r["correct"] for r in records]))}
    for key in ("task", "category"):
        groups = defaultdict(list)
        for r in records:
            groups[r[key]].append(r["correct"])
        out[f"accuracy_by_{key}"] = {k: float(np.mean(v)) for k, v in sorted(groups.items())}
        out[f"n_by_{key}"] = {k: len(v) for k, v in sorted(groups.items())}
    yn = [r for r in records if r["task"] == "yesno"]
    if yn:
        out["pope"] = scores.pope_metrics([r["prediction"] for r in yn], [r["answer"] for r in yn])
    op = [r for r in records if r["task"] == "open"]
    if op:
        out["open_exact_match"] = float(np.mean([r["correct"] for r in op]))
        vqa = [r["vqa_accuracy"] for r in op if r.get("vqa_accuracy") is not None]
        out["open_vqa_accuracy"] = float(np.mean(vqa)) if vqa else None
    used = sorted({r["scoring"] for r in records if r.get("scoring")})
    if used:
        out["option_scoring"] = used
    cal = scores.calibration([r["confidence"] for r in records], [r["correct"] for r in records], n_bins)
    out["calibration"] = {k: cal[k] for k in ("ece", "mce", "brier", "n", "n_bins")}
    abl = ablation_summary(records)
    if abl:
        out["ablation"] = abl
    out["n_skipped"] = len(skipped or [])
    out["skipped"] = list(skipped or [])
    return out


# -- representation stability -------------------------------------------------------------------------


def perturb(pixel_values: torch.Tensor, kind: str, std: tuple[float, ...], noise_std: float = 0.03,
            seed: int = 0) -> torch.Tensor:
    """A slightly changed copy of normalised pixels ``(n, 3, S, S)``.

    ``noise``: Gaussian noise of ``noise_std`` in [0, 1] pixel units (0.03 ≈ 8/255), i.e. divided by
    the tower's per-channel std in normalised units; ``shift``: the image moved one pixel right
    (the first column repeated).
    """
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(pixel_values.shape, generator=g) * noise_std
        return pixel_values + noise / torch.tensor(std, dtype=pixel_values.dtype).view(1, 3, 1, 1)
    if kind == "shift":
        return torch.cat([pixel_values[..., :1], pixel_values[..., :-1]], dim=-1)
    raise ValueError(f"perturbation must be noise or shift, got {kind!r}")


def representation_stability(vlm: ExportedVLM, items: list[EvalItem], kinds=("noise", "shift"),
                             noise_std: float = 0.03, seed: int = 0) -> dict:
    """Linear CKA, per decoder layer, between the mean-pooled hidden states of the items with clean
    and perturbed images (rows = items). Layer 0 is the embedding output (text + projected image)."""
    items = [it for it in items if it.image is not None]
    if len(items) < 3:
        raise ValueError(f"representation stability needs at least 3 items with images, got {len(items)}")
    clean, perturbed = [], {k: [] for k in kinds}
    for i, it in enumerate(items):
        prompt = vlm.prompt_ids(it.prompt, 1)
        pv = vlm.pixel_values([it.image])
        clean.append(vlm.pooled_hidden_states(prompt, pv))
        for k in kinds:
            perturbed[k].append(vlm.pooled_hidden_states(prompt, perturb(pv, k, vlm.vision.std, noise_std, seed + i)))
    x = np.stack(clean)  # (N, L+1, H)
    out = {"n_items": len(items), "noise_std": noise_std, "num_layers": x.shape[1] - 1,
           "method": "linear CKA (Kornblith et al. 2019) between (N, H) matrices of mean-pooled decoder hidden "
                     "states, clean vs perturbed image, per layer (0 = embeddings)", "cka": {}}
    for k in kinds:
        y = np.stack(perturbed[k])
        out["cka"][k] = [scores.linear_cka(x[:, layer], y[:, layer]) for layer in range(x.shape[1])]
    return out


# -- CLI ------------------------------------------------------------------------------------------------


def default_output(model: Path, data: Path) -> Path:
    base = model.parent if model.name == "export" else model
    return base / "eval" / f"{data.stem}.jsonl"


def write_records(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def summary_path(records_path: Path) -> Path:
    """``eval/eval_mc.jsonl`` -> ``eval/eval_mc.summary.json`` (the sweep and the CLI write the same names)."""
    return records_path.with_name(records_path.stem + ".summary.json")


def skipped_path(records_path: Path) -> Path:
    """``eval/eval_mc.jsonl`` -> ``eval/eval_mc.skipped.jsonl``: ``{"id", "reason"}`` per item left out."""
    return records_path.with_name(records_path.stem + ".skipped.jsonl")


def read_partial(path: Path) -> list[dict]:
    """The complete records of a JSONL file written item by item; a last line cut by a crash is dropped
    (and removed from the file, so appending continues on a line boundary)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records, good = [], 0
    for line in lines:
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line) + 1
    if good < len(text):
        with open(path, "r+", encoding="utf-8") as f:
            f.truncate(len(text[:good].encode("utf-8")))
    return records


def evaluate_to(vlm: ExportedVLM, items: list[EvalItem], out: Path, max_new_tokens: int = 16,
                progress: bool = True, resume: bool = False, skipped: list[dict] | None = None,
                option_scoring: str = "first_token", ablations=ABLATIONS) -> dict:
    """Evaluate ``items``, appending each record to ``out`` as it is computed (flushed), then write the
    summary beside it (atomically: its presence means the file is complete) and return it.

    ``resume``: keep the records already in ``out`` and score only the items not in it. ``skipped``:
    items already refused when the file was read (``{"id", "reason"}``); items whose image turns out
    missing or unreadable are added; all go to ``<stem>.skipped.jsonl`` and the summary.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_partial(out) if resume else []
    done_keys = {(r["task"], r["id"]) for r in done}
    todo = [it for it in items if (it.task, it.id) not in done_keys]
    skipped = list(skipped or [])
    summary_path(out).unlink(missing_ok=True)
    with open(out, "a" if resume else "w", encoding="utf-8") as f:
        def sink(rec):
            f.write(json.dumps(rec) + "\n")
            f.flush()  # one item at a time: a crash loses at most the item being scored

        new = evaluate(vlm, todo, max_new_tokens, progress=progress, option_scoring=option_scoring,
                       ablations=ablations, sink=sink, skipped=skipped)
    summary = summarize(done + new, skipped=skipped)
    if skipped:
        skipped_path(out).write_text("".join(json.dumps(s) + "\n" for s in skipped))
    tmp = summary_path(out).with_name(summary_path(out).name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(summary_path(out))
    return summary


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (an open answer needs at least one token), got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m barnfast.evaluation.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder (<run>/export)")
    p.add_argument("--data", required=True, help="evaluation file")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--image-root", default=None, help="image folder (default: the data file's folder)")
    p.add_argument("--split", default="test", help="ScienceQA split")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16)
    p.add_argument("--option-scoring", default="first_token", choices=OPTION_SCORING,
                   help="mc / yes-no: log p of the answer's first token (first_token), the length-normalised "
                        "likelihood (mean), or, for mc, SEED-Bench's answer ranking: each option's text after the "
                        "question alone, length-normalised (rank)")
    p.add_argument("--ablation", default=",".join(ABLATIONS),
                   help="image-ablation controls, comma-separated (blank, other; '' for none)")
    p.add_argument("--output", default=None, help="JSONL of records (default: <run>/eval/<data stem>.jsonl)")
    p.add_argument("--resume", action="store_true", help="keep the records already in --output, score the rest")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ablations = tuple(a.strip() for a in args.ablation.split(",") if a.strip())
    bad = sorted(set(ablations) - set(ABLATIONS))
    if bad:
        raise SystemExit(f"--ablation: unknown {bad}; known: {', '.join(ABLATIONS)}")
    skipped: list[dict] = []
    items = load_items(args.data, args.format, args.image_root, args.split, args.limit, skipped=skipped)
    for s in skipped:
        print(f"skipped item {s['id']}: {s['reason']}")
    vlm = ExportedVLM(args.model, device=args.device)
    out = Path(args.output) if args.output else default_output(Path(args.model), Path(args.data))
    summary = evaluate_to(vlm, items, out, args.max_new_tokens, progress=not args.no_progress, resume=args.resume,
                          skipped=skipped, option_scoring=args.option_scoring, ablations=ablations)
    keys = ("n", "accuracy", "accuracy_by_task", "option_scoring", "ablation", "calibration", "n_skipped")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    print(f"records: {out}")
    if summary["n_skipped"]:
        print(f"skipped: {summary['n_skipped']} items, listed in {skipped_path(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
