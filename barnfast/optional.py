"""Optional heavy dependencies, resolved once: every other module asks here.

Each ``HAS_X`` says whether the feature can run in this process, and ``WHY_NOT[x]`` says why not
(missing package, no CUDA, import error), so logs and skip reasons can name the cause.
"""

from __future__ import annotations

import importlib

import torch

WHY_NOT: dict[str, str] = {}


def _probe(name: str, module: str, needs_cuda: bool):
    if needs_cuda and not torch.cuda.is_available():
        WHY_NOT[name] = "no CUDA device"
        return None
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available", with its reason
        WHY_NOT[name] = f"import {module} failed: {type(exc).__name__}: {exc}"
        return None


_flash = _probe("flash_attn", "flash_attn", needs_cuda=True)
HAS_FLASH_ATTN = _flash is not None and hasattr(_flash, "flash_attn_varlen_func")
flash_attn_varlen_func = _flash.flash_attn_varlen_func if HAS_FLASH_ATTN else None

_liger = _probe("liger", "liger_kernel.transformers", needs_cuda=True)
HAS_LIGER = _liger is not None


def summary() -> dict[str, str]:
    """One line per optional feature, for the run record and the logs."""
    return {
        "flash_attn": "yes" if HAS_FLASH_ATTN else f"no ({WHY_NOT.get('flash_attn', 'unknown')})",
        "liger": "yes" if HAS_LIGER else f"no ({WHY_NOT.get('liger', 'unknown')})",
    }
