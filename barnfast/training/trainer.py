"""The train loop of ``barnfast train``: one Trainer runs a recipe's stages on one or many processes.

Stage 1 trains the projector on captions, stage 2 the projector and the LLM on instructions. The
global batch is counted in samples and is the same whatever the number of processes; each rank
runs its share as packed micro-batches and the loss of a step is the mean over all its target
tokens (the normaliser is the global target count, all-reduced on device). The command line is
:mod:`barnfast.train`; :func:`run` is what it calls once the recipe is resolved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from barnfast.config import Recipe
from barnfast.data import packing
from barnfast.data.dataset import MicroBatches, StageDataset, TooManySkippedError
from barnfast.data.llava import load_llava_json
from barnfast.data.synthetic import ensure_synthetic
from barnfast.data.vision_cache import VisionFeatureCache
from barnfast.data.vision_cache import settings_for as vision_cache_settings
from barnfast.errors import ConfigError
from barnfast.models import backbones
from barnfast.models import vision as vision_registry
from barnfast.models.export import export_hf
from barnfast.models.s2 import input_size as s2_input_size
from barnfast.models.vlm import build_model
from barnfast.training import checkpoint, distributed
from barnfast.training import fingerprint as fingerprint_lib
from barnfast.training import flops as flops_lib
from barnfast.training.lock import OutputDirLock
from barnfast.training.parallel import gradient_sync
from barnfast.training.runinfo import write_run_record


def lr_at(step: int, total_steps: int, base_lr: float, warmup_ratio: float) -> float:
    """Cosine schedule with linear warm-up (LLaVA-1.5: 3%), a pure function of the step (0-based).

    Exactly transformers' ``get_cosine_schedule_with_warmup`` as LLaVA's HF Trainer drives it: warm-up
    steps ``ceil(total * warmup_ratio)`` (``TrainingArguments.get_warmup_steps``), ``lr = base * step /
    warmup`` during warm-up, so step 0 runs at lr 0 (LLaVA-1.5 stage 2, 665,298 / 128 = 5198 steps: 156 warm-up steps),
    then ``0.5 * (1 + cos(pi * progress))``, clamped at 0.
    """
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return base_lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


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


def stage_files(recipe: Recipe) -> dict[str, tuple[Path, Path, bool]]:
    """Stage name → (data file, image root, built-in synthetic?) for every stage of the recipe."""
    out = {}
    for stage in recipe.stages:
        given = recipe.data.stage1_data if stage.name == "stage1" else recipe.data.stage2_data
        path, root = stage_data(recipe, stage.name)
        out[stage.name] = (path, root, given is None)
    return out


def fingerprint_of(recipe: Recipe) -> fingerprint_lib.Fingerprint:
    """The run's fingerprint (see :mod:`barnfast.training.fingerprint`); creates the built-in data if missing."""
    return fingerprint_lib.compute(recipe, backbone=backbones.from_name(recipe.model.backbone),
                                   vision=vision_registry.from_name(resolve_vision_name(recipe)),
                                   stage_files=stage_files(recipe), exclude_file=recipe.data.exclude_samples)


def read_exclusions(path: str | Path | None, stage_name: str) -> dict[str, str]:
    """Sample id → reason for the samples a stage leaves out (``data.exclude_samples``, one JSON per line)."""
    if not path:
        return {}
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "id" not in row or "stage" not in row:
                raise ValueError(f"{path}:{n}: an exclusion needs 'stage' and 'id', got {line[:120]!r}")
            if row["stage"] == stage_name:
                out[str(row["id"])] = str(row.get("reason", ""))
    return out


def check_max_length(recipe: Recipe) -> None:
    """data.max_length is one limit for every backbone; a backbone whose context is shorter cannot take it."""
    bb = backbones.from_name(recipe.model.backbone)
    if recipe.data.max_length > bb.max_position_embeddings:
        raise ConfigError(f"data.max_length: {recipe.data.max_length} is longer than the context of "
                          f"{bb.name} ({bb.max_position_embeddings}); lower it for the whole sweep")


