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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from . import backbones, distributed, packing
from . import vision as vision_registry
from .config import Recipe, load_recipe
from .data.llava import load_llava_json
from .data.synthetic import ensure_synthetic
from .dataset import MicroBatches, StageDataset
from .export import export_hf
from .model import build_model
from .runinfo import write_run_record


def lr_at(step: int, total_steps: int, base_lr: float, warmup_ratio: float) -> float:
    """Cosine schedule with linear warm-up (LLaVA-1.5: 3%), a pure function of the step (0-based)."""
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_vision_name(recipe: Recipe) -> str:
    name = recipe.model.vision
    bb = backbones.from_name(recipe.model.backbone)
    if name == "auto":
        name = "clip-l-336"
        if bb.tiny:
            name = vision_registry.from_name(name).tiny_twin
    return name


def stage_data(recipe: Recipe, stage_name: str) -> tuple[Path, Path]:
    """(data file, image root) of a stage; the built-in synthetic set is generated on first use."""
    given = recipe.data.stage1_data if stage_name == "stage1" else recipe.data.stage2_data
    if given is not None:
        path = Path(given)
        return path, Path(recipe.data.image_root) if recipe.data.image_root else path.parent
    root = Path(recipe.data.synthetic_dir or Path(recipe.output_dir) / "data")
    ensure_synthetic(root, num_stage1=recipe.data.synthetic_stage1, num_stage2=recipe.data.synthetic_stage2,
                     num_eval=recipe.data.synthetic_eval, seed=0)
    return root / f"{stage_name}.json", root


