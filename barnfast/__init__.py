"""barnfast: fast LLaVA-style vision-language training for controlled LLM-backbone sweeps."""

from barnfast import _quiet_imports

__version__ = "0.1.0"

_quiet_imports.install()  # before any barnfast module imports transformers (which imports torchao)
