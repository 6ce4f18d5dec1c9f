"""Why the tiny demo does not learn yes/no: the same comparison given as a sentence, as an image, and both.

    python -m bench.demo_comparison [--backbone llama1-tiny] [--samples 16384] [--question yesno|mc|open]
                                    [--kinds text,image,both] [--out DIR] [--results-dir DIR]

Writes stage-2 files of colour questions about the same kind of scene (``--question yesno``: balanced
yes/no, the comparison of a word with the scene; ``mc``: the colour among four lettered options, the
comparison and the letter binding; ``open``: "What colour are the shapes in the image?"):

- ``text``: the scene as a sentence, no image: ``Two red circles on the left.`` then ``Are the shapes
  in the image red?``;
- ``image``: the scene as the built-in generator draws it, the same questions after ``<image>``;
- ``both``: the image, and in half of the samples (drawn at random) the sentence too, between the image
  and the question.

and trains ``--backbone`` on each with ``barnfast train`` (the tiny recipe: stage 1 on the built-in
captions, then stage 2 on the file for one epoch). Each stage-2 sample is seen once, so the training loss
before each step is a held-out loss. The first table gives the mean loss per target token (the answer and
the stop token; chance is ln 2 / 2 = 0.347 for yes/no, ln 4 / 2 for multiple choice, ln 7 / 2 for open) over windows of
256 steps. The second scores every run on 200 held-out items given as the image alone (no sentence), with
``barnfast eval``'s ablation controls (a blank image, another item's image). Both are written under
bench/results/. Not a test: ~10 minutes on 2 CPU cores (three runs).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from barnfast.data import synthetic as S
from bench.harness import Table, write_results

WINDOW = 256
KINDS = ("text", "image", "both")
HELD_OUT = 200
SENTENCE_SHARE = 0.5  # of the "both" samples


def _item(i: int, seed: int, question: str, size: int, images: Path | None) -> dict:
    """One scene's sentence, prompt, answer and (when ``images`` is given) its drawn image."""
    rng = np.random.default_rng([seed, i])
    scene = S._scene(rng)
    options = None
    if question == "yesno":
        yes = bool(rng.random() < 0.5)
        text = S._yesno_question(scene, "colour", S._yesno_value(scene, "colour", yes, rng))
        answer, prompt = "yes" if yes else "no", None
    elif question == "mc":
        options, answer = S._mc_options(scene, "colour", rng)
        text = S._mc_question("colour")
        prompt = S._mc_prompt(text, options)
    else:
        text, answer, prompt = "What colour are the shapes in the image?", scene["colour"], None
    item = {"sentence": S.caption(scene, rng), "question": text, "prompt": prompt or f"{text}\n{S.SHORT_ANSWER}",
            "answer": answer, "options": options, "image": None}
    if images is not None:
        item["image"] = f"images/{seed}_{i:05d}.png"
        S.draw_scene(scene, size, rng).save(images.parent / item["image"])
    return item


def write_stage2(out: Path, kind: str, n: int, seed: int = 0, size: int = 64, question: str = "yesno") -> Path:
    """``out/<kind>.json``: n colour questions (see the module docstring), LLaVA format."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    pick = np.random.default_rng([seed, 1 << 20])  # which "both" samples carry the sentence
    records = []
    for i in range(n):
        it = _item(i, seed, question, size, None if kind == "text" else out / "images")
        record = {"id": f"{kind}_{i:05d}"}
        if kind == "text":
            human = f"{it['sentence']}\n{it['prompt']}"
        else:
            record["image"] = it["image"]
            with_sentence = kind == "both" and pick.random() < SENTENCE_SHARE
            human = f"<image>\n{it['sentence']}\n{it['prompt']}" if with_sentence else f"<image>\n{it['prompt']}"
        record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": it["answer"]}]
        records.append(record)
    path = out / f"{kind}.json"
    path.write_text(json.dumps(records))
    return path


def write_held_out(out: Path, n: int = HELD_OUT, seed: int = 1, size: int = 64, question: str = "yesno") -> Path:
    """``out/held_out.jsonl``: n items in the built-in eval format, the image alone (other scenes: seed 1)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        it = _item(i, seed, question, size, out / "images")
        rec = {"question_id": f"held_{i:05d}", "image": it["image"], "question": it["question"],
               "prompt": it["prompt"], "answer": it["answer"], "category": "colour",
               "task": question}
        if question == "open":
            rec["answers"] = [it["answer"]] * 10
        if question == "mc":
            rec["options"] = it["options"]
        records.append(rec)
    path = out / "held_out.jsonl"
    path.write_text(S._jsonl(records))
    return path


