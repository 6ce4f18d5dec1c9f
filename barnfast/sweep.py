"""Backbone sweep under one controlled recipe: ``python -m barnfast.sweep --backbones A,B,C --output-dir DIR``.

    python -m barnfast.sweep --backbones llama1-tiny,llama2-tiny,llama3-tiny --output-dir out   # CPU, minutes
    torchrun --nproc_per_node 8 -m barnfast.sweep --backbones llama1,llama2,llama3 --output-dir out \\
        --model-path llama1=/ckpt/llama1,llama2=/ckpt/llama2,llama3=/ckpt/llama3
    python -m barnfast.evaluation.analyze out

For each backbone, stage 1, stage 2 (``barnfast.train``) and evaluation, with everything else the
same: seed (``--seed``), recipe (``--recipe``, ``--set``), data and its order (one shared data set
under ``DIR/data`` unless the ``--set data.*`` options name other files; the packing plan is a
function of the seed and the sample lengths only), samples per optimizer step, vision tower and its
features. ``DIR/sweep.json`` records that configuration; starting the sweep again with a different
one stops with the differences (start a new ``--output-dir`` instead).

Layout: ``DIR/<backbone>/`` is the run folder of ``barnfast.train`` (``run.json``, ``metrics.jsonl``,
checkpoints, ``export/``); ``DIR/<backbone>/eval/eval_{open,mc,yesno}.jsonl`` are its evaluation records
(see ``barnfast.evaluation.evaluate``), ``eval/stability.json`` the CKA of its hidden states under small image
perturbations, ``eval/eval_<task>.summary.json`` the summaries (the names ``barnfast eval`` writes).

Restarting: a run whose ``export/barnfast.json`` exists is finished and is not trained again; an
unfinished one continues from its latest checkpoint with ``barnfast.train --resume`` (from scratch
when it has no checkpoint yet; the partial ``metrics.jsonl`` is kept as ``metrics.interrupted-N.jsonl``).
An evaluation file that exists is not redone (files are written atomically).

Under torchrun every rank trains every backbone together (``barnfast.train.main`` in this process;
it initialises and closes the process group per run), then rank 0 alone evaluates.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

from barnfast import train
from barnfast.training.lock import OutputDirLock

EVAL_FILES = ("eval_open.jsonl", "eval_mc.jsonl", "eval_yesno.jsonl")
# Keys of sweep.json that must match when a sweep is started again on the same folder.
CONTROLLED = ("backbones", "seed", "recipe", "max_steps", "set", "stage1_samples", "stage2_samples", "eval_samples",
              "eval_limit", "stability_items", "max_new_tokens")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m barnfast.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", required=True, help="comma-separated registry names, oldest first")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--recipe", default=None, help="recipe for every backbone (default: barnfast.train's choice)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps per stage")
    p.add_argument("--model-path", default=None, help="per-backbone checkpoints: name=/path,name=/path")
    p.add_argument("--stage1-samples", type=int, default=None, help="size of the built-in stage-1 set")
    p.add_argument("--stage2-samples", type=int, default=None, help="size of the built-in stage-2 set")
    p.add_argument("--eval-samples", type=int, default=None, help="size of each built-in evaluation set")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N items of each file")
    p.add_argument("--stability-items", type=int, default=16, help="items for the CKA stability curve (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def sweep_config(args: argparse.Namespace) -> dict:
    out = Path(args.output_dir)
    return {
        "backbones": [b.strip() for b in args.backbones.split(",") if b.strip()], "seed": args.seed,
        "recipe": args.recipe, "max_steps": args.max_steps, "set": list(args.set),
        "stage1_samples": args.stage1_samples, "stage2_samples": args.stage2_samples,
        "eval_samples": args.eval_samples, "eval_limit": args.eval_limit, "stability_items": args.stability_items,
        "max_new_tokens": args.max_new_tokens, "data_dir": str((out / "data").resolve()),
        "model_paths": _model_paths(args.model_path), "command": sys.argv,
    }


def _model_paths(spec: str | None) -> dict[str, str]:
    if not spec:
        return {}
    pairs = [item.partition("=") for item in spec.split(",")]
    bad = [name for name, sep, path in pairs if not sep or not path]
    if bad:
        raise SystemExit(f"--model-path expects name=/path,name=/path; bad entries: {bad}")
    return {name.strip(): path.strip() for name, _, path in pairs}


def train_argv(cfg: dict, backbone: str, run_dir: Path, no_progress: bool) -> list[str]:
    """The ``barnfast.train`` arguments of one run: identical for every backbone except the name."""
    argv = ["--backbone", backbone, "--output-dir", str(run_dir), "--seed", str(cfg["seed"]),
            "--set", f'data.synthetic_dir="{cfg["data_dir"]}"',
            # The frozen tower's features, computed once for all backbones (off: --set data.vision_cache="").
            "--vision-cache", str(Path(cfg["data_dir"]).parent / "vision_cache")]
    if cfg["recipe"]:
        argv += ["--recipe", cfg["recipe"]]
    if cfg["max_steps"] is not None:
        argv += ["--max-steps", str(cfg["max_steps"])]
    if backbone in cfg["model_paths"]:
        argv += ["--model-path", cfg["model_paths"][backbone]]
    for key, value in (("synthetic_stage1", cfg["stage1_samples"]), ("synthetic_stage2", cfg["stage2_samples"]),
                       ("synthetic_eval", cfg["eval_samples"])):
        if value is not None:
            argv += ["--set", f"data.{key}={value}"]
    for item in cfg["set"]:
        argv += ["--set", item]
    if no_progress:
        argv.append("--no-progress")
    return argv


def train_supports_resume() -> bool:
    """Whether this version of ``barnfast.train`` has a ``--resume`` flag (asked at call time)."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            return bool(getattr(train.parse_args(["--resume"]), "resume", False))
        except SystemExit:
            return False


