"""barnfast: fast LLaVA-style vision-language training for controlled LLM-backbone sweeps."""

__version__ = "0.1.0"
