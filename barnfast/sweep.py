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

Control (what makes the comparison trustworthy, checked rather than assumed):

- **One length limit** (``data.max_length``, 2048 as LLaVA-1.5) and **one set of samples**: before any
  training the sweep encodes every sample of every stage with every backbone's tokenizer and template;
  a sample that some backbone cannot take (too long, no target left) is listed with the backbone and
  the reason in ``DIR/excluded_samples.jsonl`` and dropped for every backbone (``data.exclude_samples``).
- **A run is its fingerprint** (:mod:`barnfast.training.fingerprint`): a run folder whose ``run.json``
  holds another fingerprint (another seed, lr, data, vision cache on/off, weights ...) stops the sweep
  before any training, listing each differing field; ``--overwrite NAME`` trains that run again.
- **Proof**: each run writes ``<stage>/manifest.json`` (the sample ids of every optimizer step and their
  sha256); after training the sweep compares manifests, vision-weight identities and fingerprint fields
  across the backbones of each seed and writes ``DIR/control.json`` ("controlled": true, or the exact
  list of what differs), which the report shows first.
- **Seeds**: ``--seeds 0,1,2`` trains every backbone once per seed (runs ``DIR/<backbone>-seed<k>``; with one
  seed ``DIR/<backbone>``), so the report can set backbone-vs-backbone differences against seed-vs-seed ones.

Your data and benchmarks: ``--data-stage1 / --data-stage2 / --image-root`` (LLaVA JSON) replace the
built-in set; ``--eval NAME=FORMAT:PATH[:IMAGE_ROOT]`` (repeatable; formats of
:mod:`barnfast.evaluation.formats`: pope, scienceqa, gqa, textvqa, mme, mmbench, seed, ai2d, llava,
synthetic) names the evaluation files, written to ``eval/<NAME>.jsonl``. Without ``--eval`` the built-in
evaluation sets are used, which exist only with the built-in data: a sweep on your data with neither
``--eval`` nor ``--no-eval`` stops before training and says so; an ``--eval`` file or image folder that
does not exist stops it too, naming the flag.

Refusing a second process on a busy run folder is the job of the output-folder lock (issue #18), not
of this module.

Under torchrun every rank trains every backbone together (``barnfast.train.main`` in this process;
it initialises and closes the process group per run), then rank 0 alone evaluates.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

from barnfast import train
from barnfast.training.lock import OutputDirLock

EVAL_FILES = ("eval_open.jsonl", "eval_mc.jsonl", "eval_yesno.jsonl")
# Keys of sweep.json that must match when a sweep is started again on the same folder.
CONTROLLED = ("backbones", "seed", "recipe", "max_steps", "set", "stage1_samples", "stage2_samples", "eval_samples",
              "eval_limit", "stability_items", "max_new_tokens")
# Fingerprint fields allowed to differ between the runs of one seed: what a backbone sweep varies.
VARIES_WITH_BACKBONE = ("model.backbone", "identity.backbone", "model.vision")
EXCLUDED_FILE = "excluded_samples.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m barnfast.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", required=True, help="comma-separated registry names, oldest first")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2: every backbone once per seed "
                                                 "(overrides --seed)")
    p.add_argument("--recipe", default=None, help="recipe for every backbone (default: barnfast.train's choice)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps per stage")
    p.add_argument("--model-path", default=None, help="per-backbone checkpoints: name=/path,name=/path")
    p.add_argument("--data-stage1", default=None, help="LLaVA JSON of stage 1 for every backbone")
    p.add_argument("--data-stage2", default=None, help="LLaVA JSON of stage 2 for every backbone")
    p.add_argument("--image-root", default=None, help="folder the data files' image paths are relative to")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=FORMAT:PATH[:IMAGE_ROOT]",
                   help="an evaluation file (repeatable), e.g. pope=pope:coco_pope_adversarial.json:val2014")
    p.add_argument("--overwrite", default="", metavar="NAME[,NAME]",
                   help="runs (or backbones) to train again when their folder holds another fingerprint")
    p.add_argument("--stage1-samples", type=int, default=None, help="size of the built-in stage-1 set")
    p.add_argument("--stage2-samples", type=int, default=None, help="size of the built-in stage-2 set")
    p.add_argument("--eval-samples", type=int, default=None, help="size of each built-in evaluation set")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N items of each file")
    p.add_argument("--stability-items", type=int, default=16, help="items for the CKA stability curve (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    p.add_argument("--report-to", default=None, metavar="tensorboard,wandb",
                   help="experiment trackers for every run, grouped per sweep (<sweep>/tensorboard/<run>; W&B group)")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _seeds(args: argparse.Namespace) -> list[int]:
    if not args.seeds:
        return [args.seed]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seeds expects comma-separated integers such as 0,1,2, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds must list distinct seeds, got {args.seeds!r}")
    return seeds


