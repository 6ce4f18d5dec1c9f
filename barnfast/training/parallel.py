"""Data parallelism for stage 2: FSDP2 per decoder layer, activation checkpointing, gradient sync.

The recipe picks ``ddp`` (the model replicated, ``DistributedDataParallel``) or ``fsdp``
(:func:`apply_fsdp`: ``torch.distributed.fsdp.fully_shard`` on each decoder layer, then on the whole
model). Under FSDP2 each rank keeps 1/world of every sharded parameter, its gradient and its
optimizer state; a layer's full weights exist only while that layer runs (all-gather before its
forward and its backward, reduce-scatter of its gradient after its backward).

Precision (``MixedPrecisionPolicy``): the sharded parameters stay in the dtype the model was built
in (fp32: the optimizer's master weights), they are all-gathered and computed in ``param_dtype``
(bf16), and gradients are reduce-scattered in ``reduce_dtype`` (fp32: summing 8-64 ranks' bf16
gradients would lose ~3 significant bits per doubling of the world). The root does not cast its
inputs, so the loss normaliser (a target-token count that can pass 2^8 = bf16's exact-integer
range) stays fp32.

The frozen vision tower is *not* sharded: it is excluded from the root's parameter group
(``ignored_params``) and stays a plain replicated module. It has no gradients to reduce, so
sharding it would buy 1 - 1/world of its weights (CLIP ViT-L/14-336: 0.6 GB in bf16, next to
14 GB for a 7B LLM) for one all-gather per micro-batch; replicating it costs no communication.
The model must be on its device (``model.to(device)``) before :func:`apply_fsdp`, since FSDP2 does
not move ignored parameters. Cast the tower to bf16 yourself if you want it computed in bf16.

Launching (``barnfast.training.distributed.init_distributed`` reads torchrun's environment; NCCL on GPU)::

    # one node, 8 GPUs
    torchrun --standalone --nproc_per_node 8 -m barnfast.train --recipe llava15.toml ...

    # two nodes, 8 GPUs each: run on both nodes, HEAD = the first node's hostname or address
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id llava-run1 \\
        --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 -m barnfast.train --recipe llava15.toml ...

SLURM (one ``torchrun`` per node, each spawning one process per GPU)::

    #!/bin/bash
    #SBATCH --job-name=barnfast
    #SBATCH --nodes=2
    #SBATCH --ntasks-per-node=1
    #SBATCH --gpus-per-node=8
    #SBATCH --cpus-per-task=64
    #SBATCH --time=24:00:00
    export HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export OMP_NUM_THREADS=8
    srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 \\
        --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:29500" \\
        -m barnfast.train --recipe llava15.toml ...

Gradient accumulation reads the same under DDP, FSDP2 and one process::

    for i, batch in enumerate(micro_batches):
        with gradient_sync(module, enabled=i == len(micro_batches) - 1):
            loss = module(batch, normaliser)
        loss.backward()
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from barnfast.models.vlm import LlavaVLM

# -- FSDP2 --------------------------------------------------------------------------------------


def fsdp_plan(model: LlavaVLM) -> list[str]:
    """Qualified names of the modules :func:`apply_fsdp` shards, in the order it shards them.

    Every decoder layer (``hf.model.language_model.layers.<i>``), then the root ``""`` (which takes
    the remaining trainable parameters: embeddings, final norm, ``lm_head``, projector). The vision
    tower is in no unit: it stays replicated (see the module docstring). Pure: no process group.
    """
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    layers = [names[id(layer)] for layer in model.language_model.layers]
    return [*layers, ""]


def apply_fsdp(model: LlavaVLM, *, param_dtype: torch.dtype | None = torch.bfloat16,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
               mesh=None) -> LlavaVLM:
    """``fully_shard`` each decoder layer, then the whole model, following :func:`fsdp_plan`.

    ``mesh``: a 1-D ``DeviceMesh`` (default: all ranks, on CUDA if available else CPU) or a 2-D one
    for HSDP (replicate across nodes, shard within). ``reshard_after_forward`` applies to the layers
    (False keeps gathered weights from forward to backward: faster, more memory); the root keeps its
    parameters gathered, as FSDP2 decides for roots. ``param_dtype``/``reduce_dtype`` None: no cast.
    Returns ``model`` itself, now an ``FSDPModule``; call it as before (``model(batch, normaliser)``).
    Only ``forward`` gathers the root's parameters: use ``model.unshard()`` before calling other
    methods (``logits``) and :func:`full_state_dict` to save or export.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("apply_fsdp needs an initialised process group: launch with torchrun, then call "
                           "barnfast.training.distributed.init_distributed()")
    if mesh is None:
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    layer_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    modules = dict(model.named_modules(remove_duplicate=False))
    *layers, root = fsdp_plan(model)
    for name in layers:
        fully_shard(modules[name], mesh=mesh, mp_policy=layer_mp, reshard_after_forward=reshard_after_forward)
    fully_shard(modules[root], mesh=mesh, mp_policy=root_mp, ignored_params=set(model.vision_tower.parameters()))
    return model