class Trainer:
    """Builds the model once and runs the recipe's stages on it."""

    def __init__(self, recipe: Recipe, dist_info: distributed.DistInfo, show_progress: bool = True):
        self.recipe = recipe
        self.dist = dist_info
        self.show_progress = show_progress and dist_info.is_main
        self.out = Path(recipe.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = dist_info.device
        self.backbone = backbones.from_name(recipe.model.backbone)
        self.vision = vision_registry.from_name(resolve_vision_name(recipe))
        seed_everything(recipe.train.seed)
        self.model, self.tokenizer = build_model(
            self.backbone, self.vision, model_path=recipe.model.model_path, vision_path=recipe.model.vision_path,
            seed=recipe.train.seed, projector_approximate=recipe.model.projector_approximate,
            pad_vocab_to_multiple_of=recipe.model.pad_vocab_to_multiple_of,
            kernel_backend=recipe.train.kernel_backend,
        )
        self.model.to(self.device)
        use_bf16 = recipe.train.dtype == "bf16" or (recipe.train.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        self.max_length = recipe.train.max_length or self.backbone.max_position_embeddings
        self.metrics_path = self.out / "metrics.jsonl"
        self.samples_seen = 0
        if self.dist.is_main:
            write_run_record(self.out / "run.json", recipe.to_dict(), self.dist.world_size, self.device)

    # -- data ---------------------------------------------------------------------------------
    def build_dataset(self, stage) -> StageDataset:
        path, image_root = stage_data(self.recipe, stage.name)
        template = "plain" if stage.template == "plain" else (
            self.backbone.chat_template if stage.template == "auto" else stage.template)
        stage_dir = self.out / stage.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        return StageDataset(
            load_llava_json(path), tokenizer=self.tokenizer, template=template,
            image_token_id=self.model.image_token_id, vision=self.vision, image_root=image_root,
            max_length=self.max_length, image_aspect=self.recipe.data.image_aspect,
            max_skip_fraction=self.recipe.data.max_skip_fraction,
            skipped_path=stage_dir / "skipped_samples.jsonl" if self.dist.is_main else None,
            show_progress=self.show_progress, pad_id=self.tokenizer.pad_token_id or 0,
        )

    def plan(self, data: StageDataset, stage, epoch: int) -> packing.EpochPlan:
        """The epoch's plan; a last step with fewer samples than ranks is dropped (it cannot be split)."""
        n, W = len(data.lengths), self.dist.world_size
        plan = packing.plan_epoch(data.lengths, global_batch=stage.global_batch,
                                  token_budget=self.recipe.train.token_budget, world_size=W,
                                  seed=self.recipe.train.seed, epoch=epoch,
                                  drop_last=0 < n % stage.global_batch < W)
        over = int((data.lengths > self.recipe.train.token_budget).sum())
        if over and self.dist.is_main and epoch == 0:
            warnings.warn(f"{stage.name}: {over} sample(s) are longer than train.token_budget="
                          f"{self.recipe.train.token_budget} and get a micro-batch each; raise --token-budget "
                          f"(longest: {int(data.lengths.max())} tokens)", stacklevel=2)
        return plan

    def micro_batches(self, plan: packing.EpochPlan, lengths: np.ndarray, step: int) -> list[np.ndarray]:
        """This rank's micro-batches of a step: packed by the planner, or fixed-size padded ones."""
        if self.recipe.train.packing:
            return plan.micro_batches(step, self.dist.rank)
        mine = plan.step_samples(step)[self.dist.rank::self.dist.world_size]
        k = self.recipe.train.micro_batch_size
        return [mine[i:i + k] for i in range(0, len(mine), k)]

    # -- one stage ----------------------------------------------------------------------------
    def run_stage(self, stage) -> list[dict]:
        r, d = self.recipe, self.dist
        seed_everything(r.train.seed)
        self.model.set_trainable(projector=True, llm=stage.train_llm)
        data = self.build_dataset(stage)
        plan = self.plan(data, stage, epoch=0)
        total = plan.num_steps * stage.epochs
        if stage.max_steps is not None:
            total = min(total, stage.max_steps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        module = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if d.enabled else self.model
        opt = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.999), weight_decay=stage.weight_decay)
        bar = tqdm(total=total, desc=stage.name, disable=not self.show_progress, dynamic_ncols=True)
        history = []
        step = 0
        for epoch in range(stage.epochs):
            if epoch:
                plan = self.plan(data, stage, epoch=epoch)
            loader = self._loader(data, plan, data.lengths, min(plan.num_steps, total - step))
            for mbs in loader:
                rec = self.train_step(module, opt, params, stage, mbs, step, total)
                rec["epoch"] = epoch
                history.append(rec)
                if d.is_main and step % r.train.log_every == 0:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
                step += 1
                if step >= total:
                    break
            if step >= total:
                break
        bar.close()
        self.save_checkpoint(stage, opt, step)
        return history

    def _loader(self, data: StageDataset, plan, lengths, num_steps: int):
        """Yields, per step, the list of this rank's micro-batches (built in DataLoader workers)."""
        per_step = [self.micro_batches(plan, lengths, s) for s in range(num_steps)]
        flat = [mb for mbs in per_step for mb in mbs]
        ds = MicroBatches(data, flat, packed=self.recipe.train.packing)
        nw = self.recipe.data.num_workers
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=nw,
                                             persistent_workers=False, prefetch_factor=4 if nw else None,
                                             pin_memory=self.device.type == "cuda")
        it = iter(loader)
        for mbs in per_step:
            yield [next(it) for _ in mbs]

    def train_step(self, module, opt, params, stage, batches, step: int, total: int) -> dict:
        d = self.dist
        t0 = time.perf_counter()
        batches = [b.to(self.device) for b in batches]
        # The loss normaliser: target tokens of the whole global batch, counted and reduced on device.
        local_targets = torch.stack([b.num_targets for b in batches]).sum().float()
        global_targets = distributed.all_reduce_sum(local_targets.clone(), d)
        # DDP averages gradients over ranks; dividing by global/world makes the result a global mean.
        normaliser = (global_targets / d.world_size).clamp(min=1.0)
        lr = lr_at(step, total, stage.lr, stage.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if (last or not d.enabled) else module.no_sync()
            with sync, self.autocast:
                loss = module(b, normaliser)
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_loss = distributed.all_reduce_sum(loss_sum, d) / d.world_size
        real = torch.tensor(float(sum(int(b.cu_seqlens[-1]) if hasattr(b, "cu_seqlens") else
                                      int(b.attention_mask.sum()) for b in batches)), device=self.device)
        computed = torch.tensor(float(sum(b.num_tokens for b in batches)), device=self.device)
        n_samples = torch.tensor(float(sum(len(b.sample_ids) for b in batches)), device=self.device)
        stats = distributed.all_reduce_sum(torch.stack([real, computed, n_samples]), d).tolist()
        dt = time.perf_counter() - t0
        self.samples_seen += int(stats[2])
        return {
            "step": step, "stage": stage.name, "loss": step_loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
            "tokens": int(stats[0]), "tokens_per_s": stats[0] / dt, "padding_efficiency": stats[0] / stats[1],
            "micro_batches": len(batches), "samples_seen": self.samples_seen, "step_time_s": dt,
            "target_tokens": int(global_targets.item()),
        }

    def save_checkpoint(self, stage, opt, step: int) -> None:
        """End-of-stage checkpoint: the trainable parameters, the optimizer state and the step."""
        if not self.dist.is_main:
            return
        trainable = {n: p.detach().cpu() for n, p in self.model.hf.named_parameters() if p.requires_grad}
        torch.save({"stage": stage.name, "step": step, "model": trainable, "optimizer": opt.state_dict()},
                   self.out / stage.name / "checkpoint.pt")

    def export(self) -> Path:
        dest = self.out / "export"
        if self.dist.is_main:
            export_hf(self.model, self.tokenizer, dest, meta={
                "backbone": self.backbone.name, "chat_template": self.backbone.chat_template,
                "stop_tokens": list(self.backbone.stop_tokens), "image_aspect": self.recipe.data.image_aspect,
                "seed": self.recipe.train.seed,
            })
        distributed.barrier(self.dist)
        return dest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m barnfast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="recipe name or .toml path (default: llava15, or llava15-tiny "
                                                   "for a -tiny backbone)")
    p.add_argument("--backbone", default=None, help="backbone registry name, e.g. llama1, llama3, llama3-tiny")
    p.add_argument("--model-path", default=None, help="local Hugging Face checkpoint folder of the LLM")
    p.add_argument("--vision", default=None, help="vision tower registry name (default: clip-l-336 / its tiny twin)")
    p.add_argument("--vision-path", default=None, help="local folder of the vision tower's weights")
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
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any recipe field, e.g. --set stage2.lr=1e-4 --set train.dtype=fp32 (TOML value syntax)")
    return p.parse_args(argv)


