"""Backend dispatch shared by every op in barnfast.kernels."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_interpreted() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``), which accepts CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map ``backend`` to ``"triton"`` or ``"torch"`` for these input tensors.

    ``auto`` picks Triton when every tensor is on CUDA, the PyTorch path otherwise. An explicit
    ``triton`` on CPU tensors is only valid under ``TRITON_INTERPRET=1``; anything else is a
    ``ValueError`` that says what to do.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        return "triton" if on_cuda else "torch"
    if backend == "triton" and not on_cuda and not triton_interpreted():
        raise ValueError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported; "
            "use backend='torch' (or 'auto') on CPU"
        )
    return backend
