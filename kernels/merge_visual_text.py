"""Packed visual-text merge: token embeddings and projected visual rows -> packed input embeddings.

``out[t] = visual[k]`` when ``input_ids[t]`` is the k-th placeholder of the packed sequence, else
``embed_weight[input_ids[t]]``. input_ids (T,) int64 with T = all tokens of a packed micro-batch
(~16 x 2k), embed_weight (V, H) the LLM's table (32000 x 4096 for LLaMA-2), visual (M, H) the
projector's output, M = number of placeholders (576 per CLIP-L image).

Replaces LLaVA's per-sample Python loop (split ids at the image token, embed the pieces, torch.cat
with the image features, re-pad: ~6 launches and 2 copies of every row per sample) with one gather
kernel that reads each output row once from where it lives and writes it once: 2 * T * H * bytes
of traffic, the minimum. The placeholder's own embedding row is never read, so its id may be any
row of the table (trainers add ``<image>`` to the vocabulary and leave the row untrained).

Which visual row a placeholder takes is a prefix count of placeholders, computed with one
``torch.cumsum`` over T int64 (T * 8 B = 256 KB at T=32k, ~5 us): a grid-wide scan inside the
kernel would need a decoupled look-back for no measurable gain.

Backward: grad_visual[k] = grad_out[t_k] (a row gather); grad_embed[v] = sum of grad_out[t] over
the text tokens t with id v. The sum is deterministic and fp32 without a (V, H) fp32 buffer (which
would be 2 GB for LLaMA-3's 128k x 4096) or atomics: the ids are sorted once (torch.sort, stable,
T elements), and the program at the first position of each run of equal ids sums the run in
registers and writes the row once. Each input's work is skipped when it does not need a gradient
(stage 1 freezes embed_weight: no sort, no (V, H) zero fill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import resolve_backend, triton_interpreted

# Forward: 16 rows x 256 columns per program: 4 warps move 8 KB (bf16) per program, 64 B per thread
# in flight per load, enough to keep an A100/H100 memory pipe full on a pure copy; 16 rows amortise
# the id/index loads. Backward keeps one row per program (the segment loop is per row) and 256
# columns, so a token repeated r times costs r serial 512-B loads spread over H/256 programs.
FWD_BLOCK_T = 16
BLOCK_H = 256


@triton.jit
def _round_bf16_rne(x):
    """Round fp32 ``x`` to the nearest bf16 value (ties to even), still as fp32.

    Only for TRITON_INTERPRET=1, whose fp32 -> bf16 cast truncates while the GPU rounds to nearest.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _merge_visual_text_fwd_kernel(
    ids_ptr,
    vis_idx_ptr,
    embed_ptr,
    visual_ptr,
    out_ptr,
    T,
    H,
    image_token_id,
    stride_e,
    stride_v,
    stride_o,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t, h] = visual[vis_idx[t], h] if ids[t] == image_token_id else embed[ids[t], h]."""
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rh = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = rt < T
    mask = mask_t[:, None] & (rh < H)[None, :]
    tok = tl.load(ids_ptr + rt, mask=mask_t, other=0)
    is_img = tok == image_token_id
    k = tl.load(vis_idx_ptr + rt, mask=mask_t & is_img, other=0)
    # Two masked loads, each row fetched from exactly one of them: placeholder rows never touch the table.
    text = tl.load(embed_ptr + tok[:, None] * stride_e + rh[None, :], mask=mask & ~is_img[:, None], other=0.0)
    vis = tl.load(visual_ptr + k[:, None] * stride_v + rh[None, :], mask=mask & is_img[:, None], other=0.0)
    tl.store(out_ptr + rt[:, None] * stride_o + rh[None, :], tl.where(is_img[:, None], vis, text), mask=mask)


@triton.jit
def _merge_visual_text_bwd_kernel(
    keys_ptr,
    perm_ptr,
    run_end_ptr,
    vis_idx_ptr,
    grad_out_ptr,
    grad_embed_ptr,
    grad_visual_ptr,
    T,
    H,
    V,
    stride_g,
    stride_ge,
    stride_gv,
    NEED_EMBED: tl.constexpr,
    NEED_VISUAL: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program i owns sorted position i: keys[i] = V marks a placeholder (copy its row to grad_visual);
    otherwise the first position of a run of equal ids sums grad_out over the run into grad_embed[id].
    """
    i = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = rh < H
    key = tl.load(keys_ptr + i)  # i < T: the grid has exactly T rows
    if key == V:
        if NEED_VISUAL:
            t = tl.load(perm_ptr + i)
            k = tl.load(vis_idx_ptr + t)
            g = tl.load(grad_out_ptr + t * stride_g + rh, mask=mask_h, other=0.0)
            tl.store(grad_visual_ptr + k * stride_gv + rh, g, mask=mask_h)
    else:
        if NEED_EMBED:
            prev = tl.load(keys_ptr + tl.maximum(i - 1, 0))
            if (i == 0) | (prev != key):
                end = tl.load(run_end_ptr + i)
                acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
                for j in range(i, end):  # positions in input order (stable sort): deterministic fp32 sum
                    t = tl.load(perm_ptr + j)
                    acc += tl.load(grad_out_ptr + t * stride_g + rh, mask=mask_h, other=0.0).to(tl.float32)
                if INTERPRET_BF16:
                    acc = _round_bf16_rne(acc)
                tl.store(
                    grad_embed_ptr + key * stride_ge + rh,
                    acc.to(grad_embed_ptr.dtype.element_ty),
                    mask=mask_h,
                )


