import pytest
import torch
import torch.nn.functional as F

from barnfast.models.attention import block_causal_mask, packed_attention_forward, packing_kwargs


def test_block_causal_mask_isolates_samples():
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    m = block_causal_mask(cu, 6)[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for a, b in [(0, 2), (2, 5), (5, 6)]:
        expected[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    assert torch.equal(m, expected)


def test_packed_attention_equals_per_sample_attention_with_gqa():
    lengths = [7, 1, 12, 4]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T, Hq, Hkv, D = sum(lengths), 4, 2, 8
    q, k, v = torch.randn(1, Hq, T, D), torch.randn(1, Hkv, T, D), torch.randn(1, Hkv, T, D)
    out, _ = packed_attention_forward(torch.nn.Module(), q, k, v, None, scaling=D**-0.5, cu_seqlens=cu,
                                      max_seqlen=max(lengths))
    assert out.shape == (1, T, Hq, D)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk = k[:, :, a:b].repeat_interleave(2, dim=1)
        vv = v[:, :, a:b].repeat_interleave(2, dim=1)
        ref = F.scaled_dot_product_attention(q[:, :, a:b], kk, vv, is_causal=True, scale=D**-0.5)
        torch.testing.assert_close(out[0, a:b], ref[0].transpose(0, 1), rtol=1e-5, atol=1e-6)


def _packed_qkv(lengths, Hq=4, Hkv=2, D=8, dtype=torch.float32):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lengths)
    qkv = [torch.randn(1, h, T, D, dtype=dtype, requires_grad=True) for h in (Hq, Hkv, Hkv)]
    return cu, qkv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_sample_fallback_equals_the_dense_mask_path(dtype):
    """The O(T) fallback (no (T, T) mask, no repeated K/V) gives today's dense-mask result, forward and backward."""
    lengths = [7, 1, 12, 4, 33]
    cu, (q, k, v) = _packed_qkv(lengths, dtype=dtype)
    kw = dict(scaling=8**-0.5, cu_seqlens=cu, max_seqlen=max(lengths))
    new, _ = packed_attention_forward(torch.nn.Module(), q, k, v, None, cu_seqlens_host=tuple(cu.tolist()), **kw)
    (g_new,) = [torch.autograd.grad(new.float().square().sum(), (q, k, v))]
    old, _ = packed_attention_forward(torch.nn.Module(), q, k, v, None, packed_mask=block_causal_mask(cu, sum(lengths)),
                                      **kw)
    (g_old,) = [torch.autograd.grad(old.float().square().sum(), (q, k, v))]
    # fp32: summation order differs (per-sample vs masked full rows); grads are O(1-10), 1e-5 is a few ulps
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(new, old, **tol)
    for a, b in zip(g_new, g_old):
        torch.testing.assert_close(a, b, **tol)


def test_fallback_builds_no_dense_mask_and_repeats_no_kv(monkeypatch):
    """What makes it O(T): neither a (T, T) tensor nor a repeat_interleave of K/V on the way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    lengths = [40, 3, 57]
    T = sum(lengths)
    cu, (q, k, v) = _packed_qkv(lengths)
    seen = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            seen.extend((str(func), tuple(o.shape)) for o in outs if isinstance(o, torch.Tensor))
            return out

    kwargs = packing_kwargs(cu, max(lengths), T, tuple(cu.tolist()))
    assert "packed_mask" not in kwargs
    with Shapes():
        out, _ = packed_attention_forward(torch.nn.Module(), q, k, v, None, **kwargs)
        out.sum().backward()
    big = [(f, s) for f, s in seen if s.count(T) >= 2 or "repeat_interleave" in f]
    assert not big, big


def test_packing_kwargs_rejects_boundaries_that_do_not_match():
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_host"):
        packing_kwargs(cu, 6, 9, (0, 3, 8))


def test_q_k_v_reach_sdpa_in_the_autocast_dtype(monkeypatch):
    """RoPE hands q, k in fp32 and v in bf16 under autocast: the kernel must get one low-precision dtype."""
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or sdpa(q, k, v, *a, **kw))
    lengths = [5, 9]
    cu, (q, k, v) = _packed_qkv(lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_attention_forward(torch.nn.Module(), q, k, v.bfloat16(), None, cu_seqlens=cu,
                                          max_seqlen=9, cu_seqlens_host=(0, 5, 14))
    assert seen and set(seen) == {(torch.bfloat16,) * 3}, seen
    assert out.dtype == torch.bfloat16
