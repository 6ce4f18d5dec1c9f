"""barnfast: fast LLaVA-style vision-language training for controlled LLM-backbone sweeps."""

import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

from barnfast import _quiet_imports

__version__ = "0.1.0"


def _hide_source_kernels() -> None:
    """Keep the source folder ``kernels/`` from being imported a second time as a top-level ``kernels``.

    Run from the repository root (the cwd is on ``sys.path``), ``kernels/`` is importable as ``kernels``,
    and ``import transformers.activations`` probes for the PyPI package of that name by importing it:
    barnfast's custom ops were then registered twice (as ``kernels.*`` and ``barnfast.kernels.*``), and
    when the stray copy was garbage-collected its registrations went with it, so a later training step
    failed at random in the dispatcher ("schema ... not registered", segfaults). Only our own folder is
    hidden; a real ``kernels`` package elsewhere on the path is left alone.
    """
    try:
        spec = _util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    ours = _Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if spec is not None and spec.origin and _Path(spec.origin).resolve() == ours:
        _sys.modules.setdefault("kernels", None)  # find_spec("kernels") is then None: "not installed"


_hide_source_kernels()

_quiet_imports.install()  # before any barnfast module imports transformers (which imports torchao)