# ----------------------------------------------------------------------------------------------
# Plain-tensor launchers
# ----------------------------------------------------------------------------------------------


def _visual_index(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(T,) int64: at each placeholder, its rank among the placeholders (0, 1, ...); elsewhere junk."""
    return torch.cumsum(input_ids == image_token_id, 0) - 1


def _merge_fwd(input_ids, embed_weight, visual, image_token_id: int) -> torch.Tensor:
    T, H = input_ids.shape[0], embed_weight.shape[1]
    out = torch.empty((T, H), device=embed_weight.device, dtype=embed_weight.dtype)
    if T == 0 or H == 0:
        return out
    embed_weight = embed_weight if embed_weight.stride(1) == 1 else embed_weight.contiguous()
    visual = visual if visual.stride(1) == 1 else visual.contiguous()
    grid = (triton.cdiv(T, FWD_BLOCK_T), triton.cdiv(H, BLOCK_H))
    _merge_visual_text_fwd_kernel[grid](
        input_ids,
        _visual_index(input_ids, image_token_id),
        embed_weight,
        visual,
        out,
        T,
        H,
        image_token_id,
        embed_weight.stride(0),
        visual.stride(0),
        out.stride(0),
        BLOCK_T=FWD_BLOCK_T,
        BLOCK_H=BLOCK_H,
    )
    return out


def _merge_bwd(
    grad_out,
    input_ids,
    image_token_id: int,
    num_embeddings: int,
    num_visual: int,
    need_embed: bool,
    need_visual: bool,
):
    """(grad_embed (V, H) or None, grad_visual (M, H) or None)."""
    T, H = grad_out.shape
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    grad_embed = grad_out.new_zeros((num_embeddings, H)) if need_embed else None
    grad_visual = grad_out.new_empty((num_visual, H)) if need_visual else None
    if T == 0 or H == 0 or not (need_embed or need_visual):
        return grad_embed, grad_visual
    is_img = input_ids == image_token_id
    keys = torch.where(is_img, num_embeddings, input_ids)  # placeholders sort after every real id
    if need_embed:
        keys, perm = torch.sort(keys, stable=True)
        run_end = torch.searchsorted(keys, keys, right=True)  # one past the last position of each id's run
    else:
        perm = torch.arange(T, device=keys.device)
        run_end = keys  # not read
    grid = (T, triton.cdiv(H, BLOCK_H))
    _merge_visual_text_bwd_kernel[grid](
        keys,
        perm,
        run_end,
        _visual_index(input_ids, image_token_id),
        grad_out,
        grad_embed if need_embed else grad_out,
        grad_visual if need_visual else grad_out,
        T,
        H,
        num_embeddings,
        grad_out.stride(0),
        grad_embed.stride(0) if need_embed else 0,
        grad_visual.stride(0) if need_visual else 0,
        NEED_EMBED=need_embed,
        NEED_VISUAL=need_visual,
        INTERPRET_BF16=triton_interpreted() and grad_out.dtype == torch.bfloat16,
        BLOCK_H=BLOCK_H,
    )
    return grad_embed, grad_visual


# ----------------------------------------------------------------------------------------------
# Autograd wrapper: custom ops, so torch.compile traces through them
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("barnfast::merge_visual_text", mutates_args=())
def _merge_visual_text_op(
    input_ids: torch.Tensor, embed_weight: torch.Tensor, visual: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    return _merge_fwd(input_ids, embed_weight, visual, image_token_id)


@_merge_visual_text_op.register_fake
def _(input_ids, embed_weight, visual, image_token_id):
    return embed_weight.new_empty((input_ids.shape[0], embed_weight.shape[1]))


@torch.library.custom_op("barnfast::merge_visual_text_backward", mutates_args=())
def _merge_visual_text_backward_op(
    grad_out: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    num_embeddings: int,
    num_visual: int,
    need_embed: bool,
    need_visual: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_embed (V, H), grad_visual (M, H)); one not needed comes back as an empty (0,) tensor."""
    ge, gv = _merge_bwd(
        grad_out, input_ids, image_token_id, num_embeddings, num_visual, need_embed, need_visual
    )
    empty = grad_out.new_empty(0)
    return (ge if ge is not None else empty), (gv if gv is not None else empty)


@_merge_visual_text_backward_op.register_fake
def _(grad_out, input_ids, image_token_id, num_embeddings, num_visual, need_embed, need_visual):
    H = grad_out.shape[1]
    return (
        grad_out.new_empty((num_embeddings, H)) if need_embed else grad_out.new_empty(0),
        grad_out.new_empty((num_visual, H)) if need_visual else grad_out.new_empty(0),
    )


def _merge_setup_context(ctx, inputs, output):
    input_ids, embed_weight, visual, image_token_id = inputs
    ctx.save_for_backward(input_ids)
    ctx.image_token_id = image_token_id
    ctx.num_embeddings = embed_weight.shape[0]
    ctx.num_visual = visual.shape[0]


def _merge_backward(ctx, grad_out):
    (input_ids,) = ctx.saved_tensors
    need_embed, need_visual = bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])
    ge, gv = _merge_visual_text_backward_op(
        grad_out, input_ids, ctx.image_token_id, ctx.num_embeddings, ctx.num_visual, need_embed, need_visual
    )
    return None, (ge if need_embed else None), (gv if need_visual else None), None


