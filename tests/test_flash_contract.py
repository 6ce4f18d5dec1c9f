"""flash-attn's contract, checked on CPU: the exact ``flash_attn_varlen_func`` call a GPU run makes.

flash-attn does not follow autocast and checks its inputs in C++: fp16/bf16 only, one dtype for q/k/v,
(T, H, D) tensors with a contiguous last dim, ``cu_seqlens`` int32 on the tensors' device, ``max_seqlen``
a Python int, head dim a multiple of 8 up to 256, Hq a multiple of Hkv. The stand-in below enforces
exactly that and computes the result with a per-sample SDPA reference in fp32; the hook
(``optional.HAS_FLASH_ATTN``, ``optional.flash_attn_varlen_func``, ``attention.FLASH_DEVICES``) routes
barnfast's packed attention through it during a real train step on CPU, so a call that would fail on the
first GPU run fails here, in CI.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from barnfast import optional
from barnfast.models import attention
from barnfast.train import main
from tests.trace_utils import tiny_stage2_args


class FlashContractError(RuntimeError):
    pass


def strict_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                  softmax_scale=None, causal=False, **kwargs):
    """What flash-attn 2's ``flash_attn_varlen_func`` accepts, else :class:`FlashContractError`; (T, Hq, D) out."""
    def need(ok, what):
        if not ok:
            raise FlashContractError(what)

    tensors = {"q": q, "k": k, "v": v}
    for name, t in tensors.items():
        need(t.dtype in (torch.float16, torch.bfloat16), f"{name} is {t.dtype}: flash-attn takes fp16/bf16 only")
        need(t.dim() == 3, f"{name} must be (T, H, D), got shape {tuple(t.shape)}")
        need(t.stride(-1) == 1, f"{name} must have a contiguous last dim, strides {t.stride()}")
    need(q.dtype == k.dtype == v.dtype, f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    need(k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2],
         f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    need(q.shape[1] % k.shape[1] == 0, f"Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    need(q.shape[2] % 8 == 0 and q.shape[2] <= 256, f"head dim {q.shape[2]}: a multiple of 8 up to 256")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        need(isinstance(cu, torch.Tensor) and cu.dtype == torch.int32 and cu.dim() == 1,
             f"{name} must be a 1-D int32 tensor, got {getattr(cu, 'dtype', type(cu))}")
        need(cu.device == q.device, f"{name} is on {cu.device}, the tensors on {q.device}")
        need(cu.is_contiguous(), f"{name} must be contiguous")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        need(type(m) is int, f"{name} must be a Python int, got {type(m).__name__}")
    bounds = cu_seqlens_q.tolist()  # the stand-in may read them; the real kernel reads them on the device
    need(bounds[0] == 0 and bounds[-1] == q.shape[0], f"cu_seqlens must run from 0 to T={q.shape[0]}: {bounds}")
    need(max(b - a for a, b in zip(bounds[:-1], bounds[1:])) <= max_seqlen_q, "max_seqlen is below a sample's length")
    need(causal is True, "barnfast's packed attention is causal")
    need(dropout_p == 0.0 or torch.is_grad_enabled(), "dropout outside training")
    groups = q.shape[1] // k.shape[1]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1).float() for t in (q, k, v))  # (H, L, D)
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=softmax_scale).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)  # (T, Hq, D), in the input dtype as flash-attn returns it


@pytest.fixture
def flash_on_cpu(monkeypatch):
    calls = []

    def counted(*a, **k):
        calls.append(1)
        return strict_flash_attn_varlen_func(*a, **k)

    monkeypatch.setattr(optional, "HAS_FLASH_ATTN", True)
    monkeypatch.setattr(optional, "flash_attn_varlen_func", counted)
    monkeypatch.setattr(attention, "FLASH_DEVICES", ("cuda", "cpu"))
    return calls


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_step_makes_a_valid_flash_call_and_the_same_loss(tmp_path, monkeypatch, flash_on_cpu):
    assert main(tiny_stage2_args("llama3-tiny", tmp_path / "flash")) == 0
    assert flash_on_cpu, "the packed attention never reached flash_attn_varlen_func"
    flash = _losses(tmp_path / "flash")
    monkeypatch.setattr(optional, "HAS_FLASH_ATTN", False)
    assert main(tiny_stage2_args("llama3-tiny", tmp_path / "sdpa")) == 0
    sdpa = _losses(tmp_path / "sdpa")
    assert len(flash) == len(sdpa) == 2
    # bf16 attention outputs rounded from fp32 (stand-in) vs computed by CPU SDPA in bf16: a few bf16 ulps of a
    # loss near 10 (ln V) move it by ~1e-3 at most; a wrong mask or head mapping moves it by > 1e-1
    assert flash == pytest.approx(sdpa, abs=5e-3), (flash, sdpa)


@pytest.mark.parametrize("bad", ["fp32", "mixed", "strided", "cu_int64", "tensor_max_seqlen"])
def test_the_stand_in_refuses_what_flash_attn_refuses(bad):
    T, Hq, Hkv, D = 12, 4, 2, 16
    q, k, v = torch.randn(T, Hq, D).bfloat16(), torch.randn(T, Hkv, D).bfloat16(), torch.randn(T, Hkv, D).bfloat16()
    cu, m = torch.tensor([0, 5, 12], dtype=torch.int32), 7
    if bad == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    elif bad == "mixed":
        q, k = q.float(), k.float()
    elif bad == "strided":
        q = torch.randn(T, Hq, 2 * D).bfloat16()[..., ::2]
    elif bad == "cu_int64":
        cu = cu.long()
    else:
        m = torch.tensor(7)
    with pytest.raises(FlashContractError):
        strict_flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)
    strict_flash_attn_varlen_func(*(t.bfloat16().contiguous() for t in (torch.randn(T, Hq, D), k.float(),
                                                                       v.float())),
                                  cu.int(), cu.int(), 7, 7, causal=True)  # the valid call passes