def _ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: a scheduler signals the whole process group, and the main
    process alone finishes the step and saves (a worker dying of it would crash the run, no checkpoint)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was saved and the run can continue with --resume."""


class MicroBatchOOMError(RuntimeError):
    """Out of memory on a micro-batch; the message names the token budget to lower."""


class Trainer:
    """Builds the model once and runs the recipe's stages on it."""

    def __init__(self, recipe: Recipe, dist_info: distributed.DistInfo, show_progress: bool = True,
                 fingerprint: fingerprint_lib.Fingerprint | None = None):
        self.recipe = recipe
        self.fingerprint = fingerprint if fingerprint is not None else fingerprint_of(recipe)
        self.target_bytes: dict[str, int] = {}  # sample id -> UTF-8 bytes of its target text (bits per byte)
        self.dist = dist_info
        self.show_progress = show_progress and dist_info.is_main
        self.out = Path(recipe.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = dist_info.device
        self.backbone = backbones.from_name(recipe.model.backbone)
        self.vision = vision_registry.from_name(resolve_vision_name(recipe))
        seed_everything(recipe.train.seed)
        self.model, self.tokenizer = build_model(self.backbone, self.vision, **self._model_kwargs())
        self.model.to(self.device)
        use_bf16 = recipe.train.dtype == "bf16" or (recipe.train.dtype == "auto" and self.device.type == "cuda")
        self.use_bf16 = use_bf16
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        self.max_length = recipe.data.max_length  # the same for every backbone (check_max_length)
        self.metrics_path = self.out / "metrics.jsonl"
        self.samples_seen = 0
        self.flops = flops_lib.FlopCounter(self.model)
        self._lora_applied = False
        self._fsdp = None
        self._sigterm = False
        if recipe.train.activation_checkpointing:
            from barnfast.training.parallel import apply_activation_checkpointing

            apply_activation_checkpointing(self.model)
        if recipe.train.float8:
            from barnfast.training.optim import apply_float8

            apply_float8(self.model)
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.tracker = None
        if recipe.train.report_to and self.dist.is_main:
            from barnfast.training.tracking import Tracker

            self.tracker = Tracker(recipe.train.report_to, output_dir=self.out, report_dir=recipe.train.report_dir,
                                   group=recipe.train.report_group, config=recipe.to_dict())
        if self.dist.is_main:
            write_run_record(self.out / "run.json", recipe.to_dict(), self.dist.world_size, self.device,
                             fingerprint=self.fingerprint)

    def close(self) -> None:
        """Give SIGTERM back to whoever handled it before (a sweep, a test runner)."""
        signal.signal(signal.SIGTERM, self._previous_sigterm)
        if self.tracker is not None:
            self.tracker.close()

    def _model_kwargs(self) -> dict:
        """What build_model needs from the recipe (the same for the trained model and its export copy)."""
        m, t = self.recipe.model, self.recipe.train
        return dict(model_path=m.model_path, vision_path=m.vision_path, seed=t.seed,
                    projector_approximate=m.projector_approximate, pad_vocab_to_multiple_of=m.pad_vocab_to_multiple_of,
                    kernel_backend=t.kernel_backend, projector=m.projector, perceiver_latents=m.perceiver_latents,
                    perceiver_depth=m.perceiver_depth, s2_scales=m.s2_scales)

    def _on_sigterm(self, signum, frame) -> None:
        # What a cluster scheduler sends before killing the job: finish the step, save, exit.
        self._sigterm = True

    # -- the whole run ----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> None:
        """All stages of the recipe, from the latest checkpoint when ``resume``."""
        names = [s.name for s in self.recipe.stages]
        ckpt = checkpoint.latest_checkpoint(self.out / "checkpoints") if resume else None
        state = checkpoint.read_state(ckpt) if ckpt is not None else None
        if state is not None and state.stage not in names:
            raise RuntimeError(f"checkpoint {ckpt} is of stage {state.stage!r}, not in this recipe's stages {names}")
        self._truncate_logs(names, state)
        for i, stage in enumerate(self.recipe.stages):
            if state is not None and (i < names.index(state.stage) or (stage.name == state.stage and state.stage_done)):
                if stage.name == state.stage:  # finished stage: its parameters seed the next one
                    self.prepare_stage(stage)
                    checkpoint.load_checkpoint(ckpt, self.model, None, self.dist, restore_rng=False)
                    self.samples_seen = state.samples_seen
                continue
            self.run_stage(stage, resume=ckpt if state is not None and stage.name == state.stage else None)

    def _truncate_logs(self, names: list[str], state: checkpoint.TrainerState | None) -> None:
        """Drop the rows of ``metrics.jsonl`` and ``nonfinite_steps.jsonl`` that this run logs again.

        A stage of this run keeps its rows only before the resumed step (all of them when it is
        finished; none when the run starts without a checkpoint), so a resume, or a restart from
        scratch, never duplicates a step. Rows of stages outside this run stay; a line that does not
        parse (the torn last line of a run killed mid-write) is dropped.
        """
        if not self.dist.is_main:
            return
        done = names[:names.index(state.stage)] if state is not None else []

        def keep(row: dict) -> bool:
            if row.get("stage") not in names or row["stage"] in done:
                return True
            return state is not None and row["stage"] == state.stage and row.get("step", 0) < state.step

        for path in (self.metrics_path, self.out / "nonfinite_steps.jsonl"):
            if not path.exists():
                continue
            rows = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:  # the torn last line of a killed run
                    continue
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if isinstance(r, dict) and keep(r)))
            tmp.replace(path)

    # -- data ---------------------------------------------------------------------------------
    def image_aspect(self, stage) -> str:
        """The stage's image preprocessing: its own ``image_aspect``, else ``data.image_aspect``."""
        return self.recipe.data.image_aspect if stage.image_aspect == "data" else stage.image_aspect

    def build_dataset(self, stage) -> StageDataset:
        path, image_root = stage_data(self.recipe, stage.name)
        template = "plain" if stage.template == "plain" else (
            self.backbone.chat_template if stage.template == "auto" else stage.template)
        stage_dir = self.out / stage.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        samples = load_llava_json(path)
        excluded = read_exclusions(self.recipe.data.exclude_samples, stage.name)
        if excluded:  # dropped for every backbone of the sweep alike (the reasons are in the list)
            samples = [s for s in samples if s.id not in excluded]
        self.num_excluded = len(excluded)
        data = StageDataset(
            samples, tokenizer=self.tokenizer, template=template,
            image_token_id=self.model.image_token_id, image_root=image_root, max_length=self.max_length,
            image_spec=self.vision.image_spec(self.image_aspect(stage),
                                              size=s2_input_size(self.vision, self.model.s2_scales)),
            overlong=self.recipe.data.overlong, image_at_turn_start=self.recipe.data.image_at_turn_start,
            max_skip_fraction=self.recipe.data.max_skip_fraction,
            skipped_path=stage_dir / "skipped_samples.jsonl" if self.dist.is_main else None,
            show_progress=self.show_progress, pad_id=self.tokenizer.pad_token_id or 0,
            num_image_tokens=self.model.visual_tokens_per_image,
            allow_outside_image_root=self.recipe.data.allow_outside_image_root,
            system=self.recipe.train.system_prompt,
        )
        # Bytes of target text per sample: loss in bits per byte compares across 32k and 128k vocabularies.
        texts = self.tokenizer.batch_decode([e.input_ids[e.labels != -100].tolist() for e in data.items],
                                            skip_special_tokens=True)
        self.target_bytes = {e.id: len(t.encode("utf-8")) for e, t in zip(data.items, texts)}
        r = self.recipe
        if r.data.vision_cache and r.train.packing:
            # The frozen tower's features, encoded once per image (ranks share the missing ones) and
            # served instead of pixels; padded (LLaVA-way) batches keep pixels.
            cache = VisionFeatureCache(r.data.vision_cache, vision_cache_settings(
                self.vision, s2_scales=self.model.s2_scales, image_aspect=self.image_aspect(stage),
                dtype=r.data.vision_cache_dtype, seed=r.train.seed, vision_path=r.model.vision_path,
                weights_id=self.fingerprint.fields["identity.vision"], image_spec=data.image_spec))

            def encode(pixels):
                with self.autocast:  # the features the training step would compute
                    return self.model.visual_features(pixels.to(self.device))

            keys = cache.fill(data.image_paths(), data.load_pixels, encode, batch_size=r.data.vision_cache_batch,
                              rank=self.dist.rank, world_size=self.dist.world_size,
                              show_progress=self.show_progress, log=print if self.dist.is_main else None)
            distributed.barrier(self.dist)
            data.use_vision_cache(cache, keys)
        return data

    def plan(self, data: StageDataset, stage, epoch: int) -> packing.EpochPlan:
        """The epoch's plan; a last step with fewer samples than ranks is dropped (it cannot be split)."""
        n, W = len(data.lengths), self.dist.world_size
        plan = packing.plan_epoch(data.lengths, global_batch=stage.global_batch,
                                  token_budget=self.recipe.train.token_budget, world_size=W,
                                  seed=self.recipe.train.seed, epoch=epoch,
                                  drop_last=0 < n % stage.global_batch < W,
                                  modality=np.array([bool(e.images) for e in data.items]) if stage.group_by_modality
                                  else None)
        over = int((data.lengths > self.recipe.train.token_budget).sum())
        if over and self.dist.is_main and epoch == 0:
            warnings.warn(f"{stage.name}: {over} sample(s) are longer than train.token_budget="
                          f"{self.recipe.train.token_budget} and get a micro-batch each; raise --token-budget "
                          f"(longest: {int(data.lengths.max())} tokens)", stacklevel=2)
        return plan

    def micro_batches(self, plan: packing.EpochPlan, step: int, rank: int | None = None) -> list[np.ndarray]:
        """A rank's (default: this one's) micro-batches of a step: packed by the planner, or fixed-size padded."""
        rank = self.dist.rank if rank is None else rank
        if self.recipe.train.packing:
            return plan.micro_batches(step, rank)
        mine = plan.step_samples(step)[rank::self.dist.world_size]
        k = self.recipe.train.micro_batch_size
        return [mine[i:i + k] for i in range(0, len(mine), k)]

    # -- one stage ----------------------------------------------------------------------------
    def prepare_stage(self, stage) -> None:
        """Freeze/unfreeze for the stage; with LoRA, stage 2 trains the adapters and the projector only."""
        lora = stage.train_llm and self.recipe.lora.enabled
        self.model.set_trainable(projector=True, llm=stage.train_llm and not lora)
        if lora and not self._lora_applied:
            from barnfast.training.lora import LoraConfig, apply_lora

            apply_lora(self.model, LoraConfig.from_recipe(self.recipe.lora))
            self._lora_applied = True
        elif lora:
            for name, p in self.model.language_model.named_parameters():
                p.requires_grad_(".lora_" in name)

    def wrap(self, stage):
        """The module the step calls: DDP, FSDP2 or the model itself."""
        r, d = self.recipe, self.dist
        if r.train.parallel == "fsdp" and d.enabled:
            if self._fsdp is None:
                from barnfast.training.parallel import apply_fsdp

                self._fsdp = apply_fsdp(self.model, param_dtype=torch.bfloat16 if self.use_bf16 else None)
            return self._fsdp
        if d.enabled:
            return DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return self.model

    def build_optimizer(self, params, stage):
        from barnfast.training.optim import build_optimizer

        return build_optimizer(params, kind=self.recipe.train.optimizer, lr=stage.lr, weight_decay=stage.weight_decay)

    def run_stage(self, stage, resume: Path | None = None) -> list[dict]:
        """Train one stage; ``resume`` is a checkpoint of this stage to continue from."""
        r, d = self.recipe, self.dist
        seed_everything(r.train.seed)
        self.prepare_stage(stage)
        data = self.build_dataset(stage)
        plan = self.plan(data, stage, epoch=0)
        per_epoch = plan.num_steps
        total = per_epoch * stage.epochs if stage.max_steps is None else min(per_epoch * stage.epochs, stage.max_steps)
        if d.is_main:
            self.write_manifest(stage, data, plan, total)
        module = self.wrap(stage)  # first: fully_shard replaces the parameters with sharded ones
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = self.build_optimizer(params, stage)
        start, nonfinite = 0, 0
        self._loader_skips: dict[str, list] = {}  # sample id -> [id, reason, step]: images failed in the loader
        if resume is not None:
            state = checkpoint.load_checkpoint(resume, module, opt, d)
            start, nonfinite, self.samples_seen = state.step, state.nonfinite_in_a_row, state.samples_seen
            self._record_loader_skips(stage, data, state.skipped_in_loader)  # the file was rewritten by the build
        bar = tqdm(total=total, initial=start, desc=stage.name, disable=not self.show_progress, dynamic_ncols=True)
        history = []
        step = start
        while step < total:
            epoch, first = divmod(step, per_epoch)
            if epoch:
                plan = self.plan(data, stage, epoch=epoch)
            count = min(per_epoch, total - epoch * per_epoch) - first
            for k, mbs in enumerate(self._loader(data, plan, range(first, first + count))):
                rec = self.train_step(module, opt, params, stage, mbs, step, total,
                                      fill=self._fsdp_fill(plan, first + k, len(mbs)))
                rec["epoch"] = epoch
                self._record_loader_skips(stage, data, [[i, why, step] for i, why in rec.pop("decode_skipped")])
                if rec["skipped"]:
                    nonfinite += 1
                    self._log_nonfinite(stage, data, plan, first + k, step, rec)
                else:
                    nonfinite = 0
                history.append(rec)
                if d.is_main and step % r.train.log_every == 0:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if self.tracker is not None:
                        self.tracker.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                smp_s=f"{rec['samples_per_s']:.1f}",
                                **({"mfu": f"{rec['mfu']:.1%}"} if rec["mfu"] is not None else {}))
                bar.update(1)
                step += 1
                state = checkpoint.TrainerState(stage.name, step, step >= total, self.samples_seen, nonfinite,
                                                list(self._loader_skips.values()))
                if nonfinite > r.train.max_nonfinite_in_a_row:
                    self.save(module, opt, state)
                    raise NonFiniteError(
                        f"{stage.name}: {nonfinite} steps in a row had a non-finite loss or gradient norm "
                        f"(limit train.max_nonfinite_in_a_row={r.train.max_nonfinite_in_a_row}); a checkpoint was "
                        f"saved at step {step}; the sample ids of each skipped step are in "
                        f"{self.out / 'nonfinite_steps.jsonl'}. Lower the learning rate or check those samples.")
                if self._preempted():
                    self.save(module, opt, state)
                    raise Preempted(f"SIGTERM: checkpoint saved at {stage.name} step {step}; continue with --resume")
                if step < total and r.train.checkpoint_every and step % r.train.checkpoint_every == 0:
                    self.save(module, opt, state)
        bar.close()
        self.save(module, opt, checkpoint.TrainerState(stage.name, step, True, self.samples_seen, nonfinite,
                                                       list(self._loader_skips.values())))
        return history

    def write_manifest(self, stage, data: StageDataset, plan, total: int) -> dict:
        """``<stage>/manifest.json``: the sample ids of every optimizer step in order, and their sha256.

        A sweep compares these hashes across backbones: equal hashes = the same samples in the same steps.
        """
        steps, per_epoch = [], plan.num_steps
        for epoch in range(math.ceil(total / per_epoch)):
            p = plan if epoch == 0 else self.plan(data, stage, epoch=epoch)
            steps += [[data.items[int(i)].id for i in p.step_samples(s)]
                      for s in range(min(per_epoch, total - epoch * per_epoch))]
        digest = hashlib.sha256(json.dumps(steps, separators=(",", ":")).encode()).hexdigest()
        manifest = {"stage": stage.name, "sha256": digest, "num_steps": total, "global_batch": stage.global_batch,
                    "seed": self.recipe.train.seed, "num_samples": len(data), "num_skipped": len(data.skipped),
                    "num_excluded": self.num_excluded, "exclude_samples": self.recipe.data.exclude_samples,
                    "how": "sha256 of the compact JSON of `steps` (a list of lists of sample ids)", "steps": steps}
        (self.out / stage.name / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    def _record_loader_skips(self, stage, data: StageDataset, rows: list) -> None:
        """List samples whose image failed to decode in the loader (once per id) in ``skipped_samples.jsonl``,
        and stop the stage when the skipped share (encode time + loader) passes ``data.max_skip_fraction``."""
        new = [r for r in rows if r[0] not in self._loader_skips]
        if not new:
            return
        for r in new:
            self._loader_skips[r[0]] = list(r)
        if self.dist.is_main:
            with open(self.out / stage.name / "skipped_samples.jsonl", "a") as f:
                for sid, reason, step in new:
                    f.write(json.dumps({"id": sid, "reason": reason, "step": step, "where": "loader"}) + "\n")
            warnings.warn(f"{stage.name}: {len(new)} sample(s) skipped, image failed to decode in the loader: "
                          f"{new[0][0]}: {new[0][1]}", stacklevel=2)
        skipped, total = len(data.skipped) + len(self._loader_skips), data.num_samples
        limit = self.recipe.data.max_skip_fraction
        if skipped / total > limit:
            raise TooManySkippedError(
                f"{stage.name}: {skipped} of {total} samples ({skipped / total:.1%}) were skipped "
                f"as bad input ({len(self._loader_skips)} of them because an image failed to decode in the loader), "
                f"more than data.max_skip_fraction={limit:.1%}; see {self.out / stage.name / 'skipped_samples.jsonl'}")

    def save(self, module, opt, state: checkpoint.TrainerState) -> Path:
        state.fingerprint = self.fingerprint.digest
        return checkpoint.save_checkpoint(self.out / "checkpoints", module, opt, state, self.dist,
                                          keep=self.recipe.train.keep_checkpoints)

    def _preempted(self) -> bool:
        """Whether any rank got SIGTERM (all ranks must agree to save together)."""
        flag = torch.tensor([1.0 if self._sigterm else 0.0], device=self.device)
        return bool(distributed.all_reduce_sum(flag, self.dist).item() > 0)

    def _log_nonfinite(self, stage, data: StageDataset, plan, step_in_epoch: int, step: int, rec: dict) -> None:
        if not self.dist.is_main:
            return
        ids = [data.items[int(i)].id for i in plan.step_samples(step_in_epoch)]
        with open(self.out / "nonfinite_steps.jsonl", "a") as f:
            f.write(json.dumps({"stage": stage.name, "step": step, "loss": rec["loss"],
                                "grad_norm": rec["grad_norm"], "sample_ids": ids}) + "\n")
        warnings.warn(f"{stage.name} step {step}: non-finite loss/grad norm, step skipped "
                      f"(samples: {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''})", stacklevel=2)

    def _fsdp_fill(self, plan, step_in_epoch: int, mine: int) -> int:
        """Filler passes this rank runs in a step under FSDP: FSDP all-gathers every layer in every forward, and
        the planner evens tokens per rank, not micro-batch counts, so a rank with fewer micro-batches than the
        busiest would leave the collectives unpaired and the step would hang. Read from the plan, which every
        rank holds: no collective."""
        if self._fsdp is None or self.dist.world_size == 1:
            return 0
        return max(len(self.micro_batches(plan, step_in_epoch, r)) for r in range(self.dist.world_size)) - mine

    def _loader(self, data: StageDataset, plan, steps: range):
        """Yields, per step, the list of this rank's micro-batches (built in DataLoader workers)."""
        per_step = [self.micro_batches(plan, s) for s in steps]
        flat = [mb for mbs in per_step for mb in mbs]
        ds = MicroBatches(data, flat, packed=self.recipe.train.packing)
        nw = self.recipe.data.num_workers
        # Its own generator: a DataLoader iterator otherwise draws its base seed from the global torch RNG,
        # after a resume restored it, so dropout (LoRA) would differ from the uninterrupted run.
        generator = torch.Generator().manual_seed(self.recipe.train.seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=nw,
                                             persistent_workers=False, prefetch_factor=4 if nw else None,
                                             pin_memory=self.device.type == "cuda", generator=generator,
                                             worker_init_fn=_ignore_sigterm if nw else None)
        it = iter(loader)
        for mbs in per_step:
            yield [next(it) for _ in mbs]

    def _micro_step(self, module, batch, normaliser, weight: float = 1.0):
        """Forward and backward of one micro-batch; an out-of-memory error says what to lower.
        ``weight=0``: the collectives of a pass and no gradient (FSDP's filler passes)."""
        try:
            with self.autocast:
                loss = module(batch, normaliser)
            (loss * weight if weight != 1.0 else loss).backward()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            text = str(exc)
            if not (isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text
                    or "can't allocate memory" in text):
                raise
            raise MicroBatchOOMError(
                f"out of memory on a micro-batch of {batch.num_tokens} tokens ({len(batch.sample_ids)} samples; "
                f"train.token_budget={self.recipe.train.token_budget}). Lower it, e.g. --token-budget "
                f"{max(16, self.recipe.train.token_budget // 2)}, or turn on --set train.activation_checkpointing=true"
            ) from exc
        return loss.detach()

    def train_step(self, module, opt, params, stage, batches, step: int, total: int, fill: int = 0) -> dict:
        d = self.dist
        t0 = time.perf_counter()
        dropped = [list(x) for b in batches for x in getattr(b, "dropped", ())]  # images that failed to decode
        batches = [b.to(self.device) for b in batches]
        # The loss normaliser: target tokens of the whole global batch, counted and reduced on device.
        local_targets = torch.stack([b.num_targets for b in batches]).sum().float()
        global_targets = distributed.all_reduce_sum(local_targets.clone(), d)
        # DDP/FSDP average gradients over ranks; dividing by global/world makes the result a global mean.
        normaliser = (global_targets / d.world_size).clamp(min=1.0)
        lr = lr_at(step, total, stage.lr, stage.warmup_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(fill):  # FSDP: zero-weighted passes over the first micro-batch (see _fsdp_fill)
            with gradient_sync(module, enabled=False):
                self._micro_step(module, batches[0], normaliser, weight=0.0)
        for i, b in enumerate(batches):
            with gradient_sync(module, enabled=i == len(batches) - 1):
                loss_sum += self._micro_step(module, b, normaliser)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        step_loss = distributed.all_reduce_sum(loss_sum, d) / d.world_size
        # The one sync the step needs before the update (a non-finite loss or norm propagates through the sum);
        # no target left in the step (every image failed to decode): no update, no decay.
        finite, has_targets = torch.stack([torch.isfinite(step_loss + grad_norm), global_targets > 0]).tolist()
        if finite and has_targets:
            opt.step()
        opt.zero_grad(set_to_none=True)
        f64 = dict(device=self.device, dtype=torch.float64)
        lens = torch.cat([b.cu_seqlens.diff() if hasattr(b, "cu_seqlens") else b.attention_mask.sum(1)
                          for b in batches]).to(torch.float64)
        stats = torch.stack([
            lens.sum(), (lens ** 2).sum(),
            torch.tensor(float(sum(b.num_tokens for b in batches)), **f64),
            torch.tensor(float(sum(len(b.sample_ids) for b in batches)), **f64),
            torch.tensor(float(sum(b.num_images for b in batches)), **f64),
            torch.tensor(float(sum(self.target_bytes.get(i, 0) for b in batches for i in b.sample_ids)), **f64),
            torch.tensor(float(len(dropped)), **f64),
        ])
        # Everything logged comes to the host in one copy (one sync), not one .item() each.
        host = torch.cat([distributed.all_reduce_sum(stats, d),
                          torch.stack([step_loss, grad_norm, global_targets]).to(torch.float64)]).tolist()
        (real, len_sq, computed, n_samples, n_images, n_bytes, n_dropped,
         loss_value, grad_norm_value, target_tokens) = host
        if n_dropped and d.enabled:  # rare: every rank learns every rank's failures, so all count alike
            gathered = [None] * d.world_size
            torch.distributed.all_gather_object(gathered, dropped)
            dropped = [x for part in gathered for x in part]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.samples_seen += int(n_samples)
        cached = all(getattr(b, "visual_features", None) is not None or b.pixel_values is None for b in batches)
        flops = self.flops.step(real, len_sq, n_images, stage.train_llm, vision_computed=not cached)
        peak = flops_lib.peak_flops(self.device)
        return {
            "step": step, "stage": stage.name, "loss": loss_value, "lr": lr, "grad_norm": grad_norm_value,
            "skipped": not finite, "tokens": int(real), "tokens_per_s": real / dt,
            "samples_per_s": n_samples / dt, "padding_efficiency": real / computed, "micro_batches": len(batches),
            "samples_seen": self.samples_seen, "step_time_s": dt, "target_tokens": int(target_tokens),
            "tflops_per_device": flops / dt / d.world_size / 1e12,
            "mfu": None if peak is None else flops / dt / d.world_size / peak,
            # nats per target token × target tokens / (ln 2 × target bytes): comparable across vocabularies
            "target_bytes": int(n_bytes),
            "loss_bits_per_byte": loss_value * target_tokens / (math.log(2) * n_bytes) if n_bytes else None,
            "decode_skipped": dropped,
        }

    def export(self) -> Path:
        """The final model as a Hugging Face folder (LoRA merged on request; FSDP shards gathered first)."""
        dest = self.out / "export"
        meta = {"backbone": self.backbone.name, "chat_template": self.backbone.chat_template,
                "system_prompt": self.recipe.train.system_prompt,  # None: the template's own
                "stop_tokens": list(self.backbone.stop_tokens),
                "image_aspect": self.image_aspect(self.recipe.stages[-1]),  # the last stage's: what it was tuned on
                "seed": self.recipe.train.seed}
        model = self.model
        if self._fsdp is not None:  # every rank takes part in the gather; rank 0 rebuilds an unsharded copy
            from barnfast.training.parallel import full_state_dict

            state = full_state_dict(self.model)
            if self.dist.is_main:
                model = self._unsharded_copy(state)
        if self.dist.is_main:
            lora = self._lora_applied
            if lora and self.recipe.lora.merge_on_export:
                from barnfast.training.lora import merge_lora

                merge_lora(model)
            elif lora:  # base weights as a plain Llava folder, the adapters beside them
                import copy

                from safetensors.torch import save_file

                from barnfast.training.lora import lora_state_dict, unload_lora

                adapters = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
                model = copy.deepcopy(model)
                unload_lora(model)
                dest.mkdir(parents=True, exist_ok=True)
                save_file(adapters, str(dest / "lora_adapters.safetensors"))
                meta["lora"] = {"rank": self.recipe.lora.rank, "alpha": self.recipe.lora.alpha,
                                "target_modules": list(self.recipe.lora.target_modules), "merged": False}
            export_hf(model, self.tokenizer, dest, meta=meta)
        distributed.barrier(self.dist)
        return dest

    def _unsharded_copy(self, state: dict):
        """A plain (unsharded, CPU) model built like this one, holding ``state``: what FSDP export writes."""
        r = self.recipe
        model, _ = build_model(self.backbone, self.vision, **self._model_kwargs())
        if self._lora_applied:
            from barnfast.training.lora import LoraConfig, apply_lora

            apply_lora(model, LoraConfig.from_recipe(r.lora))
        model.load_state_dict(state)
        return model


def run(recipe: Recipe, *, resume: bool = False, show_progress: bool = True) -> int:
    """Train every stage of ``recipe`` and export; 143 when preempted by SIGTERM (checkpoint saved)."""
    backbones.from_name(recipe.model.backbone)  # unknown name → error listing the known ones, before any work
    check_max_length(recipe)
    # A folder holds one run: another fingerprint in run.json or the checkpoint stops here, listing the fields.
    fp = fingerprint_of(recipe)
    fingerprint_lib.check_run_folder(recipe.output_dir, fp)
    if resume:
        ckpt = checkpoint.latest_checkpoint(Path(recipe.output_dir) / "checkpoints")
        if ckpt is not None:
            fingerprint_lib.check_checkpoint(checkpoint.read_state(ckpt).fingerprint, ckpt, fp)
    info = distributed.init_distributed()
    # Rank 0 holds the output folder; under torchrun its failure here stops the other ranks.
    lock = OutputDirLock(recipe.output_dir, "barnfast train").acquire() if info.is_main else None
    try:
        trainer = Trainer(recipe, info, show_progress=show_progress, fingerprint=fp)
        try:
            trainer.run(resume=resume)
            trainer.export()
        except Preempted as exc:
            print(exc, flush=True)
            return 143  # 128 + SIGTERM, as the scheduler expects
        finally:
            trainer.close()
    finally:
        if lock is not None:
            lock.release()
        distributed.close(info)
    return 0