def _latest_checkpoint(run_dir: Path):
    try:
        from barnfast.training.checkpoint import latest_checkpoint
    except ImportError:
        return None
    return latest_checkpoint(run_dir / "checkpoints")


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "export" / "barnfast.json").exists()


def train_one(cfg: dict, backbone: str, run_dir: Path, rank: int, no_progress: bool) -> int:
    argv = train_argv(cfg, backbone, run_dir, no_progress)
    ckpt = _latest_checkpoint(run_dir) if train_supports_resume() else None
    if ckpt is not None:
        argv.append("--resume")
        _log(rank, f"{backbone}: resuming from {ckpt}")
    elif (run_dir / "metrics.jsonl").exists() and rank == 0:
        # From scratch: barnfast.train appends to metrics.jsonl, so keep the partial log aside.
        n = len(list(run_dir.glob("metrics.interrupted-*.jsonl")))
        (run_dir / "metrics.jsonl").rename(run_dir / f"metrics.interrupted-{n}.jsonl")
        _log(rank, f"{backbone}: unfinished run without a checkpoint, training from scratch")
    else:
        _log(rank, f"{backbone}: training")
    return train.main(argv)


def evaluate_one(cfg: dict, backbone: str, run_dir: Path, no_progress: bool) -> dict:
    """Evaluation files and the stability curve of one finished run; existing files are kept."""
    from barnfast.evaluation import ExportedVLM, load_items
    from barnfast.evaluation import evaluate as eval_lib

    eval_dir = run_dir / "eval"
    vlm = None
    summaries = {}
    for name in EVAL_FILES:
        data = Path(cfg["data_dir"]) / name
        out = eval_lib.default_output(run_dir / "export", data)  # what `barnfast eval` writes for this file
        if out.exists() and eval_lib.summary_path(out).exists():
            summary = json.loads(eval_lib.summary_path(out).read_text())
        else:
            vlm = vlm or ExportedVLM(run_dir / "export")
            items = load_items(data, "synthetic", limit=cfg["eval_limit"])
            summary = eval_lib.evaluate_to(vlm, items, out, cfg["max_new_tokens"], progress=not no_progress)
        summaries[data.stem] = summary
    stab = eval_dir / "stability.json"
    if cfg["stability_items"] and not stab.exists():
        vlm = vlm or ExportedVLM(run_dir / "export")
        items = load_items(Path(cfg["data_dir"]) / "eval_open.jsonl", "synthetic", limit=cfg["stability_items"])
        tmp = stab.with_name(stab.name + ".tmp")
        tmp.write_text(json.dumps(eval_lib.representation_stability(vlm, items), indent=2))
        tmp.replace(stab)
    (eval_dir / "summary.json").write_text(json.dumps(summaries, indent=2))
    return summaries


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[sweep] {msg}", flush=True)


def check_config(path: Path, cfg: dict) -> None:
    if not path.exists():
        return
    old = json.loads(path.read_text())
    diffs = {k: (old.get(k), cfg[k]) for k in CONTROLLED if old.get(k) != cfg[k]}
    if diffs:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
        raise SystemExit(f"{path} records a different sweep ({lines}); use a new --output-dir")


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = sweep_config(args)
    if not cfg["backbones"]:
        raise SystemExit("--backbones is empty")
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One sweep per folder; the lock is released when main returns (the object is dropped) or the process exits.
    _lock = OutputDirLock(out, "barnfast sweep").acquire() if rank == 0 else None  # noqa: F841
    check_config(out / "sweep.json", cfg)
    if rank == 0 and not (out / "sweep.json").exists():
        (out / "sweep.json").write_text(json.dumps(cfg, indent=2))
    for backbone in cfg["backbones"]:
        run_dir = out / backbone
        if is_finished(run_dir):
            _log(rank, f"{backbone}: finished, not trained again")
            continue
        rc = train_one(cfg, backbone, run_dir, rank, args.no_progress)
        if rc != 0:  # preempted (SIGTERM): a checkpoint is saved; the next start resumes
            _log(rank, f"{backbone}: training stopped with exit code {rc}; start the sweep again to resume")
            return rc
    if rank != 0 or args.no_eval:
        return 0
    for backbone in cfg["backbones"]:
        summaries = evaluate_one(cfg, backbone, out / backbone, args.no_progress)
        accs = ", ".join(f"{t} {s['accuracy']:.3f}" for t, s in summaries.items())
        _log(rank, f"{backbone}: evaluated ({accs})")
    _log(rank, f"done; report: python -m barnfast.evaluation.analyze {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