def full_state_dict(model: nn.Module, cpu_offload: bool = True) -> dict[str, torch.Tensor]:
    """Full (unsharded) state dict of a model, sharded or not; keys as ``model.state_dict()``.

    Collective under FSDP2: every rank must call it. With ``cpu_offload`` only rank 0 gets the
    tensors (on CPU) and the other ranks an empty dict, so a 7B model is never gathered 8 times.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))


# -- gradient accumulation ------------------------------------------------------------------------


def gradient_sync(module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-step's forward: reduce this micro-step's gradients over ranks or not.

    Call it for every micro-step, ``enabled`` only for the last; the backward may run inside the
    block or right after it. DDP: ``no_sync()`` when disabled (DDP reads the flag in forward).
    FSDP2: ``set_requires_gradient_sync(enabled)`` on entering, left set on exit so that a backward
    after the block obeys it too; the next micro-step's call sets it again. Note that FSDP2 without
    sync keeps each layer's *unsharded* gradient until the synced micro-step, i.e. full-model
    gradient memory per rank; syncing every micro-step (always ``enabled=True``) keeps gradients
    sharded for one reduce-scatter per micro-step. A plain module: nothing to do.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else module.no_sync()
    if isinstance(module, FSDPModule):
        return _fsdp_sync(module, enabled)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_sync(module, enabled: bool):
    module.set_requires_gradient_sync(enabled)  # recurses into every FSDP unit
    yield


# -- activation checkpointing -------------------------------------------------------------------


def _checkpointed_forward(forward, *args, **kwargs):
    # Non-reentrant: takes keyword arguments, works under FSDP2's hooks and with frozen inputs.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _is_checkpointed(layer: nn.Module) -> bool:
    fwd = layer.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func is _checkpointed_forward


def apply_activation_checkpointing(model: LlavaVLM) -> int:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    The layer's ``forward`` is replaced *on the instance* (a ``functools.partial`` around
    ``torch.utils.checkpoint``), not wrapped in a new module, so module paths, parameter names and
    ``state_dict`` keys stay those of Hugging Face (``checkpoint_wrapper`` would insert
    ``_checkpoint_wrapped_module.``), ``hidden_states`` calls the layers as before, and FSDP2's
    hooks (on ``__call__``) stay outside the recomputation. Saves ~all per-layer activations but
    the layer inputs (T·H per layer) for one more forward per layer. Apply before or after
    :func:`apply_fsdp`. Returns the number of layers wrapped by this call (already wrapped: skipped).
    """
    n = 0
    for layer in model.language_model.layers:
        if not _is_checkpointed(layer):
            layer.forward = functools.partial(_checkpointed_forward, layer.forward)
            n += 1
    return n


def remove_activation_checkpointing(model: LlavaVLM) -> int:
    """Undo :func:`apply_activation_checkpointing`; returns the number of layers restored."""
    n = 0
    for layer in model.language_model.layers:
        if _is_checkpointed(layer):
            del layer.forward
            n += 1
    return n
