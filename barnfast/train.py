"""LLaVA-1.5 two-stage training: ``python -m barnfast.train`` or ``torchrun -m barnfast.train``.

    python -m barnfast.train --backbone llama1-tiny --output-dir out      # CPU, built-in data, minutes
    torchrun --nproc_per_node 8 -m barnfast.train --backbone llama3 --model-path /ckpt/llama3 \\
        --data-stage1 blip_558k.json --data-stage2 llava_665k.json --image-root /data --output-dir out

Stage 1 trains the projector on captions, stage 2 the projector and the LLM on instructions. The
global batch is counted in samples and is the same whatever the number of processes; each rank
runs its share as packed micro-batches and the loss of a step is the mean over all its target
tokens (the normaliser is the global target count, all-reduced on device).

Writes under ``--output-dir``: ``run.json`` (resolved config, versions, git revision),
``metrics.jsonl`` (one line per step), ``<stage>/skipped_samples.jsonl``, ``<stage>/checkpoint.pt``
and ``export/`` (a Hugging Face ``LlavaForConditionalGeneration`` folder).

This module is the command line only (``barnfast train`` is the same): it parses the arguments and
resolves the recipe without importing torch, then hands over to :mod:`barnfast.training.trainer`.
"""

from __future__ import annotations

import argparse

from barnfast.config import Recipe, load_recipe
from barnfast.errors import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m barnfast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="recipe name or .toml path (default: llava15, or llava15-tiny "
                                                   "for a -tiny backbone)")
    p.add_argument("--backbone", default=None, help="backbone registry name, e.g. llama1, llama3, llama3-tiny")
    p.add_argument("--model-path", default=None, help="local Hugging Face checkpoint folder of the LLM")
    p.add_argument("--vision", default=None, help="vision tower registry name (default: clip-l-336 / its tiny twin)")
    p.add_argument("--vision-path", default=None, help="local folder of the vision tower's weights")
    p.add_argument("--projector", default=None, choices=["mlp2x_gelu", "linear", "perceiver"],
                   help="vision-language projector (default: the recipe's, mlp2x_gelu)")
    p.add_argument("--s2", nargs="?", const="1,2", default=None, metavar="SCALES",
                   help="S2 multi-scale vision features: --s2 (scales 1,2) or --s2 1,2,3")
    p.add_argument("--vision-cache", default=None, metavar="DIR",
                   help="cache of the frozen tower's features per image, shared by stages and backbones")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--data-stage1", default=None, help="LLaVA JSON of stage 1 (default: built-in synthetic)")
    p.add_argument("--data-stage2", default=None, help="LLaVA JSON of stage 2 (default: built-in synthetic)")
    p.add_argument("--image-root", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--token-budget", type=int, default=None, help="tokens per packed micro-batch")
    p.add_argument("--no-packing", action="store_true", help="padded micro-batches, the LLaVA way (comparison)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps per stage")
    p.add_argument("--max-skip-fraction", type=float, default=None, help="fail when more samples are bad (0.01)")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages to run, e.g. stage2")
    p.add_argument("--kernel-backend", default=None, choices=["auto", "triton", "torch"])
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--checkpoint-every", type=int, default=None, help="save a checkpoint every N optimizer steps")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-to", default=None, metavar="tensorboard,wandb",
                   help="experiment trackers for the metrics (optional extra: pip install 'barnfast[tracking]')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any recipe field, e.g. --set stage2.lr=1e-4 --set train.dtype=fp32 (TOML value syntax)")
    return p.parse_args(argv)


def _parse_value(text: str):
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _parse_scales(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--s2 expects comma-separated integer scales such as 1,2,3, got {text!r}") from None


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    backbone = args.backbone
    name = args.recipe or ("llava15-tiny" if backbone and backbone.endswith("-tiny") else "llava15")
    overrides = {
        "model.backbone": backbone, "model.model_path": args.model_path, "model.vision": args.vision,
        "model.vision_path": args.vision_path, "output_dir": args.output_dir, "model.projector": args.projector,
        "model.s2_scales": None if args.s2 is None else _parse_scales(args.s2),
        "data.vision_cache": args.vision_cache,
        "data.stage1_data": args.data_stage1, "data.stage2_data": args.data_stage2, "data.image_root": args.image_root,
        "data.max_skip_fraction": args.max_skip_fraction, "train.seed": args.seed,
        "train.token_budget": args.token_budget, "train.packing": False if args.no_packing else None,
        "train.kernel_backend": args.kernel_backend, "stages.max_steps": args.max_steps,
        "train.checkpoint_every": args.checkpoint_every,
        "train.report_to": None if args.report_to is None else [x.strip() for x in args.report_to.split(",")
                                                                  if x.strip() and x.strip() != "none"],
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _parse_value(value.strip())
    recipe = load_recipe(name, overrides)
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        known = [s.name for s in recipe.stages]
        unknown = [w for w in wanted if w not in known]
        if unknown or not wanted:  # a typo would otherwise train nothing and export the untrained model
            raise ConfigError(f"--stages: {', '.join(unknown) or repr(args.stages)} is not a stage of the recipe; "
                              f"its stages are {', '.join(known)}")
        recipe.stages = [s for s in recipe.stages if s.name in wanted]
    return recipe


def main(argv=None) -> int:
    args = parse_args(argv)  # before any heavy import: --help and argument errors are instant
    recipe = recipe_from_args(args)
    from barnfast.training import trainer  # torch, transformers and the model code

    return trainer.run(recipe, resume=args.resume, show_progress=not args.no_progress)


if __name__ == "__main__":
    raise SystemExit(main())
