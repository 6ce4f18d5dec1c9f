"""Evaluation internals: file formats (:mod:`.formats`) and the loaded export (:mod:`.model`).

The command line is ``python -m barnfast.eval``; scoring lives in :mod:`barnfast.eval`.
"""

from .formats import EvalItem, load_items
from .model import ExportedVLM

__all__ = ["EvalItem", "ExportedVLM", "load_items"]