def parse_eval_spec(spec: str) -> dict:
    """``NAME=FORMAT:PATH[:IMAGE_ROOT]`` → {name, format, path, image_root}."""
    from barnfast.evaluation.formats import FORMATS

    name, sep, rest = spec.partition("=")
    fmt, sep2, tail = rest.partition(":")
    if not sep or not sep2 or not name.strip() or not tail:
        raise SystemExit(f"--eval expects NAME=FORMAT:PATH[:IMAGE_ROOT], got {spec!r}")
    path, _, image_root = tail.partition(":")
    if fmt not in FORMATS:
        raise SystemExit(f"--eval {spec}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"--eval {spec}: NAME must be letters, digits, '-' or '_' (it names eval/<NAME>.jsonl)")
    return {"name": name.strip(), "format": fmt, "path": str(Path(path).resolve()),
            "image_root": str(Path(image_root).resolve()) if image_root else None}


def sweep_config(args: argparse.Namespace) -> dict:
    out = Path(args.output_dir)
    seeds = _seeds(args)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    runs = [{"name": b if len(seeds) == 1 else f"{b}-seed{s}", "backbone": b, "seed": s}
            for s in seeds for b in backbones]
    data = {"stage1": args.data_stage1, "stage2": args.data_stage2, "image_root": args.image_root}
    return {
        "backbones": backbones, "seed": seeds[0], "seeds": seeds, "runs": runs,
        "recipe": args.recipe, "max_steps": args.max_steps, "set": list(args.set),
        "stage1_samples": args.stage1_samples, "stage2_samples": args.stage2_samples,
        "eval_samples": args.eval_samples, "eval_limit": args.eval_limit, "stability_items": args.stability_items,
        "max_new_tokens": args.max_new_tokens, "data_dir": str((out / "data").resolve()),
        "data": {k: str(Path(v).resolve()) if v else None for k, v in data.items()},
        "evals": [parse_eval_spec(e) for e in args.eval],
        "exclude_file": str((out / EXCLUDED_FILE).resolve()),
        "model_paths": _model_paths(args.model_path), "command": sys.argv, "report_to": args.report_to,
    }


def _model_paths(spec: str | None) -> dict[str, str]:
    if not spec:
        return {}
    pairs = [item.partition("=") for item in spec.split(",")]
    bad = [name for name, sep, path in pairs if not sep or not path]
    if bad:
        raise SystemExit(f"--model-path expects name=/path,name=/path; bad entries: {bad}")
    return {name.strip(): path.strip() for name, _, path in pairs}


def train_argv(cfg: dict, backbone: str, run_dir: Path, no_progress: bool, seed: int | None = None) -> list[str]:
    """The ``barnfast.train`` arguments of one run: identical for every backbone except the name."""
    argv = ["--backbone", backbone, "--output-dir", str(run_dir), "--seed", str(cfg["seed"] if seed is None else seed),
            "--set", f'data.synthetic_dir="{cfg["data_dir"]}"',
            # The frozen tower's features, computed once for all backbones (off: --set data.vision_cache="").
            "--vision-cache", str(Path(cfg["data_dir"]).parent / "vision_cache")]
    if cfg["recipe"]:
        argv += ["--recipe", cfg["recipe"]]
    if cfg["max_steps"] is not None:
        argv += ["--max-steps", str(cfg["max_steps"])]
    if backbone in cfg["model_paths"]:
        argv += ["--model-path", cfg["model_paths"][backbone]]
    data = cfg.get("data") or {}
    for flag, key in (("--data-stage1", "stage1"), ("--data-stage2", "stage2"), ("--image-root", "image_root")):
        if data.get(key):
            argv += [flag, data[key]]
    for key, value in (("synthetic_stage1", cfg["stage1_samples"]), ("synthetic_stage2", cfg["stage2_samples"]),
                       ("synthetic_eval", cfg["eval_samples"])):
        if value is not None:
            argv += ["--set", f"data.{key}={value}"]
    for item in cfg["set"]:
        argv += ["--set", item]
    if cfg.get("exclude_file") and Path(cfg["exclude_file"]).is_file() and Path(cfg["exclude_file"]).stat().st_size:
        argv += ["--set", f'data.exclude_samples="{cfg["exclude_file"]}"']
    if cfg.get("report_to"):
        sweep_dir = Path(cfg["data_dir"]).parent
        argv += ["--report-to", cfg["report_to"], "--set", f'train.report_group="{sweep_dir.name}"',
                 "--set", f'train.report_dir="{sweep_dir / "tensorboard" / run_dir.name}"']
    if no_progress:
        argv.append("--no-progress")
    return argv


def run_recipe(cfg: dict, run: dict, run_dir: Path):
    """The resolved recipe of one run, exactly as ``barnfast.train`` will resolve it."""
    return train.recipe_from_args(train.parse_args(train_argv(cfg, run["backbone"], run_dir, True, run["seed"])))


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


def train_one(cfg: dict, backbone: str, run_dir: Path, rank: int, no_progress: bool, seed: int | None = None) -> int:
    argv = train_argv(cfg, backbone, run_dir, no_progress, seed)
    ckpt = _latest_checkpoint(run_dir) if train_supports_resume() else None
    if ckpt is not None:
        argv.append("--resume")
        _log(rank, f"{run_dir.name}: resuming from {ckpt}")
    elif (run_dir / "metrics.jsonl").exists() and rank == 0:
        # From scratch: barnfast.train appends to metrics.jsonl, so keep the partial log aside.
        n = len(list(run_dir.glob("metrics.interrupted-*.jsonl")))
        (run_dir / "metrics.jsonl").rename(run_dir / f"metrics.interrupted-{n}.jsonl")
        _log(rank, f"{run_dir.name}: unfinished run without a checkpoint, training from scratch")
    else:
        _log(rank, f"{run_dir.name}: training")
    return train.main(argv)


# -- one set of samples for every backbone ------------------------------------------------------------


def exclusions(cfg: dict, out: Path) -> list[dict]:
    """Samples that some backbone of the sweep cannot take, per stage: ``{stage, id, backbone, reason}``.

    Every sample of every stage is encoded with every backbone's tokenizer and stage template, with
    ``<image>`` expanded to the projector's visual tokens, exactly as ``StageDataset`` will; a sample
    longer than ``data.max_length`` or left without target tokens for any backbone is listed (once, with
    the first backbone and reason). Image files are not checked here: a missing or corrupt image is
    skipped by every backbone alike (it does not depend on the tokenizer).
    """
    from barnfast.data.chat import encode_conversation
    from barnfast.data.llava import load_llava_json, validate_sample
    from barnfast.errors import SampleError
    from barnfast.models import backbones as registry
    from barnfast.models import vision as vision_registry
    from barnfast.training import trainer

    found: dict[tuple[str, str], dict] = {}
    for run in [r for r in cfg["runs"] if r["seed"] == cfg["seeds"][0]]:
        recipe = run_recipe(cfg, run, out / run["name"])
        bb = registry.from_name(recipe.model.backbone)
        tok = bb.load_tokenizer(recipe.model.model_path)
        vis = vision_registry.from_name(trainer.resolve_vision_name(recipe))
        n_img = recipe.model.perceiver_latents if recipe.model.projector == "perceiver" else vis.num_tokens
        for stage in recipe.stages:
            path, _ = trainer.stage_data(recipe, stage.name)
            template = "plain" if stage.template == "plain" else (
                bb.chat_template if stage.template == "auto" else stage.template)
            for s in load_llava_json(path):
                if (stage.name, s.id) in found:
                    continue
                try:
                    validate_sample(s)
                    ids, labels = encode_conversation(tok, template, s.conversations, image_token_id=0,
                                                      num_image_tokens=n_img, system=recipe.train.system_prompt)
                except SampleError:
                    continue  # invalid for every backbone alike: StageDataset skips and records it
                reason = None
                if len(ids) > recipe.data.max_length:
                    reason = (f"{len(ids)} tokens with {bb.name}'s tokenizer, over "
                              f"data.max_length={recipe.data.max_length}")
                elif not any(x != -100 for x in labels):
                    reason = f"no target tokens with {bb.name}'s tokenizer"
                if reason:
                    found[(stage.name, s.id)] = {"stage": stage.name, "id": s.id, "backbone": bb.name, "reason": reason}
    return list(found.values())


def write_exclusions(path: Path, rows: list[dict]) -> None:
    """Every rank writes the same bytes (atomic replace), so no rank reads a half-written list."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    tmp.replace(path)


# -- fingerprints and the control check ---------------------------------------------------------------


def check_runs(cfg: dict, out: Path, overwrite: set[str], rank: int) -> dict[str, str]:
    """Each run folder must hold this sweep's run or nothing: else stop, listing the fields (old → new),
    or empty it when the run (or its backbone) is in ``--overwrite``. Returns run name → fingerprint."""
    from barnfast.training import fingerprint as fp_lib
    from barnfast.training import trainer

    digests, refused = {}, []
    for run in cfg["runs"]:
        run_dir = out / run["name"]
        fp = trainer.fingerprint_of(run_recipe(cfg, run, run_dir))
        digests[run["name"]] = fp.digest
        try:
            fp_lib.check_run_folder(run_dir, fp, what=f"this sweep's {run['name']}")
        except fp_lib.FingerprintMismatchError as exc:
            if run["name"] in overwrite or run["backbone"] in overwrite:
                _log(rank, f"{run['name']}: holds another run; --overwrite: training it again")
                if rank == 0:
                    shutil.rmtree(run_dir)
            else:
                refused.append(f"{run['name']}: {exc}")
    if refused:
        names = ",".join(r.split(":", 1)[0] for r in refused)
        raise SystemExit("sweep stopped before training: run folders hold runs made with other settings.\n"
                         + "\n".join(refused) + f"\nTrain them again with --overwrite {names}, or use a new "
                         "--output-dir.")
    return digests


def control_check(cfg: dict, out: Path) -> dict:
    """Compare the runs of each seed: manifests (sample ids per step), vision weights, fingerprint fields.

    ``controlled`` is true when, for every seed, every stage's manifest hash, the vision identity and
    every fingerprint field but the backbone's own (``VARIES_WITH_BACKBONE``) are equal across backbones.
    """
    from barnfast.training import fingerprint as fp_lib

    per_run, differences = {}, []
    for run in cfg["runs"]:
        run_dir = out / run["name"]
        record = json.loads((run_dir / "run.json").read_text())
        manifests = {}
        for m in sorted(run_dir.glob("stage*/manifest.json")):
            body = json.loads(m.read_text())
            manifests[body["stage"]] = {k: body[k] for k in ("sha256", "num_steps", "num_samples", "num_skipped",
                                                              "num_excluded")}
        per_run[run["name"]] = {"backbone": run["backbone"], "seed": run["seed"],
                                "fingerprint": record.get("fingerprint"),
                                "backbone_identity": (record.get("fingerprint_fields") or {}).get("identity.backbone"),
                                "vision_identity": (record.get("fingerprint_fields") or {}).get("identity.vision"),
                                "manifests": manifests, "fields": record.get("fingerprint_fields") or {}}
    for seed in cfg["seeds"]:
        group = [r["name"] for r in cfg["runs"] if r["seed"] == seed]
        ref = per_run[group[0]]
        for name in group[1:]:
            other = per_run[name]
            for stage in sorted(set(ref["manifests"]) | set(other["manifests"])):
                a, b = ref["manifests"].get(stage, {}), other["manifests"].get(stage, {})
                if a.get("sha256") != b.get("sha256"):
                    differences.append({"seed": seed, "runs": [group[0], name], "what": f"{stage} sample order",
                                        "old": a, "new": b})
            for key, x, y in fp_lib.differences(ref["fields"], other["fields"]):
                if key not in VARIES_WITH_BACKBONE:
                    differences.append({"seed": seed, "runs": [group[0], name], "what": key, "old": x, "new": y})
    excluded = []
    if Path(cfg.get("exclude_file") or "").is_file():
        excluded = [json.loads(x) for x in Path(cfg["exclude_file"]).read_text().splitlines() if x.strip()]
    result = {"controlled": not differences, "differences": differences, "runs": per_run,
              "excluded_samples": excluded,
              "how": "per seed, every run's <stage>/manifest.json sha256 (the sample ids of every optimizer step, in "
                     "order), its vision tower's weights identity and every fingerprint field except "
                     f"{', '.join(VARIES_WITH_BACKBONE)} are compared with the first backbone's"}
    for r in result["runs"].values():
        r.pop("fields")
    return result


# -- evaluation ---------------------------------------------------------------------------------------


def eval_specs(cfg: dict) -> list[dict]:
    """The evaluation files of the sweep: the user's ``--eval`` ones, else the built-in three."""
    if cfg.get("evals"):
        return cfg["evals"]
    return [{"name": Path(f).stem, "format": "synthetic", "path": str(Path(cfg["data_dir"]) / f), "image_root": None}
            for f in EVAL_FILES]


def check_evals(cfg: dict, no_eval: bool) -> None:
    """Fail before training when an evaluation would need files the user did not give."""
    if no_eval:
        return
    own_data = any((cfg.get("data") or {}).get(k) for k in ("stage1", "stage2"))
    if own_data and not cfg.get("evals"):
        raise SystemExit("the sweep trains on your data (--data-stage1/--data-stage2) but has no evaluation files: "
                         "the built-in eval sets belong to the built-in data. Give --eval NAME=FORMAT:PATH"
                         "[:IMAGE_ROOT] (repeatable), or --no-eval to train only")
    from barnfast.evaluation.formats import load_items

    for e in cfg.get("evals") or []:
        flag = f"--eval {e['name']}={e['format']}:{e['path']}"
        if not Path(e["path"]).exists():
            raise SystemExit(f"{flag}: evaluation file {e['path']} does not exist")
        # MMBench's IMAGE_ROOT is where its base64 images are decoded to: it need not exist yet.
        if e["image_root"] and e["format"] != "mmbench" and not Path(e["image_root"]).is_dir():
            raise SystemExit(f"{flag}:{e['image_root']}: image folder does not exist")
        try:
            items = load_items(e["path"], e["format"], e["image_root"], limit=cfg["eval_limit"])
        except (ValueError, KeyError) as exc:
            raise SystemExit(f"{flag}: cannot be read as {e['format']}: {exc}") from exc
        missing = [it for it in items if it.image is not None and not Path(it.image).exists()]
        if missing:
            raise SystemExit(f"{flag}: {len(missing)} of {len(items)} items' images are missing (first: "
                             f"{missing[0].image}); give the image folder as {flag}:IMAGE_ROOT")


def evaluate_one(cfg: dict, backbone: str, run_dir: Path, no_progress: bool) -> dict:
    """Evaluation files and the stability curve of one finished run; existing files are kept."""
    from barnfast.evaluation import ExportedVLM, load_items
    from barnfast.evaluation import evaluate as eval_lib

    eval_dir = run_dir / "eval"
    vlm = None
    summaries = {}
    first_items = None
    for spec in eval_specs(cfg):
        out = eval_dir / f"{spec['name']}.jsonl"  # built-in: eval_open.jsonl, as `barnfast eval` names it
        items = None
        if out.exists() and eval_lib.summary_path(out).exists():
            summary = json.loads(eval_lib.summary_path(out).read_text())
        else:
            vlm = vlm or ExportedVLM(run_dir / "export")
            items = load_items(spec["path"], spec["format"], spec["image_root"], limit=cfg["eval_limit"])
            # resume: records are appended item by item, so an interrupted evaluation continues where it stopped
            summary = eval_lib.evaluate_to(vlm, items, out, cfg["max_new_tokens"], progress=not no_progress,
                                           resume=True)
        summary["format"] = spec["format"]
        if "benchmark" not in summary:  # the benchmark's own numbers: MME acc+, MMBench circular, TextVQA ...
            from barnfast.evaluation.formats import benchmark_scores

            records = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
            summary["benchmark"] = benchmark_scores(spec["format"], records)
            eval_lib.summary_path(out).write_text(json.dumps(summary, indent=2))
        summaries[spec["name"]] = summary
        if first_items is None:
            first_items = (spec, items)
    stab = eval_dir / "stability.json"
    if cfg["stability_items"] and not stab.exists() and first_items is not None:
        vlm = vlm or ExportedVLM(run_dir / "export")
        spec = first_items[0]
        items = load_items(spec["path"], spec["format"], spec["image_root"], limit=cfg["stability_items"])
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
    diffs = {k: (old.get(k), cfg[k]) for k in (*CONTROLLED, "seeds", "data", "evals")
             if k in old and old.get(k) != cfg[k]}
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
    check_evals(cfg, args.no_eval)
    # Before any training: one set of samples for every backbone, then every run folder's fingerprint.
    excluded = exclusions(cfg, out)
    write_exclusions(Path(cfg["exclude_file"]), excluded)
    if excluded:
        _log(rank, f"{len(excluded)} sample(s) some backbone cannot take are dropped for every backbone "
                   f"(reasons: {cfg['exclude_file']})")
    overwrite = {x.strip() for x in args.overwrite.split(",") if x.strip()}
    check_runs(cfg, out, overwrite, rank)
    if rank == 0 and not (out / "sweep.json").exists():
        (out / "sweep.json").write_text(json.dumps(cfg, indent=2))
    for run in cfg["runs"]:
        run_dir = out / run["name"]
        if is_finished(run_dir):
            _log(rank, f"{run['name']}: finished with this sweep's fingerprint, not trained again")
            continue
        rc = train_one(cfg, run["backbone"], run_dir, rank, args.no_progress, run["seed"])
        if rc != 0:  # preempted (SIGTERM): a checkpoint is saved; the next start resumes
            _log(rank, f"{run['name']}: training stopped with exit code {rc}; start the sweep again to resume")
            return rc
    if rank != 0:
        return 0
    control = control_check(cfg, out)
    (out / "control.json").write_text(json.dumps(control, indent=2))
    _log(rank, "controlled: yes" if control["controlled"] else
         f"controlled: NO, {len(control['differences'])} difference(s), see {out / 'control.json'}")
    if args.no_eval:
        return 0
    for run in cfg["runs"]:
        summaries = evaluate_one(cfg, run["backbone"], out / run["name"], args.no_progress)
        accs = ", ".join(f"{t} {s['accuracy']:.3f}" for t, s in summaries.items())
        _log(rank, f"{run['name']}: evaluated ({accs})")
    _log(rank, f"done; report: python -m barnfast.evaluation.analyze {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