def windows(metrics: Path) -> list[float]:
    """Mean stage-2 loss per window of WINDOW steps."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("stage") == "stage2"]
    return [float(np.mean(losses[a:a + WINDOW])) for a in range(0, len(losses), WINDOW)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="llama1-tiny")
    ap.add_argument("--samples", type=int, default=16384, help="stage-2 samples per file (one epoch of 8 per step)")
    ap.add_argument("--out", help="work folder (default: a temporary one)")
    ap.add_argument("--question", choices=("yesno", "mc", "open"), default="yesno",
                    help="colour yes/no or multiple choice (comparisons), or the open colour question (reading only)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="which runs, comma-separated (text, image, both)")
    ap.add_argument("--results-dir", help="where the tables go (default: bench/results)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    args = ap.parse_args(argv)
    if args.samples < 8:
        ap.error(f"--samples: one step takes 8 samples, got {args.samples}")
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        ap.error(f"--kinds: give some of {', '.join(KINDS)}, got {args.kinds!r}")
    out = Path(args.out or tempfile.mkdtemp(prefix="barnfast-demo-comparison-"))
    held_out = write_held_out(out / "data", question=args.question)
    curves, scores = {}, {}
    for kind in kinds:
        data = write_stage2(out / "data", kind, args.samples, question=args.question)
        run = out / f"run-{kind}"
        cmd = [sys.executable, "-m", "barnfast.train", "--backbone", args.backbone, "--output-dir", str(run),
               "--data-stage2", str(data), "--image-root", str(data.parent), "--set", "stage2.epochs=1",
               "--set", "data.synthetic_eval=1", "--no-progress"]
        cmd += [x for kv in args.set for x in ("--set", kv)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        curves[kind] = windows(run / "metrics.jsonl")
        scored = run / "eval" / "held_out.jsonl"
        subprocess.run([sys.executable, "-m", "barnfast.evaluation.evaluate", "--model", str(run / "export"),
                        "--data", str(held_out), "--output", str(scored), "--no-progress"], check=True)
        summary = json.loads(scored.with_suffix(".summary.json").read_text())
        scores[kind] = next(iter(summary["ablation"].values()))
    chance = math.log({"yesno": 2, "mc": 4, "open": len(S.COLOURS)}[args.question]) / 2
    loss = Table(f"{args.backbone}: stage-2 loss per target token, colour {args.question} (chance {chance:.3f})",
                 ["steps", *(f"{k}" for k in kinds)])
    for w in range(max(len(c) for c in curves.values())):
        loss.add(f"{w * WINDOW}-{(w + 1) * WINDOW - 1}", *(curves[k][w] if w < len(curves[k]) else None for k in kinds))
    loss.notes += [f"override: {kv}" for kv in args.set]
    loss.notes.append(f"{args.samples} samples per file, one epoch, 8 samples per step (the tiny recipe's stage 2); "
                      f"'both': the sentence in {SENTENCE_SHARE:.0%} of the samples")
    loss.notes.append(f"work folder: {out}")
    held = Table(f"{args.backbone}: {HELD_OUT} held-out colour {args.question} items, the image alone",
                 ["trained on", "right image", "blank image", "another item's image"])
    for k in kinds:
        held.add(k, scores[k]["image"], scores[k]["blank"], scores[k]["other"])
    held.notes.append("accuracy (open: exact match); chance is 0.5 for yes/no, 0.25 for multiple choice")
    write_results([loss, held], "cpu", f"demo_comparison_{args.question}",
                  Path(args.results_dir) if args.results_dir else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
