import torch
import torch.nn.functional as F

from barnfast.models.attention import block_causal_mask, packed_attention_forward


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
