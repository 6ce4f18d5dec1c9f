"""Attention isolated per sample over a packed sequence, plugged into Hugging Face decoder layers.

A packed micro-batch is one row of T tokens holding B samples back to back; ``cu_seqlens`` (int32,
B+1) marks where each starts. Attention must never cross a sample boundary:

- CUDA with flash-attn: ``flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, ...)``,
  O(T) memory, no mask at all.
- elsewhere: causal SDPA per sample over the ``cu_seqlens`` boundaries, with ``enable_gqa`` (torch >= 2.5)
  so K/V heads are never repeated: O(T) memory too (the old dense (T, T) block-causal mask was 256 MiB
  at T = 16384 before SDPA's own temporaries; ``bench/bench_attention_fallback.py`` measures both). The
  boundaries come from the host (``cu_seqlens_host``, built by the collator), so the loop costs no sync.
  :func:`block_causal_mask` remains the reference (and a caller may still pass ``packed_mask``).

q, k and v reach either path in ONE dtype: under autocast, the autocast dtype. Hugging Face's RoPE
computes in fp32 from fp32 embeddings, so without this q, k would arrive fp32 and v bf16: SDPA on CPU
hides it (autocast casts its inputs), flash-attn does not follow autocast and refuses fp32 or mixed
inputs. ``tests/test_flash_contract.py`` routes this module through a stand-in that enforces
flash-attn's contract (:data:`FLASH_DEVICES` is the hook).

Hugging Face's own packed-sequence detection (from ``position_ids``) turns itself off when an
attention mask or a cache is present, so barnfast does not rely on it: the function below is
registered as the attention implementation ``"barnfast_packed"`` and reads the packing from
explicit keyword arguments. Without them (``generate``, Hugging Face's own forward) it behaves as
plain SDPA with the mask Hugging Face built, so a model configured with it stays usable everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from barnfast import optional

ATTN_IMPLEMENTATION = "barnfast_packed"
# Device types on which flash-attn (when installed) takes the packed attention. The CPU contract test adds "cpu"
# with a stand-in ``flash_attn_varlen_func``, so the exact GPU call runs in CI.
FLASH_DEVICES: tuple[str, ...] = ("cuda",)


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(1, 1, T, T) bool mask: token i attends to token j iff both are in the same sample and j <= i."""
    seq_id = torch.searchsorted(cu_seqlens[1:].to(torch.int64), torch.arange(total, device=cu_seqlens.device),
                                right=True)
    same = seq_id[:, None] == seq_id[None, :]
    causal = torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).tril_()
    return (same & causal)[None, None]


def _one_dtype(query, key, value):
    """q, k, v in one dtype: the autocast dtype under autocast, else the lowest-precision of the three."""
    dev = query.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    elif query.dtype == key.dtype == value.dtype:
        return query, key, value
    else:
        dt = min((value.dtype, key.dtype, query.dtype), key=lambda d: d.itemsize)
    return tuple(t if t.dtype == dt else t.to(dt) for t in (query, key, value))


def _use_flash(query: torch.Tensor, packed_mask) -> bool:
    return optional.HAS_FLASH_ATTN and query.device.type in FLASH_DEVICES and packed_mask is None


def per_sample_attention(query, key, value, bounds, dropout: float = 0.0, scaling: float | None = None):
    """(1, Hq, T, D) causal attention of each sample ``bounds[i]:bounds[i+1]`` alone → (1, Hq, T, D).

    ``bounds``: host ints (the cu_seqlens). No (T, T) mask, and GQA through ``enable_gqa``: no repeated K/V."""
    T = query.shape[2]
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(f"cu_seqlens must run from 0 to T={T}, got {bounds[0]}..{bounds[-1]}")
    gqa = query.shape[1] != key.shape[1]
    outs = [
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for a, b in zip(bounds[:-1], bounds[1:]) if b > a
    ]
    return torch.cat(outs, 2) if len(outs) != 1 else outs[0]


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, Hq, T, D)
    key: torch.Tensor,  # (1, Hkv, T, D)
    value: torch.Tensor,  # (1, Hkv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    packed_mask: torch.Tensor | None = None,
    cu_seqlens_host: tuple[int, ...] | list[int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Returns (1, T, Hq, D) as Hugging Face attention functions do.

    ``cu_seqlens_host``: the same boundaries as host ints (else read from ``cu_seqlens``: one host sync per
    layer on a GPU without flash-attn); ``packed_mask``: a dense (1, 1, T, T) mask, the old path."""
    if cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got batch {query.shape[0]}")
    query, key, value = _one_dtype(query, key, value)
    if _use_flash(query, packed_mask):
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D), last dim contiguous
        out = optional.flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            dropout_p=dropout, softmax_scale=scaling, causal=True,
        )
        return out.unsqueeze(0), None
    if packed_mask is None:
        bounds = list(cu_seqlens_host) if cu_seqlens_host is not None else cu_seqlens.tolist()
        return per_sample_attention(query, key, value, bounds, dropout, scaling).transpose(1, 2), None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # GQA: expand kv heads (SDPA's enable_gqa is not taken by every backend)
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=packed_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2), None


def packing_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int, total: int,
                   cu_seqlens_host: tuple[int, ...] | list[int] | None = None) -> dict:
    """Keyword arguments the decoder layers forward to :func:`packed_attention_forward`.

    No mask: flash-attn packs from ``cu_seqlens``, the fallback loops over ``cu_seqlens_host``. ``total`` (T)
    is checked against the boundaries here, once per micro-batch, when they are on the host.
    """
    if cu_seqlens_host is not None and (len(cu_seqlens_host) != cu_seqlens.shape[0] or cu_seqlens_host[-1] != total):
        raise ValueError(f"cu_seqlens_host {list(cu_seqlens_host)[:8]}... does not match cu_seqlens "
                         f"({cu_seqlens.shape[0]} entries) and T={total}")
    kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": int(max_seqlen)}
    if cu_seqlens_host is not None:
        kwargs["cu_seqlens_host"] = tuple(int(x) for x in cu_seqlens_host)
    return kwargs


AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
