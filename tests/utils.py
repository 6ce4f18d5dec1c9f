"""Shared test helpers: the low-precision tolerance rule of STYLE.md, and skip markers."""

from __future__ import annotations

import os

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Compiled Triton on the GPU: a CUDA device, and the interpreter off (bench/gpu.sh sets BARNFAST_CUDA_TESTS=1).
requires_compiled_triton = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU with Triton compiling for it (BARNFAST_CUDA_TESTS=1, as bench/gpu.sh sets)",
)


def assert_close_to_ref(
    name: str, ours: torch.Tensor, ref32: torch.Tensor, torch_lowp: torch.Tensor | None = None, atol: float = 1e-5
):
    """``max|ours - ref32| <= 2 * max|torch_lowp - ref32| + atol``, printing max/mean diffs on failure.

    ``ref32`` is the fp32 reference; ``torch_lowp`` is what plain PyTorch computes in the same low
    precision as ``ours`` (None in fp32, where the bound is ``atol`` alone).
    """
    ours = ours.detach().float().cpu()
    ref32 = ref32.detach().float().cpu()
    assert ours.shape == ref32.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref32.shape)}"
    diff = (ours - ref32).abs()
    bound = atol
    base = 0.0
    if torch_lowp is not None:
        base = (torch_lowp.detach().float().cpu() - ref32).abs().max().item()
        bound = 2 * base + atol
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    assert diff.max().item() <= bound, (
        f"{name}: max|ours-ref|={diff.max().item():.3e} mean={diff.mean().item():.3e} "
        f"> bound {bound:.3e} (torch low-precision max err {base:.3e}, atol {atol:.1e})"
    )
