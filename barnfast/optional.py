"""Optional heavy dependencies, resolved once: every other module asks here.

Each ``HAS_X`` says whether the feature can run in this process, and ``WHY_NOT[x]`` says why not
(missing package, no CUDA, import error), so logs and skip reasons can name the cause.

It also holds the transformers range barnfast's patches are tested on (:data:`TRANSFORMERS_SUPPORTED`,
the same specifier as ``pyproject.toml``; ``tests/test_patch.py`` checks they agree). Where barnfast
reaches into transformers internals (``barnfast.patch``, ``barnfast.models.liger``) and does not
recognise them, :func:`unsupported_transformers` makes the error that names the model class, the
installed version and this range.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

logger = logging.getLogger(__name__)

# Lowest: the oldest release CI installs and passes the internals tests on (.ci/run, second venv).
# Upper: the next minor, not yet tested (5.24 renamed past_key_values -> cache and image_hidden_states ->
# image_outputs in the model outputs; a minor release can do that again).
TRANSFORMERS_SUPPORTED = ">=5.0,<5.25"

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


def transformers_version() -> str:
    return importlib.metadata.version("transformers")


def transformers_in_range() -> bool:
    return Version(transformers_version()) in SpecifierSet(TRANSFORMERS_SUPPORTED)


def unsupported_transformers(what: str) -> RuntimeError:
    """The error for internals barnfast does not recognise: ``what`` names the model class and the part."""
    where = "inside" if transformers_in_range() else "outside"
    return RuntimeError(
        f"{what}: barnfast does not recognise this in transformers {transformers_version()} ({where} the "
        f"supported range transformers{TRANSFORMERS_SUPPORTED}); install a tested release: "
        f"pip install 'transformers{TRANSFORMERS_SUPPORTED}' (or the repository's constraints.txt)"
    )


_WARNED_RANGE = False


def warn_if_transformers_out_of_range(what: str) -> None:
    """One warning per process when a patch runs on a transformers release outside the tested range; the
    patch still checks the internals it uses and raises :func:`unsupported_transformers` if they changed."""
    global _WARNED_RANGE
    if not _WARNED_RANGE and not transformers_in_range():
        _WARNED_RANGE = True
        logger.warning(
            "%s: transformers %s is outside the range barnfast is tested on (transformers%s); its internals "
            "are checked before patching", what, transformers_version(), TRANSFORMERS_SUPPORTED,
        )


def summary() -> dict[str, str]:
    """One line per optional feature, for the run record and the logs."""
    return {
        "flash_attn": "yes" if HAS_FLASH_ATTN else f"no ({WHY_NOT.get('flash_attn', 'unknown')})",
        "liger": "yes" if HAS_LIGER else f"no ({WHY_NOT.get('liger', 'unknown')})",
    }