_merge_visual_text_op.register_autograd(_merge_backward, setup_context=_merge_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def merge_visual_text_ref(
    input_ids: torch.Tensor, embed_weight: torch.Tensor, visual: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """PyTorch reference: (T, H) embeddings with the k-th placeholder's row replaced by ``visual[k]``.

    The k-th placeholder's rank k is a cumulative count, and its row is gathered from ``visual``; the
    placeholder's table row is looked up (as row 0) and then dropped, so it gets no gradient. A gather,
    not ``masked_scatter``: the latter's backward is a ``masked_select``, whose output size the host must
    read (a device sync per micro-step on a GPU).
    """
    is_img = input_ids == image_token_id
    text = torch.nn.functional.embedding(torch.where(is_img, 0, input_ids), embed_weight)
    # one zero row after the M visual rows: what non-placeholder positions gather (then drop), so M = 0 works
    src = torch.cat([visual.to(embed_weight.dtype), text.new_zeros(1, text.shape[1])])  # (M + 1, H)
    rank = torch.where(is_img, torch.cumsum(is_img, 0) - 1, visual.shape[0])  # (T,) k at the k-th placeholder
    return torch.where(is_img[:, None], src.index_select(0, rank), text)


def merge_visual_text(
    input_ids: torch.Tensor,  # (T,) int64, the packed micro-batch
    embed_weight: torch.Tensor,  # (V, H)
    visual: torch.Tensor,  # (M, H), M = number of placeholders in input_ids
    image_token_id: int,
    *,
    backend: str = "auto",
    num_image_tokens: int | None = None,
) -> torch.Tensor:
    """(T, H) packed input embeddings: ``visual[k]`` at the k-th ``image_token_id``, table rows elsewhere.

    Differentiable in ``embed_weight`` (rows summed over repeated ids) and ``visual``. The check that M
    equals the number of placeholders counts them on the host (one ``.item()``, a device sync);
    a caller that already knows the count passes ``num_image_tokens`` and there is no sync (the count
    is then trusted: a wrong one gives wrong rows, not an error). The output has embed_weight's dtype
    (visual is cast to it). Ids are not range-checked (that would be a second sync).
    """
    if input_ids.dim() != 1 or embed_weight.dim() != 2 or visual.dim() != 2:
        raise ValueError(
            f"merge_visual_text: expected input_ids (T,), embed_weight (V, H), visual (M, H); got "
            f"{tuple(input_ids.shape)}, {tuple(embed_weight.shape)}, {tuple(visual.shape)}"
        )
    if visual.shape[1] != embed_weight.shape[1]:
        raise ValueError(
            f"merge_visual_text: visual has H={visual.shape[1]}, embed_weight has H={embed_weight.shape[1]}"
        )
    if not 0 <= image_token_id < embed_weight.shape[0]:
        raise ValueError(
            f"merge_visual_text: image_token_id={image_token_id} is outside the table "
            f"(V={embed_weight.shape[0]})"
        )
    if num_image_tokens is None:
        num_image_tokens = int((input_ids == image_token_id).sum().item())
    if num_image_tokens != visual.shape[0]:
        raise ValueError(
            f"merge_visual_text: {visual.shape[0]} visual rows but {num_image_tokens} placeholder "
            f"tokens (id {image_token_id}) in input_ids; they must be equal"
        )
    if resolve_backend(backend, input_ids, embed_weight, visual) == "torch":
        return merge_visual_text_ref(input_ids, embed_weight, visual, image_token_id)
    return _merge_visual_text_op(
        input_ids.contiguous(), embed_weight, visual.to(embed_weight.dtype), image_token_id
    )
