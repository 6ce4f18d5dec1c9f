"""Optimizers and low-precision training from torchao: 8-bit AdamW, float8 decoder linears.

- ``adamw``: ``torch.optim.AdamW`` (``fused=True`` on CUDA: one kernel for all parameters).
- ``adamw8bit``: ``torchao.optim.AdamW8bit``. Both Adam moments are stored as uint8 codes with one
  fp32 scale per block of 256 values (2 + 8/256 bytes per parameter instead of 8), which for a 7B
  LLM is 14 GB of optimizer state instead of 56 GB. torchao keeps fp32 moments for tensors under
  4096 elements or not a multiple of the block (norms, biases). The update is ``torch.compile``d
  per parameter shape: it runs on CPU tensors too (torchao 0.18), the first step pays compilation.
- float8 (:func:`apply_float8`): ``torchao.float8.convert_to_float8_training`` swaps the decoder
  layers' ``nn.Linear`` for ``Float8Linear`` (same parameter names, so checkpoints and the export
  are unchanged): matmuls in float8 e4m3 with dynamic per-tensor scales, weights kept in their
  dtype. Needs float8 tensor cores: CUDA compute capability >= 8.9 (Ada, Hopper: H100).

torchao is imported only when one of these is asked for (it is an optional dependency, and its
import loads CUDA extensions and prints warnings on machines without them).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn

from barnfast.errors import ConfigError
from barnfast.models.vlm import LlavaVLM

OPTIMIZERS = ("adamw", "adamw8bit")
FLOAT8_MIN_CAPABILITY = (8, 9)
FLOAT8_DIM_MULTIPLE = 16  # float8 matmuls (torch._scaled_mm) need both dimensions divisible by 16


def _import(module: str, option: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means the option cannot run; say why
        raise RuntimeError(f"{option} needs torchao ({module}): {type(exc).__name__}: {exc}; "
                           f"pip install torchao") from exc


def build_optimizer(params, *, kind: str = "adamw", lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer`` over ``params`` (an iterable of tensors or groups)."""
    params = list(params)
    if kind == "adamw":
        # The fused kernel (CUDA and, since torch 2.4, CPU) updates every tensor in one pass; the default
        # foreach path on CPU made the optimizer half of a -tiny llama3 step (131 of 263 ms: the 2 x 8.2M
        # parameters of its 128,256-row embedding and head), fused takes it to ~10 ms.
        fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in _tensors(params))
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                                 fused=True if fusable else None)
    if kind == "adamw8bit":
        optim = _import("torchao.optim", "train.optimizer='adamw8bit'")
        return _adamw8bit_class(optim.AdamW8bit)(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ConfigError(f"train.optimizer={kind!r}: expected one of {OPTIMIZERS}")


_ADAMW8BIT_CLASSES: dict[type, type] = {}


def _adamw8bit_class(base: type) -> type:
    """torchao's AdamW8bit that accepts a float ``lr`` written into a param group between steps.

    torchao stores each group's lr as a 0-dim fp32 tensor (so its ``torch.compile``d update takes the lr as
    an input and is not recompiled for every new value) and its ``step`` raises ``RuntimeError: lr was
    changed to a non-Tensor object`` when it finds a float there. barnfast's trainer, HF's schedulers and
    most hand-written loops write floats (``group["lr"] = lr_at(step)``): before torchao's step, this turns
    a float back into the same kind of tensor torchao's ``__init__`` makes from the constructor's float.
    The class keeps torchao's name; ``type(opt).__mro__[1]`` is torchao's.
    """
    if base not in _ADAMW8BIT_CLASSES:

        def step(self, closure=None):
            for group in self.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
            return base.step(self, closure)

        _ADAMW8BIT_CLASSES[base] = type(base.__name__, (base,), {"step": step, "__module__": __name__,
                                                                 "__doc__": _adamw8bit_class.__doc__})
    return _ADAMW8BIT_CLASSES[base]


def _tensors(params):
    for p in params:
        if isinstance(p, dict):
            yield from p["params"]
        else:
            yield p


def float8_supported() -> tuple[bool, str]:
    """(True, "") where float8 training can run; else (False, the reason)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (float8 matmuls need compute capability >= 8.9: H100, L4, RTX 4090)"
    cap = torch.cuda.get_device_capability()
    if cap < FLOAT8_MIN_CAPABILITY:
        return False, (f"{torch.cuda.get_device_name()} has compute capability {cap[0]}.{cap[1]}; float8 matmuls "
                       f"need >= {FLOAT8_MIN_CAPABILITY[0]}.{FLOAT8_MIN_CAPABILITY[1]} (H100, L4, RTX 4090)")
    try:
        import torchao.float8  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"import torchao.float8 failed: {type(exc).__name__}: {exc}"
    return True, ""


def apply_float8(model: LlavaVLM, *, emulate: bool = False) -> int:
    """Swap the decoder layers' linears for torchao ``Float8Linear``; returns how many were swapped.

    Not ``lm_head`` (fused into the cross-entropy kernel, and float8 logits hurt), not the projector
    (small, trained from scratch in stage 1), not the frozen vision tower. Linears whose dimensions
    are not multiples of 16, and LoRA adapters, stay as they are. The packed length T is the inner dimension of the
    weight-gradient matmul and is rarely a multiple of 16: ``pad_inner_dim`` pads it (one copy).
    Apply before :func:`barnfast.training.parallel.apply_fsdp`. Raises RuntimeError naming ``train.float8``
    where float8 cannot run. ``emulate``: float8 rounding with high-precision matmuls, on any device
    (tests; no speed-up).
    """
    ok, why = float8_supported()
    if not ok and not emulate:
        raise RuntimeError(f"train.float8=true cannot run here: {why}")
    f8 = _import("torchao.float8", "train.float8")
    Float8Linear = _import("torchao.float8.float8_linear", "train.float8").Float8Linear  # not re-exported (0.18)
    config = f8.Float8LinearConfig(pad_inner_dim=True, emulate=emulate)

    def eligible(mod: nn.Module, fqn: str) -> bool:
        # LoRA: its base linear (``q_proj.base_layer``) converts, its rank-r adapters stay as they are.
        return (type(mod) is nn.Linear and "lora_" not in fqn and mod.in_features % FLOAT8_DIM_MULTIPLE == 0
                and mod.out_features % FLOAT8_DIM_MULTIPLE == 0)

    layers = model.language_model.layers
    count = lambda: sum(isinstance(m, Float8Linear) for m in layers.modules())  # noqa: E731
    before = count()
    for layer in layers:
        f8.convert_to_float8_training(layer, module_filter_fn=eligible, config=config)
    return count() - before