def _parse_value(text: str):
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    backbone = args.backbone
    name = args.recipe or ("llava15-tiny" if backbone and backbone.endswith("-tiny") else "llava15")
    overrides = {
        "model.backbone": backbone, "model.model_path": args.model_path, "model.vision": args.vision,
        "model.vision_path": args.vision_path, "output_dir": args.output_dir,
        "data.stage1_data": args.data_stage1, "data.stage2_data": args.data_stage2, "data.image_root": args.image_root,
        "data.max_skip_fraction": args.max_skip_fraction, "train.seed": args.seed,
        "train.token_budget": args.token_budget, "train.packing": False if args.no_packing else None,
        "train.kernel_backend": args.kernel_backend, "stages.max_steps": args.max_steps,
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _parse_value(value.strip())
    recipe = load_recipe(name, overrides)
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",")]
        recipe.stages = [s for s in recipe.stages if s.name in wanted]
    return recipe


def main(argv=None) -> int:
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    backbones.from_name(recipe.model.backbone)  # unknown name → error listing the known ones, before any work
    info = distributed.init_distributed()
    try:
        trainer = Trainer(recipe, info, show_progress=not args.no_progress)
        for stage in recipe.stages:
            trainer.run_stage(stage)
        trainer.export()
    finally:
        distributed.close(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
