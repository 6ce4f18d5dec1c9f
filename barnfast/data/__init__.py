"""Data: the LLaVA JSON reader, image loading/preprocessing, and the built-in synthetic dataset.

``generate`` / ``ensure_synthetic`` are imported lazily so that ``python -m barnfast.data.synthetic``
does not find its own module already imported by the package.
"""

from barnfast.data.images import expand_to_square, load_image, preprocess_image
from barnfast.data.llava import Sample, load_llava_json, validate_sample

__all__ = [
    "Sample",
    "ensure_synthetic",
    "expand_to_square",
    "generate",
    "load_image",
    "load_llava_json",
    "preprocess_image",
    "validate_sample",
]


def __getattr__(name):
    if name in ("generate", "ensure_synthetic"):
        from barnfast.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
