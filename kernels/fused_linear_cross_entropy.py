"""Fused linear cross-entropy: the loss straight from the last hidden states and the ``lm_head`` weight.

What it fuses. ``F.cross_entropy(hidden @ weight.T + bias, target)`` materialises the (N, V) logits, their
log-softmax and, in backward, their gradient: at LLaMA-3's V = 128,256 that is 4 GiB of fp32 per tensor for an
8k-token micro-batch. Here the tokens are split into chunks of C rows; for each chunk the (C, V) logits are
computed, turned *in place* into d loss / d logits, and immediately consumed by the two gradient GEMMs:

    grad_hidden[chunk]  = dlogits @ weight                  # (C, H), written once
    grad_weight        += dlogits.T @ hidden[chunk]          # (V, H), ONE fp32 accumulator, addmm_ in place
    grad_bias          += dlogits.sum(0)                     # (V,)

so the live memory is one (C, V) chunk instead of ~3 (N, V) tensors. Both backends chunk; they differ only in
the step that turns a logits chunk into (loss, dlogits):

- ``torch``: in-place PyTorch ops on the chunk (CPU users and CI get the memory saving too).
- ``triton``: ``_flce_ce_kernel``, one program per row, two sweeps over the vocabulary in ``BLOCK_V`` blocks:
  an online max / sum-exp (plus the target logit and, for label smoothing, the row sum), then the softmax, the
  loss and the logit gradient written in place over the logits buffer in the buffer's dtype (how Liger-Kernel
  does it).

Math (per row, logits z, softcap c, smoothing eps, target y): s = c * tanh(z / c) (or s = z), lse =
logsumexp(s), loss = lse - (1 - eps) * s_y - eps / V * sum_j s_j, and d loss / d z_j = (softmax(s)_j - (1 -
eps) [j = y] - eps / V) * (1 - tanh(z_j / c)^2). This is ``F.cross_entropy(..., label_smoothing=eps)``
exactly.

Decisions, and why:
- Gradients are computed in the forward pass when an input requires grad (3 GEMMs in all instead of 4: the
  logits GEMM is not redone in backward). For ``"mean"``/``"sum"`` the upstream gradient is a scalar and
  backward only scales the saved gradients, in place. For ``"none"`` the upstream gradient is per token and
  enters *inside* the sum over tokens of grad_weight, so it cannot be applied afterwards (the bug users report
  in Liger): forward then computes only the losses (1 GEMM per chunk), and backward runs the chunked pass
  again with per-row scales equal to the upstream gradient (3 GEMMs).
- Ignored rows are dropped before any GEMM (one ``nonzero``, i.e. one host sync per call, unless the caller
  passes ``target_rows``, the indices its collator found on the host: then none): in LLaVA batches
  most positions are prompt or image tokens whose targets are ``ignore_index``, so their GEMMs are pure waste.
  It also makes "every target ignored" a no-op (loss 0, zero gradients) instead of 0/0.
- The mean normaliser is a device tensor (count of non-ignored targets, or ``num_target_tokens``), folded into
  the per-row gradient scale inside the op, so a global normaliser on the device costs no extra sync; a
  normaliser of 0 (every target ignored) gives loss 0, not NaN.
- Autocast is followed like a built-in GEMM: under ``torch.autocast`` the public function passes the autocast
  dtype as the op's ``compute_dtype``, and all three GEMMs (logits, grad_hidden, grad_weight) take operands in
  it (bf16 tensor cores: 312 vs 19.5 TFLOP/s fp32 on an A100), accumulating in fp32. The inputs themselves
  stay fp32 (fp32 master ``lm_head.weight``, fp32 hidden states out of the final RMSNorm): the op casts the
  weight once per call (V*H*2 bytes, what autocast's weight cache holds for ``F.linear`` too) and each hidden
  chunk, and returns gradients in the inputs' dtypes. This is why it is not ``register_autocast``, which casts
  the inputs *before* autograd: the weight gradient would then be rounded to bf16 on its way to the fp32
  master weight, after being accumulated in fp32. Inside the op autocast is off, so every dtype is explicit.
- grad_weight accumulates in fp32 (one (V, H) fp32 buffer; bf16/fp16 operands go through
  ``addmm(out_dtype=float32)`` where the build has it (recent CUDA builds); elsewhere each chunk's product is
  computed in the operands' dtype, fp32 accumulation inside the GEMM, and added to the fp32 buffer in blocks of
  rows, so there is no (V, H) temporary either way), then is cast once to the weight's dtype. This is what makes the
  low-precision error match plain PyTorch's single GEMM; it costs V*H*4 bytes more than accumulating in bf16
  (1 GiB more at LLaMA-3-8B than Liger's default bf16 accumulator, whose per-chunk rounding is the price).
  There is never a per-chunk (V, H) temporary (Liger's ``grad_weight += (...).float()``).
- The loss is returned in fp32 whatever the input dtype (it is accumulated in fp32; a bf16 mean of ~2.3 keeps
  only 2-3 significant digits).
- ``torch.library.custom_op("barnfast::fused_linear_cross_entropy")`` with ``register_fake`` and
  ``register_autograd``: ``torch.compile`` traces it as one opaque node, without a graph break, and the
  normaliser is computed inside the op from the real targets, so ignored targets give the right loss there
  too.

Shapes: hidden (N, H), weight (V, H), target (N,) int64, bias (V,) or None. Loss: () for "mean"/"sum", (N,)
for "none" (0 at ignored positions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import resolve_backend

# Tuning constants
# ---------------------------------------------------------------------------------------------------

# torch backend: rows per chunk = TORCH_CHUNK_ELEMS // V, i.e. a (C, V) fp32 chunk of 2**24 elements = 64 MiB
# (C = 130 at V = 128,256). Measured with `bench/bench_fused_linear_cross_entropy.py --sweep-chunk` (N=2048,
# H=512, V=128256, fp32 fwd+bwd, 2 CPU cores shared with other jobs, so times are noisy): p50 2**21: 34.3 s,
# 2**22: 12.6 s, 2**23: 10.2 s, 2**24: 4.0 s, 2**25: 13.2 s, reference 13.3 s. Below 2**22 the GEMMs get too
# skinny (<= 16 rows). Peak memory at 2**24 in the committed bench run: 63.5 MiB vs 2755 MiB for the reference
# (the sweep's 222-254 MiB predate the fix that stopped autograd materialising a zero (V, H) gradient).
TORCH_CHUNK_ELEMS = 2**24

# triton backend: the logits chunk holds about N * H elements (Liger-Kernel's budget: the chunk then costs as
# much memory as the hidden states themselves), with at least TRITON_MIN_CHUNK_ROWS rows so the GEMMs keep the
# tensor cores busy. Not tuned here: no GPU in the session that wrote this; Liger's budget is the known-good
# start.
TRITON_MIN_CHUNK_ROWS = 256
# Vocabulary block of the CE kernel and its warps: Liger's MAX_FUSED_SIZE (65536 // 2) and 32 warps,
# known-good on A100/H100 for the same two-sweep row kernel. Not re-measured here (no GPU).
TRITON_MAX_BLOCK_V = 32768
TRITON_NUM_WARPS = 32
# 32 warps = 1024 threads cap a thread at 64 registers (64K per SM), and a 32768-wide block is 32 fp32
# values per thread: the plain bf16 variants fit (51-64 registers, no spill; kernel_compile_sm80_sm90.md in
# bench/results), but fp32 logits (twice the bytes per value) and label smoothing (a third running sum)
# spilled 32-180 B per thread on sm_80/sm_90. Halving the block at 32 warps still spilled 8 B (bf16 loss
# with smoothing, sm_80); half the block on 16 warps (32 values per thread under a 128-register cap) uses
# 53-115 registers and spills nothing on either architecture. Same bytes per row, twice the loop trips.
TRITON_MAX_BLOCK_V_HEAVY = 16384
TRITON_NUM_WARPS_HEAVY = 16

# rows of a low-precision gradient scaled per block in fp32 by the upstream gradient in backward: a
# 2**22-element (16 MiB) fp32 temporary instead of a full (V, H) one.
_SCALE_BLOCK_ELEMS = 2**22

REDUCTIONS = ("mean", "sum", "none")


# Triton kernel
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1 (exp overflow -> inf -> 1), no libdevice
    # needed, so the interpreter runs it too. Absolute error ~1e-7 near 0, well below a logit's fp32 rounding.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _round_to_bf16(x):
    # fp32 -> nearest-even bf16 value, still in fp32 (the cast after it is then exact). GPUs round this way in
    # the cast itself, but the interpreter's fp32 -> bf16 cast truncates, which biases every gradient towards
    # 0 (measured: grad_bias error 3x plain PyTorch's in the bf16 tests). A few integer ops on a memory-bound
    # sweep.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _flce_ce_kernel(
    logits_ptr,  # (C, V) logits in, d loss / d logits out (in place, same dtype)
    stride_logits_row,
    target_ptr,  # (C,) int64, no ignore_index left (ignored rows are dropped before the GEMMs)
    row_scale_ptr,  # (C,) fp32 row gradient scale (1 / normaliser, 1, or the upstream grad); stride 0 allowed
    stride_row_scale,
    loss_ptr,  # (C,) fp32 per-row loss out
    V,
    label_smoothing,
    softcap,
    COMPUTE_GRAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BF16_OUT: tl.constexpr,  # logits buffer is bf16
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_logits_row
    y = tl.load(target_ptr + row)

    # Sweep 1: online max m and sum-exp d of s, and sum_j s_j for label smoothing.
    m = float("-inf")
    d = 0.0
    s_sum = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        s = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            s_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(d)

    s_y = tl.load(logits_ptr + y).to(tl.float32)
    if HAS_SOFTCAP:
        s_y = softcap * _tanh(s_y / softcap)
    loss = lse - (1.0 - label_smoothing) * s_y
    if HAS_SMOOTHING:
        loss -= label_smoothing / V * s_sum
    tl.store(loss_ptr + row, loss)

    # Sweep 2: d loss / d z, scaled, over the logits in place.
    if COMPUTE_GRAD:
        scale = tl.load(row_scale_ptr + row * stride_row_scale).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            g = tl.exp(z - lse) - tl.where(offs == y, 1.0 - label_smoothing, 0.0)
            if HAS_SMOOTHING:
                g -= label_smoothing / V
            if HAS_SOFTCAP:
                g *= 1.0 - t * t
            g *= scale
            if BF16_OUT:
                g = _round_to_bf16(g)
            tl.store(logits_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


# Plain-tensor launchers: one chunk's (loss, dlogits) step
# --------------------------------------------------------


def _ce_launch(dtype: torch.dtype, label_smoothing: float) -> tuple[int, int]:
    """(largest vocabulary block, num_warps) of the CE kernel for this variant (see TRITON_MAX_BLOCK_V_HEAVY)."""
    if dtype == torch.float32 or label_smoothing > 0.0:
        return TRITON_MAX_BLOCK_V_HEAVY, TRITON_NUM_WARPS_HEAVY
    return TRITON_MAX_BLOCK_V, TRITON_NUM_WARPS


def _ce_step_triton(logits, target, row_scale, loss_out, compute_grad, label_smoothing, softcap):
    """Triton step: ``logits`` (C, V) -> d loss / d logits in place if ``compute_grad``; sets ``loss_out``."""
    C, V = logits.shape
    assert logits.stride(1) == 1 and target.is_contiguous() and loss_out.is_contiguous()
    max_block_v, num_warps = _ce_launch(logits.dtype, label_smoothing)
    _flce_ce_kernel[(C,)](
        logits,
        logits.stride(0),
        target,
        row_scale,
        row_scale.stride(0),
        loss_out,
        V,
        float(label_smoothing),
        float(softcap) if softcap is not None else 1.0,
        COMPUTE_GRAD=compute_grad,
        HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        BF16_OUT=logits.dtype == torch.bfloat16,
        BLOCK_V=min(triton.next_power_of_2(V), max_block_v),
        num_warps=num_warps,
    )
    return logits


def _ce_step_torch(logits, target, row_scale, loss_out, compute_grad, label_smoothing, softcap):
    """PyTorch step, same contract as the Triton one; works in fp32 (in place when the chunk already is fp32).

    Every op is in place on the (C, V) chunk, so a chunk costs one (C, V) fp32 buffer (two with softcap, for
    1 - tanh^2); returns the fp32 d loss / d logits.
    """
    V = logits.shape[1]
    z = logits if logits.dtype == torch.float32 else logits.float()
    dcap = None
    if softcap is not None:
        z.div_(softcap).tanh_()
        if compute_grad:
            dcap = 1.0 - z * z
        z.mul_(softcap)
    s_y = z.gather(1, target[:, None]).squeeze(1)
    loss = -(1.0 - label_smoothing) * s_y
    if label_smoothing > 0.0:
        loss -= label_smoothing / V * z.sum(1)
    if not compute_grad:
        loss_out.copy_(loss + torch.logsumexp(z, 1))
        return None
    m = z.amax(1, keepdim=True)
    z.sub_(m).exp_()
    d = z.sum(1, keepdim=True)
    loss_out.copy_(loss + (m + d.log()).squeeze(1))
    scale = row_scale[:, None]
    z.mul_(scale / d)  # softmax * scale
    z.scatter_add_(1, target[:, None], -(1.0 - label_smoothing) * scale)
    if label_smoothing > 0.0:
        z.sub_(label_smoothing / V * scale)
    if dcap is not None:
        z.mul_(dcap)
    return z


def _has_kernel(op: str, device: torch.device) -> bool:
    """Whether this torch build has ``op`` (e.g. ``aten::addmm.dtype_out``) for ``device``'s backend.

    ``out_dtype=`` GEMMs exist only in recent torch and only for some backends (CUDA; the CPU build of 2.13 has
    none), so they are used only where present: the declared torch floor does not promise them."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, device.type.upper())
    except RuntimeError:  # the overload itself does not exist in this torch
        return False


