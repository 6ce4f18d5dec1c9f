"""Attention isolated per sample over a packed sequence, plugged into Hugging Face decoder layers.

A packed micro-batch is one row of T tokens holding B samples back to back; ``cu_seqlens`` (int32,
B+1) marks where each starts. Attention must never cross a sample boundary:

- CUDA with flash-attn: ``flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, ...)``,
  O(T) memory, no mask at all.
- elsewhere: SDPA with a block-causal boolean mask (T, T) built once per micro-batch from
  ``cu_seqlens`` (:func:`block_causal_mask`) and passed down through the layers' ``**kwargs``.

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


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(1, 1, T, T) bool mask: token i attends to token j iff both are in the same sample and j <= i."""
    seq_id = torch.searchsorted(cu_seqlens[1:].to(torch.int64), torch.arange(total, device=cu_seqlens.device),
                                right=True)
    same = seq_id[:, None] == seq_id[None, :]
    causal = torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).tril_()
    return (same & causal)[None, None]


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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Returns (1, T, Hq, D) as Hugging Face attention functions do."""
    if cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got batch {query.shape[0]}")
    if optional.HAS_FLASH_ATTN and query.is_cuda and packed_mask is None:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
        out = optional.flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            dropout_p=dropout, softmax_scale=scaling, causal=True,
        )
        return out.unsqueeze(0), None
    if packed_mask is None:
        packed_mask = block_causal_mask(cu_seqlens, query.shape[2])
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # GQA: expand kv heads (SDPA's enable_gqa is not taken by every backend)
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=packed_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2), None


def packing_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> dict:
    """Keyword arguments the decoder layers forward to :func:`packed_attention_forward`.

    The block-causal mask is built here, once per micro-batch, unless flash-attn handles the
    packing from ``cu_seqlens`` alone.
    """
    kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": int(max_seqlen)}
    if not (optional.HAS_FLASH_ATTN and cu_seqlens.is_cuda):
        kwargs["packed_mask"] = block_causal_mask(cu_seqlens, total)
    return kwargs


AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
