"""Fused LLaVA-1.5 ``mlp2x_gelu`` projector: Linear -> GELU -> Linear with fused epilogues.

``y = gelu(x @ w1.T + b1) @ w2.T + b2``: x (M, in) with M = visual tokens of the micro-batch
(576 per CLIP-L/336 image, 729 per SigLIP-384, 1024 per DINOv2-L/448), in = 1024 | 1152,
hidden = out = the LLM's hidden size (4096 for 7B LLaMA).

One matmul kernel serves all six products, with constexpr switches for what it fuses:

forward   h = x @ w1.T           epilogue: + b1, store h (pre-activation, kept for backward),
                                 GELU, store a            -> a never round-trips through HBM for GELU
          y = a @ w2.T           epilogue: + b2
backward  dh = dy @ w2           epilogue: * gelu'(h), and a = gelu(h) stored -> the GELU derivative is fused
          dw2 = dy.T @ a         db2 = row sums of dy.T, in the same pass
          dx = dh @ w1
          dw1 = dh.T @ x         db1 = row sums of dh.T, in the same pass

Why a is not recomputed in the dw2 prologue (as before issue 14): the h tile is loaded by every one of
the out / BLOCK_M row blocks of dw2, so each GELU was evaluated 32 times (out = 4096, BLOCK_M = 128),
and the erf temporaries beside the accumulator and the pipelined tiles spilled on sm_80 (84 B per
thread at 128x64/4 warps, in bench/compile_report.py's ahead-of-time compile). Storing a in dh's
epilogue costs one (M, hidden) write (75.5 MB at M = 9216, hidden = 4096: ~23 us at 3.35 TB/s), and
dw2 becomes a plain GEMM that may use the large tiles.

Bytes saved against eager PyTorch at CLIP-L x 16 images, bf16 (M=9216, hidden=4096):
eager writes and re-reads h for the bias add and for GELU, and dh for the GELU backward: about
4 extra (M, hidden) passes = 4 x 75.5 MB = 302 MB of HBM traffic per step.

Keep or recompute the pre-activation (decision: keep h, recompute a = gelu(h)):
- recomputing h = x @ w1.T + b1 in backward costs 2*M*in*hidden = 77.3 GFLOP, +6.7% of the
  1160 GFLOP of forward+backward (M=9216, 1024 -> 4096 -> 4096), to save 75.5 MB (bf16);
- keeping h costs those 75.5 MB, and a = gelu(h) is then recomputed in the dh epilogue, which loads h
  for gelu'(h) anyway (erf(h / sqrt 2) serves both), so we hold half of what eager holds (eager keeps h
  for GELU's backward and a for linear_2's weight gradient: 151 MB) and a lives only from dh to dw2;
- 75.5 MB is noise beside the LLM's activations; 6.7% more matmul work is not. So we keep h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import resolve_backend, triton_interpreted

# Epilogue modes of the shared matmul kernel: none; store the pre-activation then GELU (fc1); multiply by
# gelu'(aux) and store gelu(aux) (dh, which hands a = gelu(h) to dw2).
_EPI_NONE, _EPI_GELU, _EPI_GELU_GRAD = 0, 1, 2

_SQRT_2_OVER_PI = 0.7978845608028654
_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _matmul_configs() -> list[triton.Config]:
    """Autotune space: the fp16/bf16 tiles that reach ~80% of peak on A100 (164 KB smem) and H100 (228 KB).

    ``_prune_configs`` then keeps, per launch, the tiles that fit it (see there). Shared memory per
    config as compiled (bench/results/kernel_compile_sm80_sm90.md): Triton keeps num_stages - 1 tiles
    of A and B in flight, so 128x256x64 at 3 stages holds 2 * (128*64 + 64*256) * 2 B = 96 KB in bf16.
    Dropped after the ahead-of-time compile of every launch (issue 14): 128x128 at 4 warps (128 fp32
    accumulators per thread, spilled 312 B with the GELU epilogue on sm_80) and 128x128x32 (same
    accumulator, half the K depth); 256x128 (the transpose of 128x256: at M >= 4096 rows both tile
    the same work, and it spilled 436 B with the epilogue); 64x64 at 2 warps (a quarter of the work
    per program of 64x128 at N, K >= 1024). Fewer configs also mean fewer autotune runs per key.
    Under TRITON_INTERPRET=1 there is one small config: the interpreter is ~1e5x slower than a GPU,
    and 32-wide tiles still exercise every mask on the test shapes (M=39, hidden=123).
    """
    if triton_interpreted():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    cfg = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        # 32 accumulators per thread: only for the dh epilogue (see _ACC_PER_THREAD)
        (128, 64, 64, 4, 8),
        (64, 128, 64, 4, 8),
        # fp32 operands only (BLOCK_K = 32): IEEE fp32 has no tensor-core path, tl.dot becomes FMA loops that
        # hold A and B fragments in registers; the 64-deep bf16 tiles above spilled 2-9 KB per thread there
        # (sm_80), these use 96-214 registers and spill nothing
        (64, 64, 32, 4, 4),
        (32, 64, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for m, n, k, s, w in cfg
    ]


# fp32 accumulators per thread (BLOCK_M * BLOCK_N / threads) a launch may use, by epilogue. The fused GELU
# epilogues need registers beside the accumulator (erf/exp temporaries and 64-bit address tiles for a whole
# tile). Measured with bench/compile_report.py (ptxas -v, 255-register cap): at 128 per thread (128x256 or
# 256x128 on 8 warps) fc1 spilled 312-436 B on sm_80; at 64 per thread fc1 spills nothing, but dh (gelu' and
# gelu of the loaded h, two tiles stored) spilled 24-48 B (sm_80 and sm_90) at 128x128/8 and 128x64/4 warps,
# so dh gets the two 32-per-thread tiles. The plain GEMMs keep the large tiles and skip the 32-per-thread
# ones (the same tiles with half the work per warp).
_ACC_PER_THREAD = {_EPI_NONE: (64, 128), _EPI_GELU: (64, 64), _EPI_GELU_GRAD: (32, 32)}  # (min, max)
# Shared memory: only configs whose (num_stages - 1) A and B tiles fit in sm_80's 163 KB per block are
# tried (the others fail to launch with OutOfResources on an A100 and cost an autotune attempt each).
_SMEM_BUDGET = 163 * 1024
# fp32 operands get their own tiles (BLOCK_K = _FP32_BLOCK_K), bf16/fp16 the others.
_FP32_BLOCK_K = 32


def _prune_configs(configs, named_args, **kwargs):
    """The configs worth benchmarking for this launch: by operand dtype, then (bf16/fp16) by fused epilogue."""
    lo, hi = _ACC_PER_THREAD[kwargs.get("EPILOGUE", _EPI_NONE)]
    elem = named_args["a_ptr"].element_size()
    kept = []
    for c in configs:
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (elem == 4) != (k == _FP32_BLOCK_K):
            continue
        if elem != 4 and not lo <= m * n // (32 * c.num_warps) <= hi:
            continue
        if (c.num_stages - 1) * (m * k + k * n) * elem > _SMEM_BUDGET:
            continue
        kept.append(c)
    return kept or configs[-1:]


def autotune_bucket(n: int) -> int:
    """The autotune key of a matrix dimension: the next power of two (at least 16).

    M = images x 576 changes with nearly every packed micro-batch (and K = M in the weight-gradient
    GEMMs), and a raw key re-benchmarks every config of every launch at each new image count, on
    every rank. The best tile is the same across a power-of-two range at these sizes (thousands of
    rows: every config fills the GPU), so a LLaVA-665k epoch at 8k-16k-token micro-batches needs a
    handful of keys per launch (tests/test_autotune_keys.py counts them).
    """
    return max(16, triton.next_power_of_2(int(n)))


@triton.jit
def _gelu(z, APPROX_TANH: tl.constexpr):
    """GELU of fp32 ``z``: erf form, or the tanh form (tanh written with exp, which tl.math lacks)."""
    if APPROX_TANH:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
        out = 0.5 * z * (1.0 + t)
    else:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return out


@triton.jit
def _gelu_and_grad(z, APPROX_TANH: tl.constexpr):
    """(gelu(z), d gelu(z) / dz) for fp32 ``z``, sharing the erf (or tanh) of both."""
    if APPROX_TANH:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
        act = 0.5 * z * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        act = z * cdf
        grad = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    return act, grad


@triton.jit
def _round_bf16_rne(x):
    """Round fp32 ``x`` to the nearest bf16 value (ties to even), still as fp32.

    Only for TRITON_INTERPRET=1, whose fp32 -> bf16 cast truncates (measured: 48% of 1024 random
    values differ from torch's cast), while the GPU rounds to nearest-even. Without this, interpreter
    tests would see up to one bf16 ulp more error than the GPU kernel makes.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


# The key: bucketed sizes, and what selects a different config set or cost (the fused epilogues); the
# autotuner adds the tensors' dtypes itself.
@triton.autotune(
    configs=_matmul_configs(),
    key=["M_KEY", "N_KEY", "K_KEY", "EPILOGUE", "ROWSUM_A", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _projector_mlp_matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    aux_ptr,
    pre_ptr,
    rowsum_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_xm,
    stride_xn,
    M_KEY,  # autotune_bucket(M), N, K: only read by the autotuner's key
    N_KEY,
    K_KEY,
    HAS_BIAS: tl.constexpr,  # c += bias[n]
    EPILOGUE: tl.constexpr,  # 0: none, 1: store pre to pre_ptr then GELU, 2: c *= gelu'(aux), pre = gelu(aux)
    ROWSUM_A: tl.constexpr,  # rowsum_ptr[m] = sum_k A[m, k] (the bias gradient), stored by pid_n == 0
    APPROX_TANH: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,  # interpreter + bf16: its bf16 tl.dot is wrong and its downcast truncates
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs unless torch allows TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C (M, N) = epilogue(A (M, K) @ prologue(B (K, N))), fp32 accumulation; any strides (transposes)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-blocks sweep the columns together so B tiles stay in L2.
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & mask_n[None, :], other=0.0)
        if ROWSUM_A:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        if INTERPRET_BF16:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask_c = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:
        pre = acc
        if INTERPRET_BF16:
            pre = _round_bf16_rne(pre)
        tl.store(
            pre_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
            pre.to(pre_ptr.dtype.element_ty),
            mask=mask_c,
        )
        acc = _gelu(acc, APPROX_TANH)
    elif EPILOGUE == 2:
        z = tl.load(aux_ptr + rm[:, None] * stride_xm + rn[None, :] * stride_xn, mask=mask_c, other=0.0)
        act, grad = _gelu_and_grad(z.to(tl.float32), APPROX_TANH)
        if INTERPRET_BF16:
            act = _round_bf16_rne(act)
        tl.store(
            pre_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
            act.to(pre_ptr.dtype.element_ty),
            mask=mask_c,
        )
        acc = acc * grad
    if INTERPRET_BF16:
        acc = _round_bf16_rne(acc)
    tl.store(
        c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask_c
    )
    if ROWSUM_A:
        if pid_n == 0:  # one column of programs owns the row sums; the others computed them for free
            tl.store(rowsum_ptr + rm, rowsum, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Plain-tensor launchers
# ----------------------------------------------------------------------------------------------


def _matmul(
    a: torch.Tensor,  # (M, K), any strides
    b: torch.Tensor,  # (K, N), any strides
    *,
    bias: torch.Tensor | None = None,  # (N,)
    epilogue: int = _EPI_NONE,
    aux: torch.Tensor | None = None,  # (M, N): pre-activation for _EPI_GELU_GRAD
    rowsum: bool = False,
    approx_tanh: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the shared kernel; returns (c (M, N), pre (M, N) or None, fp32 row sums of a (M,) or None).

    ``pre`` is the pre-activation for _EPI_GELU and gelu(aux) for _EPI_GELU_GRAD.
    """
    M, K = a.shape
    N = b.shape[1]
    out_dtype = out_dtype or a.dtype
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    pre = torch.empty_like(c) if epilogue != _EPI_NONE else None
    sums = torch.empty((M,), device=a.device, dtype=torch.float32) if rowsum else None
    if M == 0 or N == 0:
        return c, pre, (sums.zero_() if sums is not None else None)
    if K == 0:  # only in backward with zero tokens (dw = dy.T @ h over M=0): empty sums are zeros
        return c.zero_(), pre, (sums.zero_() if sums is not None else None)
    fp32 = a.dtype == torch.float32
    precision = "tf32" if fp32 and torch.backends.cuda.matmul.allow_tf32 and a.is_cuda else "ieee"
    aux_t = aux if aux is not None else c
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _projector_mlp_matmul_kernel[grid](
        a,
        b,
        c,
        bias if bias is not None else c,
        aux_t,
        pre if pre is not None else c,
        sums if sums is not None else c,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        c.stride(1),
        aux_t.stride(0),
        aux_t.stride(1),
        autotune_bucket(M),
        autotune_bucket(N),
        autotune_bucket(K),
        HAS_BIAS=bias is not None,
        EPILOGUE=epilogue,
        ROWSUM_A=rowsum,
        # only where a GELU is computed: fc2, dx and dw1 keep one compiled variant for both forms
        APPROX_TANH=approx_tanh and epilogue != _EPI_NONE,
        INTERPRET_BF16=triton_interpreted() and out_dtype == torch.bfloat16,
        DOT_PRECISION=precision,
    )
    return c, pre, sums


def _projector_mlp_fwd(x, w1, b1, w2, b2, approx_tanh: bool, save_pre: bool):
    """x (M, in), w1 (hidden, in), w2 (out, hidden) -> y (M, out), h (M, hidden) or an empty (0,) tensor."""
    a, h, _ = _matmul(x, w1.t(), bias=b1, epilogue=_EPI_GELU, approx_tanh=approx_tanh)
    y, _, _ = _matmul(a, w2.t(), bias=b2)
    return y, (h if save_pre else x.new_empty(0))


def _projector_mlp_bwd(dy, x, w1, h, w2, approx_tanh: bool, needs: list[bool], b1_dtype, b2_dtype):
    """Gradients (dx, dw1, db1, dw2, db2), each None where ``needs`` says it is not wanted."""
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    dx = dw1 = db1 = dw2 = db2 = None
    need_dh = need_x or need_w1 or need_b1
    a = None
    if need_dh:  # dh's epilogue also hands back a = gelu(h) for dw2
        dh, a, _ = _matmul(dy, w2, epilogue=_EPI_GELU_GRAD, aux=h, approx_tanh=approx_tanh, out_dtype=h.dtype)
    if need_w2:
        if a is None:  # only linear_2 trains: no dh pass to take a from
            a = F.gelu(h.float(), approximate="tanh" if approx_tanh else "none").to(h.dtype)
        dw2, _, s = _matmul(dy.t(), a, rowsum=need_b2, out_dtype=w2.dtype)
        db2 = s.to(b2_dtype) if need_b2 else None
    elif need_b2:
        db2 = dy.float().sum(0).to(b2_dtype)
    del a
    if need_dh:
        if need_x:
            dx, _, _ = _matmul(dh, w1, out_dtype=x.dtype)
        if need_w1:
            dw1, _, s = _matmul(dh.t(), x, rowsum=need_b1, out_dtype=w1.dtype)
            db1 = s.to(b1_dtype) if need_b1 else None
        elif need_b1:
            db1 = dh.float().sum(0).to(b1_dtype)
    return dx, dw1, db1, dw2, db2


# ----------------------------------------------------------------------------------------------
# Autograd wrapper: custom ops, so torch.compile traces through them (fake impls give the shapes)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("barnfast::projector_mlp", mutates_args=())
def _projector_mlp_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    approximate: str,
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (M, out), h (M, hidden) when save_pre else an empty (0,) tensor)."""
    return _projector_mlp_fwd(x, w1, b1, w2, b2, approximate == "tanh", save_pre)


@_projector_mlp_op.register_fake
def _(x, w1, b1, w2, b2, approximate, save_pre):
    y = x.new_empty((x.shape[0], w2.shape[0]))
    return y, (x.new_empty((x.shape[0], w1.shape[0])) if save_pre else x.new_empty(0))


@torch.library.custom_op("barnfast::projector_mlp_backward", mutates_args=())
def _projector_mlp_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    h: torch.Tensor,
    w2: torch.Tensor,
    b1_like: torch.Tensor,
    b2_like: torch.Tensor,
    approximate: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, db1, dw2, db2); a gradient not in ``needs`` comes back as an empty (0,) tensor.

    ``b1_like``/``b2_like`` carry the bias dtypes (the bias itself, or an empty tensor without bias).
    """
    grads = _projector_mlp_bwd(dy, x, w1, h, w2, approximate == "tanh", needs, b1_like.dtype, b2_like.dtype)
    return tuple(g if g is not None else dy.new_empty(0) for g in grads)


@_projector_mlp_backward_op.register_fake
def _(dy, x, w1, h, w2, b1_like, b2_like, approximate, needs):
    shapes = [
        (x, x.shape),
        (w1, w1.shape),
        (b1_like, (w1.shape[0],)),
        (w2, w2.shape),
        (b2_like, (w2.shape[0],)),
    ]
    return tuple(t.new_empty(s) if need else dy.new_empty(0) for (t, s), need in zip(shapes, needs))


def _projector_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, approximate, save_pre = inputs
    ctx.save_for_backward(x, w1, output[1], w2)
    ctx.approximate = approximate
    ctx.b1_dtype = b1.dtype if b1 is not None else None
    ctx.b2_dtype = b2.dtype if b2 is not None else None


def _projector_backward(ctx, dy, _dh):
    x, w1, h, w2 = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    b1_like = x.new_empty(0, dtype=ctx.b1_dtype or x.dtype)
    b2_like = x.new_empty(0, dtype=ctx.b2_dtype or x.dtype)
    grads = _projector_mlp_backward_op(
        dy.contiguous(), x, w1, h, w2, b1_like, b2_like, ctx.approximate, needs
    )
    return *(g if need else None for g, need in zip(grads, needs)), None, None


_projector_mlp_op.register_autograd(_projector_backward, setup_context=_projector_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def projector_mlp_ref(x, w1, b1, w2, b2, *, approximate: str = "none") -> torch.Tensor:
    """PyTorch reference, (..., in) -> (..., out): ``linear(gelu(linear(x, w1, b1), approximate), w2, b2)``"""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def projector_mlp(
    x: torch.Tensor,  # (..., in)
    w1: torch.Tensor,  # (hidden, in)
    b1: torch.Tensor | None,  # (hidden,)
    w2: torch.Tensor,  # (out, hidden)
    b2: torch.Tensor | None,  # (out,)
    *,
    approximate: str = "none",
    backend: str = "auto",
) -> torch.Tensor:
    """``gelu(x @ w1.T + b1) @ w2.T + b2`` -> (..., out), differentiable in x and every weight.

    ``approximate``: "none" (erf GELU, LLaVA's ``mlp2x_gelu``) or "tanh". Computes in x's dtype, or in
    the autocast dtype when autocast is on for x's device; weights are cast to it (differentiably).
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if w1.dim() != 2 or w2.dim() != 2 or x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"projector_mlp: shapes do not chain: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
            f"w2 {tuple(w2.shape)}"
        )
    for name, b, n in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if b is not None and b.shape != (n,):
            raise ValueError(f"projector_mlp: {name} has shape {tuple(b.shape)}, expected ({n},)")
    if resolve_backend(backend, x, w1, b1, w2, b2) == "torch":
        return projector_mlp_ref(x, w1, b1, w2, b2, approximate=approximate)

    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x2, w1, w2 = x.reshape(-1, x.shape[-1]).to(dtype), w1.to(dtype), w2.to(dtype)
    b1 = b1.to(dtype) if b1 is not None else None
    b2 = b2.to(dtype) if b2 is not None else None
    save_pre = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x2, w1, b1, w2, b2)
    )
    y, _ = _projector_mlp_op(x2, w1, b1, w2, b2, approximate, save_pre)
    return y.reshape(*x.shape[:-1], w2.shape[0])


def rename_llava_mm_projector(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original LLaVA ``mm_projector.bin`` keys -> Hugging Face ``LlavaMultiModalProjector`` keys.

    ``model.mm_projector.0.weight`` (or ``mm_projector.0.*``, ``0.*``) -> ``linear_1.weight``; ``2.*`` ->
    ``linear_2.*``. Keys already named ``linear_1.*``/``linear_2.*`` (also under HF's
    ``multi_modal_projector.`` prefix) pass through. Any other key is a ``ValueError``.
    """
    out = {}
    for key, value in state_dict.items():
        name = key
        for prefix in (
            "model.mm_projector.",
            "mm_projector.",
            "model.multi_modal_projector.",
            "multi_modal_projector.",
        ):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if name.startswith("0."):
            name = "linear_1." + name[2:]
        elif name.startswith("2."):
            name = "linear_2." + name[2:]
        if not name.startswith(("linear_1.", "linear_2.")):
            raise ValueError(
                f"rename_llava_mm_projector: {key!r} is not a key of a 2-layer mlp2x_gelu projector"
            )
        out[name] = value
    return out


class ProjectorMLP(torch.nn.Module):
    """LLaVA-1.5 ``mlp2x_gelu`` projector on the fused kernel; (..., in_features) -> (..., out_features).

    Parameter names match ``transformers``' ``LlavaMultiModalProjector`` (``linear_1``, ``linear_2``), so
    its state dict loads with ``strict=True``; LLaVA's ``mm_projector.bin`` loads through
    ``rename_llava_mm_projector`` or ``ProjectorMLP.from_llava_mm_projector``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        bias: bool = True,
        approximate: str = "none",
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.linear_1 = torch.nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.linear_2 = torch.nn.Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype)
        self.approximate = approximate
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return projector_mlp(
            x,
            self.linear_1.weight,
            self.linear_1.bias,
            self.linear_2.weight,
            self.linear_2.bias,
            approximate=self.approximate,
            backend=self.backend,
        )

    @classmethod
    def from_llava_mm_projector(cls, state_dict: dict[str, torch.Tensor], **kwargs) -> ProjectorMLP:
        """A ProjectorMLP sized from, and loaded with, a LLaVA ``mm_projector`` state dict (strict)."""
        sd = rename_llava_mm_projector(state_dict)
        hidden, in_features = sd["linear_1.weight"].shape
        out_features = sd["linear_2.weight"].shape[0]
        module = cls(in_features, hidden, out_features, bias="linear_1.bias" in sd, **kwargs)
        module.load_state_dict(sd, strict=True)
        return module

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, backend={self.backend!r}"