def _addmm_fp32_(acc, a, b):
    """``acc += a @ b`` with ``acc`` fp32 and the product accumulated in fp32, without an (M, N) temporary.

    Low-precision ``a``, ``b`` stay low-precision operands (tensor cores): one ``addmm(out_dtype=float32)``
    where the build has it, else blocks of ``_SCALE_BLOCK_ELEMS`` output elements, each a low-precision GEMM
    (fp32 accumulation inside) added to the fp32 accumulator (one rounding of each chunk's partial product)."""
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.dtype != b.dtype:  # mixed operands: no low-precision GEMM takes them
        acc.addmm_(a.float(), b.float())
    elif _has_kernel("aten::addmm.dtype_out", acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # bf16/fp16 tensor cores, fp32 out
    else:
        rows = max(1, _SCALE_BLOCK_ELEMS // max(1, acc.shape[1]))
        for r in range(0, acc.shape[0], rows):
            acc[r : r + rows].add_(torch.mm(a[r : r + rows], b))


def _mm_into(out, a, b):
    """``out = a @ b`` for low-precision ``a``, ``b`` and ``out`` in their dtype or fp32 (an fp32 input's grad)."""
    if out.dtype == a.dtype == b.dtype:
        torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and a.dtype == b.dtype and _has_kernel("aten::mm.dtype_out", out.device):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        out.copy_(torch.mm(a, b))


def _chunked_pass(hidden, weight, target, bias, row_scale, need, label_smoothing, softcap, backend,
                  compute_dtype=""):
    """One sweep over token chunks of already-compacted rows (no ignored target left).

    hidden (n, H), target (n,), row_scale (n,) fp32 (may be an expanded scalar); ``need`` = (grad_hidden,
    grad_weight, grad_bias) flags; ``compute_dtype``: the GEMM operand dtype's name ("": the inputs' own, which
    then share one). Returns loss (n,) fp32, grad_hidden (n, H) in hidden's dtype or None, and fp32 accumulators
    grad_weight (V, H) and grad_bias (V,) or None.
    """
    n, H = hidden.shape
    V = weight.shape[0]
    cd = getattr(torch, compute_dtype) if compute_dtype else weight.dtype
    w = weight if weight.dtype == cd else weight.to(cd)  # (V, H) GEMM operand, cast once per call
    need_h, need_w, need_b = need
    compute_grad = need_h or need_w or need_b
    if backend == "triton":
        rows = max(TRITON_MIN_CHUNK_ROWS, triton.next_power_of_2(triton.cdiv(n, triton.cdiv(V, H))))
        step = _ce_step_triton
    else:
        rows = max(1, TORCH_CHUNK_ELEMS // V)
        step = _ce_step_torch
    rows = min(rows, max(n, 1))
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
    for a in range(0, n, rows):
        b = min(a + rows, n)
        h_c = hidden[a:b].to(cd)
        logits = h_c @ w.t()  # (C, V) in the compute dtype, fp32 accumulation inside the GEMM
        if bias is not None:
            logits += bias
        dlogits = step(logits, target[a:b], row_scale[a:b], loss[a:b], compute_grad, label_smoothing, softcap)
        if not compute_grad:
            continue
        if need_b:  # from the step's own precision (fp32 for the torch step) before the GEMM cast
            grad_b += dlogits.sum(0, dtype=torch.float32)
        dl = dlogits.to(cd)  # the torch step works in fp32: the gradient GEMMs take compute-dtype operands
        if need_h:
            _mm_into(grad_h[a:b], dl, w)
        if need_w:
            _addmm_fp32_(grad_w, dl.t(), h_c)
        del logits, dlogits, dl
    return loss, grad_h, grad_w, grad_b


def _compact(hidden, target, ignore_index, rows=None):
    """Indices of non-ignored rows and those rows; ``rows is None`` when none is ignored.

    ``rows``: those indices when the caller knows them (the collator builds them on the host: no sync here);
    else one ``nonzero``, i.e. one host sync."""
    if rows is None:
        rows = (target != ignore_index).nonzero().squeeze(1)
    if rows.numel() == target.numel():
        return None, hidden, target
    return rows, hidden.index_select(0, rows), target.index_select(0, rows)


def _normaliser(target, ignore_index, num_target_tokens):
    """Device-side mean denominator; 1 where it is 0 (every target ignored: the loss sum is 0, so loss 0)."""
    if num_target_tokens is None:
        denom = (target != ignore_index).sum().to(torch.float32)
    else:
        denom = num_target_tokens.to(device=target.device, dtype=torch.float32)
    return torch.where(denom > 0, denom, torch.ones_like(denom))


def _scatter_rows(values, rows, n):
    """(k, ...) values of compacted rows back to (n, ...) with zeros at the dropped rows."""
    if rows is None:
        return values
    out = values.new_zeros((n, *values.shape[1:]))
    return out.index_copy_(0, rows, values)


def _forward_impl(
    hidden,
    weight,
    target,
    bias,
    num_target_tokens,
    ignore_index,
    reduction,
    label_smoothing,
    softcap,
    backend,
    need,
    compute_dtype="",
    target_rows=None,
):
    N = hidden.shape[0]
    rows, h, y = _compact(hidden, target, ignore_index, target_rows)
    k = h.shape[0]
    if reduction == "mean":
        denom = _normaliser(target, ignore_index, num_target_tokens)
        row_scale = (1.0 / denom).expand(k)
    else:
        row_scale = torch.ones((), dtype=torch.float32, device=hidden.device).expand(k)
    # "none": the upstream gradient is per token, so gradients wait for backward (see the module docstring).
    grad_need = (False, False, False) if reduction == "none" else need
    loss_rows, grad_h, grad_w, grad_b = _chunked_pass(
        h, weight, y, bias, row_scale, grad_need, label_smoothing, softcap, backend, compute_dtype
    )
    if reduction == "none":
        loss = _scatter_rows(loss_rows, rows, N)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / denom
    empty = hidden.new_empty(0)
    grad_h = _scatter_rows(grad_h, rows, N) if grad_h is not None else empty
    grad_w = grad_w.to(weight.dtype) if grad_w is not None else weight.new_empty(0)
    grad_b = grad_b.to(bias.dtype) if grad_b is not None else empty.new_empty(0)
    return loss, grad_h, grad_w, grad_b


# Autograd wrapper: custom ops so torch.compile traces one opaque node
# --------------------------------------------


@torch.library.custom_op("barnfast::fused_linear_cross_entropy", mutates_args=())
def _flce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    num_target_tokens: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    softcap: float | None,
    backend: str,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    compute_dtype: str = "",
    target_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias); a gradient not computed here is a 0-element tensor."""
    need = (need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit (compute_dtype)
        return _forward_impl(
            hidden.contiguous(),
            weight.contiguous(),
            target.contiguous(),
            bias,
            num_target_tokens,
            ignore_index,
            reduction,
            label_smoothing,
            softcap,
            backend,
            need,
            compute_dtype,
            target_rows,
        )


@_flce_op.register_fake
def _(
    hidden,
    weight,
    target,
    bias,
    num_target_tokens,
    ignore_index,
    reduction,
    label_smoothing,
    softcap,
    backend,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
    compute_dtype="",
    target_rows=None,
):
    loss = hidden.new_empty(target.shape if reduction == "none" else (), dtype=torch.float32)
    eager = reduction != "none"
    grad_h = hidden.new_empty(hidden.shape if eager and need_grad_hidden else (0,))
    grad_w = weight.new_empty(weight.shape if eager and need_grad_weight else (0,))
    grad_b = (
        hidden.new_empty(0) if bias is None or not (eager and need_grad_bias) else bias.new_empty(bias.shape)
    )
    return loss, grad_h, grad_w, grad_b


@torch.library.custom_op("barnfast::fused_linear_cross_entropy_backward_none", mutates_args=())
def _flce_bwd_none_op(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None,
    backend: str,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    compute_dtype: str = "",
    target_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``reduction="none"``: the chunked pass again, the per-token upstream grad as row scale."""
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    N = hidden.shape[0]
    rows, h, y = _compact(hidden, target, ignore_index, target_rows)
    g = grad_loss.to(torch.float32)
    g = g.contiguous() if rows is None else g.index_select(0, rows)
    need = (need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None)
    with torch.autocast(hidden.device.type, enabled=False):
        _, grad_h, grad_w, grad_b = _chunked_pass(h, weight, y, bias, g, need, label_smoothing, softcap, backend,
                                                  compute_dtype)
    grad_h = _scatter_rows(grad_h, rows, N) if grad_h is not None else hidden.new_empty(0)
    grad_w = grad_w.to(weight.dtype) if grad_w is not None else weight.new_empty(0)
    grad_b = grad_b.to(bias.dtype) if grad_b is not None else hidden.new_empty(0)
    return grad_h, grad_w, grad_b


@_flce_bwd_none_op.register_fake
def _(
    grad_loss,
    hidden,
    weight,
    target,
    bias,
    ignore_index,
    label_smoothing,
    softcap,
    backend,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
    compute_dtype="",
    target_rows=None,
):
    grad_h = hidden.new_empty(hidden.shape if need_grad_hidden else (0,))
    grad_w = weight.new_empty(weight.shape if need_grad_weight else (0,))
    grad_b = bias.new_empty(bias.shape) if bias is not None and need_grad_bias else hidden.new_empty(0)
    return grad_h, grad_w, grad_b


@torch.library.custom_op("barnfast::fused_linear_cross_entropy_scale_", mutates_args=("grad",))
def _scale_(grad: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """``grad *= grad_loss`` in place: the saved (V, H) gradient is scaled without a second (V, H) buffer.

    The product is taken in fp32, in blocks of rows: ``grad.mul_(grad_loss)`` would round the scale itself to
    bf16 (1.7 -> 1.703125, a 0.2% error on every gradient, measured in the tests).
    """
    g = grad_loss.to(torch.float32)
    if grad.dtype == torch.float32:
        grad.mul_(g)
        return
    flat = grad.view(-1, grad.shape[-1]) if grad.dim() > 1 else grad.view(1, -1)
    rows = max(1, _SCALE_BLOCK_ELEMS // flat.shape[1])
    for a in range(0, flat.shape[0], rows):
        blk = flat[a : a + rows]
        blk.copy_(blk.float().mul_(g))


@_scale_.register_fake
def _(grad, grad_loss):
    return None


def _setup_context(ctx, inputs, output):
    (
        hidden,
        weight,
        target,
        bias,
        _,
        ignore_index,
        reduction,
        label_smoothing,
        softcap,
        backend,
        need_h,
        need_w,
        need_b,
        compute_dtype,
        target_rows,
    ) = inputs
    # the gradient outputs are never differentiated; without this autograd would materialise a zero (V, H)
    # "gradient of grad_weight" for backward (measured: one extra V*H*4 bytes at peak)
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.options = (ignore_index, label_smoothing, softcap, backend, need_h, need_w, need_b, compute_dtype)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, target, bias, target_rows)
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_unused_grads_of_grads):
    ignore_index, label_smoothing, softcap, backend, need_h, need_w, need_b, compute_dtype = ctx.options
    if grad_loss is None:  # the loss itself was not differentiated (grads are not materialised, see above)
        return (None,) * 15
    if ctx.reduction == "none":
        hidden, weight, target, bias, target_rows = ctx.saved_tensors
        grad_h, grad_w, grad_b = _flce_bwd_none_op(
            grad_loss,
            hidden,
            weight,
            target,
            bias,
            ignore_index,
            label_smoothing,
            softcap,
            backend,
            need_h,
            need_w,
            need_b,
            compute_dtype,
            target_rows,
        )
    else:
        # the saved gradients are scaled in place, so a second backward through the same graph would scale
        # twice
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "fused_linear_cross_entropy: backward through the same graph twice is not supported"
            )
        ctx.consumed = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        for g in (grad_h, grad_w, grad_b):
            if g.numel():
                _scale_(g, grad_loss)
    return (
        grad_h if need_h else None,
        grad_w if need_w else None,
        None,
        grad_b if need_b else None,
        *(None,) * 11,
    )


_flce_op.register_autograd(_backward, setup_context=_setup_context)


# Public API
# ---------------------------------------------------------------------------------------------------------


def _compute_dtype(hidden, weight, bias):
    """The GEMM operand dtype's name under autocast, as a built-in GEMM would pick it; "" outside autocast.

    Autocast lowers precision only (an fp16/bf16 input under an autocast of the other stays as it is, like
    ``F.linear`` would not); ``torch.get_autocast_dtype`` and ``torch.is_autocast_enabled(device)`` are torch
    >= 2.4."""
    dev = hidden.device.type
    if dev == "meta" or not torch.is_autocast_enabled(dev):  # meta: traced for shapes (bench/predict_gpu.py)
        return ""
    dt = torch.get_autocast_dtype(dev)
    ins = [t.dtype for t in (hidden, weight, bias) if t is not None]
    if all(x == torch.float32 or x == dt for x in ins) and any(x != dt for x in ins):
        return str(dt).removeprefix("torch.")
    return ""


def _check(hidden, weight, target, bias, reduction, label_smoothing, softcap, num_target_tokens,
           compute_dtype="", target_rows=None):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, H) and weight (V, H) expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if target.shape != hidden.shape[:1] or target.dtype != torch.int64:
        raise ValueError(
            f"target must be int64 of shape ({hidden.shape[0]},), got {target.dtype} {tuple(target.shape)}"
        )
    if not compute_dtype and (hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype)):
        raise ValueError(
            f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share one dtype (or be fp32 and "
            "the autocast dtype under torch.autocast)"
        )
    if target_rows is not None and (target_rows.dim() != 1 or target_rows.dtype != torch.int64
                                    or target_rows.device != target.device):
        raise ValueError(
            f"target_rows must be (k,) int64 on {target.device}, got {target_rows.dtype} "
            f"{tuple(target_rows.shape)} on {target_rows.device}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if num_target_tokens is not None and reduction != "mean":
        raise ValueError(
            "num_target_tokens is the normaliser of reduction='mean'; it means nothing for " + reduction
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    num_target_tokens: float | torch.Tensor | None = None,
    backend: str = "auto",
    target_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(softcap(hidden @ weight.T + bias), target)`` without materialising the (N, V) logits.

    hidden (N, H), weight (V, H), target (N,) int64 with ``ignore_index`` sentinels, bias (V,) or None.
    ``reduction="mean"`` divides by the number of non-ignored targets, or by ``num_target_tokens`` (a number
    or 0-dim tensor, e.g. the count over the whole global batch) when given; every target ignored gives 0.
    ``"none"`` returns (N,) per-token losses, 0 at ignored positions. The loss is fp32; gradients reach
    hidden, weight and bias in their dtype, accumulated in fp32. Under ``torch.autocast`` the three GEMMs take
    operands in the autocast dtype (fp32 inputs stay fp32, and so do their gradients).
    ``target_rows``: (k,) int64 indices of the non-ignored targets, in order, when the caller knows them
    (:class:`barnfast.data.batch.PackedBatch` builds them on the host): the op then makes no host sync. They
    are trusted, not checked (a check would be the sync they avoid).
    """
    compute_dtype = _compute_dtype(hidden, weight, bias)  # a name: the op's schema takes it as a string
    _check(hidden, weight, target, bias, reduction, label_smoothing, softcap, num_target_tokens, compute_dtype,
           target_rows)
    backend = resolve_backend(backend, hidden, weight, target, bias)
    if num_target_tokens is not None and not isinstance(num_target_tokens, torch.Tensor):
        num_target_tokens = torch.tensor(float(num_target_tokens), device=hidden.device)
    grad_on = torch.is_grad_enabled()
    loss, *_ = _flce_op(
        hidden,
        weight,
        target,
        bias,
        num_target_tokens,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        None if softcap is None else float(softcap),
        backend,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
        compute_dtype,
        target_rows,
    )
    return loss


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Module form: ``FusedLinearCrossEntropyLoss(reduction="sum", ...)(hidden, weight, target)``.

    Takes the keyword options of ``fused_linear_cross_entropy``; ``bias`` may be given here or per call.
    """

    def __init__(
        self,
        *,
        bias=None,
        ignore_index=-100,
        reduction="mean",
        label_smoothing=0.0,
        softcap=None,
        num_target_tokens=None,
        backend="auto",
    ):
        super().__init__()
        # a plain dict, so a bias Parameter passed here is not registered (and optimised) a second time
        self.options = dict(
            bias=bias,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            softcap=softcap,
            num_target_tokens=num_target_tokens,
            backend=backend,
        )

    def forward(self, hidden, weight, target, bias=None):
        options = self.options if bias is None else {**self.options, "bias": bias}
        return fused_linear_cross_entropy(hidden, weight, target, **options)


def fused_linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    num_target_tokens: float | torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain reference: the full (N, V) logits and ``F.cross_entropy``, in fp32.

    ``upcast=False``: in the inputs' dtype instead, i.e. what plain PyTorch gets in low precision. Same
    options and semantics as the fused op.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dt = torch.float32 if upcast else hidden.dtype
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(
        logits, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )  # (N,), 0 at ignored positions
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if num_target_tokens is None:
        denom = (target != ignore_index).sum().clamp_min(1)
    else:
        denom = num_target_tokens if num_target_tokens != 0 else 1
    return losses.sum() / denom
