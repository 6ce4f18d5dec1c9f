"""Evaluation internals: file formats (:mod:`.formats`) and the loaded export (:mod:`.model`).

The command line is ``python -m barnfast.evaluation.evaluate``; scoring lives in :mod:`barnfast.evaluation.evaluate`.
"""

from barnfast.evaluation.exported import ExportedVLM
from barnfast.evaluation.formats import EvalItem, load_items

__all__ = ["EvalItem", "ExportedVLM", "load_items"]
