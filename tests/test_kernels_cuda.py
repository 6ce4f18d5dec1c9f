"""The Triton kernels compiled for a CUDA GPU, at LLaVA/LLaMA shapes, against their fp32 references.

Skipped without a GPU (CI); ``bench/gpu.sh`` runs them with BARNFAST_CUDA_TESTS=1. Same bound as
the CPU tests (STYLE.md): max|ours - ref32| <= 2 * max|torch in the same dtype - ref32| + atol.
"""

from __future__ import annotations

import pytest
import torch
from barnfast.kernels import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
    merge_visual_text,
    merge_visual_text_ref,
    projector_mlp,
    projector_mlp_ref,
)

from tests.utils import assert_close_to_ref, requires_compiled_triton

pytestmark = requires_compiled_triton
DTYPES = [torch.bfloat16, torch.float16]


def _grads(fn, leaves, grad_out=None):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves)
    out.backward(torch.randn_like(out) if grad_out is None else grad_out)
    return [out.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H,V", [(4096, 4096, 128256), (1531, 1000, 32001)])
def test_fused_linear_cross_entropy_cuda(N, H, V, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, H, device="cuda", generator=g)
    w = torch.randn(V, H, device="cuda", generator=g) / H**0.5 * 2
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    y[::7] = -100
    ref = _grads(lambda a, b: fused_linear_cross_entropy_ref(a, b, y), [h, w], torch.tensor(1.0, device="cuda"))
    low = _grads(lambda a, b: fused_linear_cross_entropy_ref(a.to(dtype), b.to(dtype), y), [h, w],
                 torch.tensor(1.0, device="cuda"))
    ours = _grads(lambda a, b: fused_linear_cross_entropy(a.to(dtype), b.to(dtype), y, backend="triton"), [h, w],
                  torch.tensor(1.0, device="cuda"))
    for name, o, r, lo in zip(("loss", "grad_hidden", "grad_weight"), ours, ref, low):
        assert_close_to_ref(name, o, r, lo, atol=1e-4 * r.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,Hd", [(576 * 4, 1024, 4096), (729 * 3, 1152, 4096), (577, 1152, 123)])
def test_projector_mlp_cuda(M, K, Hd, dtype):
    x = torch.randn(M, K, device="cuda")
    w1, b1 = torch.randn(Hd, K, device="cuda") / K**0.5, torch.randn(Hd, device="cuda") * 0.1
    w2, b2 = torch.randn(Hd, Hd, device="cuda") / Hd**0.5, torch.randn(Hd, device="cuda") * 0.1
    gout = torch.randn(M, Hd, device="cuda")
    leaves = [x, w1, b1, w2, b2]
    ref = _grads(lambda *a: projector_mlp_ref(*a), leaves, gout)
    low = _grads(lambda *a: projector_mlp_ref(*(t.to(dtype) for t in a)), leaves, gout.to(dtype))
    ours = _grads(lambda *a: projector_mlp(*(t.to(dtype) for t in a), backend="triton"), leaves, gout.to(dtype))
    for name, o, r, lo in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), ours, ref, low):
        assert_close_to_ref(name, o, r, lo, atol=1e-3 * r.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_visual_text_cuda(dtype):
    V, H, image_id, P = 32064, 4096, 32000, 576
    ids = torch.randint(0, 32000, (12000,), device="cuda")
    starts = [0, 3000, 3000 + P, 9000]  # an image at the start, two in a row, one near the end
    for s in starts:
        ids[s:s + P] = image_id
    ids[5000:5100] = 17  # a repeated token for the embedding gradient
    emb = torch.randn(V, H, device="cuda")
    vis = torch.randn(len(starts) * P, H, device="cuda")
    gout = torch.randn(ids.numel(), H, device="cuda")
    ref = _grads(lambda e, v: merge_visual_text_ref(ids, e, v, image_id), [emb, vis], gout)
    ours = _grads(lambda e, v: merge_visual_text(ids, e.to(dtype), v.to(dtype), image_id, backend="triton"),
                  [emb, vis], gout.to(dtype))
    low = _grads(lambda e, v: merge_visual_text_ref(ids, e.to(dtype), v.to(dtype), image_id), [emb, vis],
                 gout.to(dtype))
    for name, o, r, lo in zip(("out", "d_embed", "d_visual"), ours, ref, low):
        assert_close_to_ref(name, o, r, lo, atol=1e-6)


def test_packed_attention_flash_varlen_matches_block_mask():
    from barnfast import optional
    from barnfast.models.attention import block_causal_mask, packed_attention_forward

    if not optional.HAS_FLASH_ATTN:
        pytest.skip(f"flash-attn not installed: {optional.WHY_NOT.get('flash_attn')}")
    lengths = [700, 13, 2048, 333]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    T = sum(lengths)
    q = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16)
    flash, _ = packed_attention_forward(torch.nn.Module(), q, k, v, None, scaling=128**-0.5, cu_seqlens=cu,
                                        max_seqlen=max(lengths))
    masked, _ = packed_attention_forward(torch.nn.Module(), q, k, v, None, scaling=128**-0.5, cu_seqlens=cu,
                                         max_seqlen=max(lengths), packed_mask=block_causal_mask(cu, T))
    torch.testing.assert_close(flash.float(), masked.float(), atol=2e-2, rtol=2e-2)
