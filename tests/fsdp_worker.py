"""One FSDP2 training step on 2 gloo ranks vs the same step in one process (run by tests/test_parallel.py).

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT.json``.
Each rank builds the same tiny model (fixed seed), runs the reference step on the whole batch
without FSDP, then the sharded step on its half of the samples in two micro-batches; rank 0
writes the comparison as JSON. A failure anywhere is written as ``{"error": ...}`` so that the
test can tell "FSDP2 does not run on CPU/gloo" from a wrong result.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N_IMAGES = [1, 0, 3, 1, 2, 1, 0, 2]
TEXT_LENGTHS = [5, 40, 9, 31, 17, 12, 23, 8]
LR = 1e-3


def _step(module, batches, normaliser, sync):
    """Forward/backward over micro-batches (gradient sync only on the last), one AdamW step.

    Returns the summed loss and the full gradients by parameter name (Adam's first step is nearly
    ``lr * sign(grad)``, blind to a wrong gradient scale, so the gradients are compared as well).
    """
    from torch.distributed.tensor import DTensor

    from barnfast.training.optim import build_optimizer
    from barnfast.training.parallel import gradient_sync

    params = [p for p in module.parameters() if p.requires_grad]
    opt = build_optimizer(params, kind="adamw", lr=LR, weight_decay=0.1)
    total = torch.zeros(())
    unsynced = []
    for i, b in enumerate(batches):
        with gradient_sync(module, enabled=sync or i == len(batches) - 1):
            loss = module(b, normaliser)
        loss.backward()  # after the block, as barnfast.train does
        total += loss.detach()
        # Without sync, FSDP2 accumulates unsharded gradients and leaves the sharded .grad unset.
        unsynced.append(all(p.grad is None for p in module.language_model.parameters() if p.requires_grad))
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
             for n, p in module.named_parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, grads, unsynced


def fsdp2_unsupported() -> str | None:
    """Why FSDP2 cannot train on this backend in this torch build (None: it can), on a bare nn.Linear."""
    from torch.distributed.fsdp import fully_shard

    try:
        lin = torch.nn.Linear(8, 8)
        fully_shard(lin)
        lin(torch.randn(2, 8)).sum().backward()
        lin.weight.grad.full_tensor()
    except Exception as exc:  # noqa: BLE001 - the reason becomes the test's skip message
        return f"FSDP2 (fully_shard) on {dist.get_backend()} fails in torch {torch.__version__}: " \
               f"{type(exc).__name__}: {exc}"
    return None


def main(out: str) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from barnfast.training.lora import LoraConfig, apply_lora
    from barnfast.training.parallel import apply_activation_checkpointing, apply_fsdp, fsdp_plan, full_state_dict
    from tests.model_utils import make_samples, packed, tiny_model

    rank, world = dist.get_rank(), dist.get_world_size()
    why = fsdp2_unsupported()
    if why is not None:
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"unsupported": why}, f)
        return
    torch.manual_seed(0)
    base, _ = tiny_model("llama3-tiny")
    base.set_trainable(projector=True, llm=True)
    with_lora = copy.deepcopy(base)
    apply_lora(with_lora, LoraConfig(rank=4, alpha=8, dropout=0.0))  # same adapters on every rank (seeded)
    samples = make_samples(base, N_IMAGES, TEXT_LENGTHS)
    everything = packed(samples)
    N = everything.num_targets.float()
    mine = list(range(rank, len(N_IMAGES), world))
    micro = [packed(samples, mine[: len(mine) // 2]), packed(samples, mine[len(mine) // 2:])]

    # mode: (starting model, activation checkpointing, FSDP compute dtype, sync every micro-step)
    modes = {
        "fsdp": (base, False, torch.float32, True),
        "fsdp_ac_nosync": (base, True, torch.float32, False),
        "fsdp_lora": (with_lora, False, torch.float32, True),
        "fsdp_bf16": (base, False, torch.bfloat16, True),
    }
    result, refs = {}, {}
    for mode, (start, ac, param_dtype, sync) in modes.items():
        if id(start) not in refs:  # the same step in one process, on the whole batch
            ref = copy.deepcopy(start)
            loss, grads, _ = _step(ref, [everything], N, sync=True)
            refs[id(start)] = (loss.item(), grads, start.state_dict(), ref.state_dict())
        ref_loss, ref_grads, before, ref_state = refs[id(start)]
        model = copy.deepcopy(start)
        if ac:
            apply_activation_checkpointing(model)
        apply_fsdp(model, param_dtype=param_dtype, reduce_dtype=torch.float32)
        modules = dict(model.named_modules())
        structure = {
            "plan_units_are_fsdp": all(isinstance(modules[n], FSDPModule) for n in fsdp_plan(model)),
            "vision_tower_replicated": not any(isinstance(p, DTensor) for p in model.vision_tower.parameters()),
            "llm_sharded": all(isinstance(p, DTensor) for p in model.language_model.parameters()),
            "stored_dtypes": sorted({str(p.dtype) for p in model.parameters()}),  # master weights
        }
        # DDP and FSDP2 average gradients over ranks: normalise by global/world (as train.py does).
        local, grads, unsynced = _step(model, micro, N / world, sync=sync)
        dist.all_reduce(local)
        state = full_state_dict(model)
        if rank == 0:
            assert state.keys() == ref_state.keys(), sorted(state.keys() ^ ref_state.keys())[:5]
            assert grads.keys() == ref_grads.keys(), sorted(grads.keys() ^ ref_grads.keys())[:5]
            result[mode] = {
                "ref_loss": ref_loss,
                "loss": (local / world).item(),
                "unsynced_micro_steps": unsynced,
                "max_grad_diff": {k: (grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads},
                "max_grad": {k: ref_grads[k].abs().max().item() for k in ref_grads},
                "rel_grad_err": {k: ((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()).item() for k in ref_grads},
                "max_param_diff": {k: (state[k] - ref_state[k]).abs().max().item() for k in ref_state},
                # Adam's first step moves an element by lr * g / (|g| + eps): where |g| is below the gradients'
                # reduction-order noise (<= 1e-5 of the tensor's max |g|), a sign-like step can go either way.
                # Elements with |g| >= 1e-3 of the max have a gradient error of <= 1% and so a step error of <= 1%.
                "max_param_diff_conditioned": {
                    k: (state[k] - ref_state[k])[g.abs() >= 1e-3 * g.abs().max()].abs().max().item()
                    for k, g in ref_grads.items() if k in ref_state and g.abs().max() > 0},
                "max_update": {k: (ref_state[k] - before[k]).abs().max().item() for k in ref_state},
                **structure,
            }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    out = sys.argv[1]
    dist.init_process_group("gloo")
    try:
        main(out)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which decides: skip or fail
        if dist.get_rank() == 0:
            with open(out, "w") as f:
                json.dump({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, f)
        raise
    finally:
        dist.destroy_process_group()
