"""barnfast.kernels: Triton kernels with autograd, a PyTorch reference for each, and device dispatch.

Imports torch and triton only (never transformers), so other trainers can use the ops alone:

    from barnfast.kernels import fused_linear_cross_entropy, projector_mlp, merge_visual_text

Every public op takes ``backend="auto" | "triton" | "torch"``: ``auto`` runs Triton on CUDA tensors
and the PyTorch reference path elsewhere; ``triton`` on CPU tensors works under ``TRITON_INTERPRET=1``.
"""

if __name__ != "barnfast.kernels":
    # Imported as a top-level ``kernels``: the checkout's root is on sys.path (pytest's rootdir, ``python -m``
    # from the checkout) and transformers imports any ``kernels`` it finds to read the hub package's version.
    # Loading the ops again here would register the ``barnfast::*`` custom ops a second time, which leaves the
    # first registration's op handles dangling (a segfault under a TorchDispatchMode, seen in
    # tests/test_precision.py). Stay empty: transformers then sees no version and no hub ``kernels``.
    pass
else:
    from ._backend import resolve_backend
    from .fused_linear_cross_entropy import (
        FusedLinearCrossEntropyLoss,
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_ref,
    )
    from .merge_visual_text import merge_visual_text, merge_visual_text_ref
    from .projector_mlp import ProjectorMLP, projector_mlp, projector_mlp_ref, rename_llava_mm_projector

__all__ = [
    "resolve_backend",
    "FusedLinearCrossEntropyLoss",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "ProjectorMLP",
    "projector_mlp",
    "projector_mlp_ref",
    "rename_llava_mm_projector",
    "merge_visual_text",
    "merge_visual_text_ref",
]
