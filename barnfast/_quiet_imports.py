"""Drop the import-time noise torchao makes on machines it was not built for (stdlib only, no imports of it).

transformers imports torchao whenever it is installed (``transformers.quantizers`` →
``quantizer_torchao``), so every ``import transformers``-using barnfast module would print, on a CPU
machine with torchao 0.18 and torch 2.13:

- ``Failed to load .../torchao/_C_mxfp8...so`` (and ``_C_cutlass_90a``): torchao's CUDA extensions for
  sm_90a / another CPython ABI, logged at WARNING by the ``torchao`` logger; torchao runs without them;
- ``<enum 'KernelPreference'> is an Enum subclass ... register_constant() ... deprecated``: torch's
  pytree logger, once per torchao enum (2 lines).

:func:`install` puts a filter on exactly those two loggers that drops exactly those records (other
torchao warnings, and pytree warnings about anyone else's classes, still show). Filters sit on the
logger objects, which exist before the modules that use them are imported, so nothing is imported here.
``barnfast/__init__.py`` installs it, i.e. before any barnfast module imports transformers.
"""

from __future__ import annotations

import logging


def _torchao_extension_not_loaded(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return message.startswith("Failed to load ") and "torchao" in message and ".so" in message


def _torchao_enum_register_constant(record: logging.LogRecord) -> bool:
    # record.args[0] is the class torchao registers, e.g. torchao.quantization....KernelPreference.
    cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return (
        "is an Enum subclass" in str(record.msg)
        and isinstance(cls, type)
        and cls.__module__.split(".")[0] == "torchao"
    )


class _Drop(logging.Filter):
    def __init__(self, predicate):
        super().__init__()
        self.predicate = predicate

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.predicate(record)


_FILTERS = {
    "torchao": _Drop(_torchao_extension_not_loaded),
    "torch.utils._pytree": _Drop(_torchao_enum_register_constant),
}


def install() -> None:
    """Idempotent: one filter per logger however often it is called."""
    for name, f in _FILTERS.items():
        logger = logging.getLogger(name)
        if f not in logger.filters:
            logger.addFilter(f)
