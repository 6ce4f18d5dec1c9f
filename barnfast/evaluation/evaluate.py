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

- ``mc`` (ScienceQA / MMBench / SEED style): the log-likelihood of each option letter as the
  assistant's answer (the answer tokens and the end-of-turn token, summed); the prediction is the
  arg-max, ``option_probs`` the softmax over the options, ``confidence`` the prediction's share.
- ``yesno`` (POPE / MME style): the same over the two answers, where each answer's likelihood is the
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
import torch
from tqdm.auto import tqdm

from barnfast.evaluation import scores
from barnfast.evaluation.exported import ExportedVLM
from barnfast.evaluation.formats import FORMATS, EvalItem, load_items

YES_NO_SPELLINGS = {"yes": ("yes", "Yes"), "no": ("no", "No")}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def score_choices(vlm: ExportedVLM, item: EvalItem, pixel_values, choices: dict[str, tuple[str, ...]]) -> dict:
    """Probabilities of ``choices`` (label → spellings) as the answer: a spelling's likelihood is its
    answer tokens' summed log-probability; a label's is the sum over its spellings; softmax over labels."""
    prompt = vlm.prompt_ids(item.prompt, 1 if item.image is not None else 0)
    n_img = 1 if item.image is not None else 0
    flat = [(label, s) for label, spellings in choices.items() for s in spellings]
    conts = [vlm.answer_ids(item.prompt, s, n_img) for _, s in flat]
    lps = vlm.continuation_logprobs(prompt, conts, pixel_values)
    per_label: dict[str, list[float]] = defaultdict(list)
    for (label, _), lp in zip(flat, lps):
        per_label[label].append(float(lp.sum()))
    labels = list(choices)
    totals = np.array([np.logaddexp.reduce(per_label[label]) for label in labels])
    probs = _softmax(totals)
    best = int(probs.argmax())
    return {"prediction": labels[best], "confidence": float(probs[best]),
            "option_probs": {label: float(p) for label, p in zip(labels, probs)},
            "option_logprobs": {label: float(t) for label, t in zip(labels, totals)}}


def score_item(vlm: ExportedVLM, item: EvalItem, max_new_tokens: int = 16) -> dict:
    """The record of one item (see the module docstring)."""
    pv = vlm.pixel_values([item.image]) if item.image is not None else None
    rec = {"id": item.id, "task": item.task, "category": item.category, "answer": item.answer}
    if item.task == "mc":
        out = score_choices(vlm, item, pv, {k: (k,) for k in item.options})
        rec.update(out, correct=out["prediction"] == item.answer)
    elif item.task == "yesno":
        out = score_choices(vlm, item, pv, YES_NO_SPELLINGS)
        rec.update(out, correct=out["prediction"] == item.answer)
    else:
        prompt = vlm.prompt_ids(item.prompt, 1 if pv is not None else 0)
        ids, logps, stopped = vlm.greedy(prompt, pv, max_new_tokens=max_new_tokens)
        pred = vlm.decode(ids)
        refs = item.answers or [item.answer]
        rec.update(prediction=pred, correct=scores.exact_match(pred, [item.answer, *refs]),
                   confidence=float(math.exp(np.mean(logps))), option_probs=None, answer_logprobs=logps,
                   stopped=stopped, vqa_accuracy=scores.vqa_accuracy(pred, refs) if len(refs) > 1 else None)
    return rec


def evaluate(vlm: ExportedVLM, items: list[EvalItem], max_new_tokens: int = 16, progress: bool = True) -> list[dict]:
    return [score_item(vlm, it, max_new_tokens) for it in tqdm(items, disable=not progress, desc="eval")]


def summarize(records: list[dict], n_bins: int = 15) -> dict:
    """Accuracy overall / per task / per category, POPE metrics (yes/no), exact match and VQA accuracy
    (open), calibration (ECE, MCE, Brier over ``n_bins`` equal-width bins)."""
    if not records:
        raise ValueError("no records to summarise")
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
    cal = scores.calibration([r["confidence"] for r in records], [r["correct"] for r in records], n_bins)
    out["calibration"] = {k: cal[k] for k in ("ece", "mce", "brier", "n", "n_bins")}
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
    tmp.replace(path)  # a complete file or none: the sweep treats an existing file as done


def summary_path(records_path: Path) -> Path:
    """``eval/eval_mc.jsonl`` -> ``eval/eval_mc.summary.json`` (the sweep and the CLI write the same names)."""
    return records_path.with_name(records_path.stem + ".summary.json")


def evaluate_to(vlm: ExportedVLM, items: list[EvalItem], out: Path, max_new_tokens: int = 16,
                progress: bool = True) -> dict:
    """Evaluate ``items``, write the records to ``out`` and the summary beside it; return the summary."""
    records = evaluate(vlm, items, max_new_tokens, progress=progress)
    summary = summarize(records)
    write_records(records, out)
    summary_path(out).write_text(json.dumps(summary, indent=2))
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m barnfast.evaluation.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder (<run>/export)")
    p.add_argument("--data", required=True, help="evaluation file")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--image-root", default=None, help="image folder (default: the data file's folder)")
    p.add_argument("--split", default="test", help="ScienceQA split")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--output", default=None, help="JSONL of records (default: <run>/eval/<data stem>.jsonl)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    items = load_items(args.data, args.format, args.image_root, args.split, args.limit)
    vlm = ExportedVLM(args.model, device=args.device)
    out = Path(args.output) if args.output else default_output(Path(args.model), Path(args.data))
    summary = evaluate_to(vlm, items, out, args.max_new_tokens, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("n", "accuracy", "accuracy_by_task", "calibration")}, indent=2))
    print(f"records: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
