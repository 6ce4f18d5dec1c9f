"""Benchmark: fused linear cross-entropy, forward + backward, providers side by side.

Providers: ``reference`` (full logits in the inputs' dtype and F.cross_entropy: what a trainer does without a
fused loss), ``barnfast-torch`` (chunked PyTorch backend), ``barnfast-triton`` (GPU only), ``liger``
(``LigerFusedLinearCrossEntropyLoss``, GPU only), ``compile-reference`` (``torch.compile`` of the reference).

Shapes: LLaMA-1/2 (H=4096, V=32000) and LLaMA-3-8B (H=4096, V=128256); on GPU at N=8192 tokens in bf16, on CPU
at a small N in fp32 (2 shared cores: one H=4096 x V=128256 fwd+bwd at N=8192 would take minutes per call),
plus the CPU acceptance shape N=2048, H=512, V=128256 (target: >= 5x less peak memory than the reference at <=
1.2x its time).

Measured per provider: p20/p50/p80 time (``bench.harness.time_fn``), throughput in TFLOP/s = 6 * N * H * V / t
(the three GEMMs: logits, grad_hidden, grad_weight; softmax work not counted), and peak memory of one fwd+bwd
call above what the inputs hold (``bench.harness.peak_memory_mb``; CPU: VmHWM, CUDA: max_memory_allocated).
Every call starts with the parameters' ``.grad`` set to None, so each provider pays for allocating its
gradients.

    python bench/bench_fused_linear_cross_entropy.py                # writes bench/results/...
    python bench/bench_fused_linear_cross_entropy.py --sweep-chunk  # CPU: time/memory vs TORCH_CHUNK_ELEMS
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from barnfast.kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_ref  # noqa: E402

from bench.harness import Table, peak_memory_mb, time_fn, write_results  # noqa: E402

flce = importlib.import_module("barnfast.kernels.fused_linear_cross_entropy")

# (label, N, H, V): N on CUDA; the CPU N is in CPU_TOKENS
SHAPES = [
    ("LLaMA-1/2 (H=4096, V=32000)", 8192, 4096, 32000),
    ("LLaMA-3 (H=4096, V=128256)", 8192, 4096, 128256),
]
# CPU: sized so that the whole CPU run fits bench.run_all's 300 s on 2 shared cores (the former 256/128 tokens
# with 3 reps of every provider at the acceptance shape took > 120 s, the old limit, issue 14)
CPU_TOKENS = {32000: 128, 128256: 64}
# at the acceptance shape one reference call takes ~13 s on CPU: 2 reps, and torch.compile only at the small shapes
CPU_ACCEPTANCE_PROVIDERS = {"reference", "barnfast-torch"}
CPU_ACCEPTANCE = ("CPU acceptance (H=512, V=128256)", 2048, 512, 128256)
PROVIDERS = ["reference", "barnfast-torch", "barnfast-triton", "liger", "compile-reference"]
GPU_ONLY = {"barnfast-triton", "liger"}


def _reference(h, w, y):
    # the inputs' dtype, as a trainer without a fused loss computes it (fp32 on CPU)
    return fused_linear_cross_entropy_ref(h, w, y, upcast=False)


def make_provider(name: str):
    if name == "reference":
        return _reference
    if name == "barnfast-torch":
        return lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend="torch")
    if name == "barnfast-triton":
        return lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend="triton")
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, y: loss(w, h, y)
    if name == "compile-reference":
        return torch.compile(_reference)
    raise ValueError(name)


def fwd_bwd(fn, h, w, y):
    def call():
        h.grad = None
        w.grad = None
        fn(h, w, y).backward()

    return call


def inputs(N, H, V, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(N, H, generator=g) * 1.0).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(device)
    return h, w, y


def run_shape(table, label, N, H, V, dtype, device, reps, providers):
    h, w, y = inputs(N, H, V, dtype, device)
    results = {}
    for name in PROVIDERS:
        if name not in providers or (name in GPU_ONLY and device.type != "cuda"):
            table.add(
                label,
                N,
                name,
                None,
                None,
                None,
                None,
                None,
                "skipped: needs a CUDA GPU" if name in GPU_ONLY else "skipped",
            )
            continue
        try:
            call = fwd_bwd(make_provider(name), h, w, y)
            call()  # compile / autotune / first allocation outside the measurements
            mem = peak_memory_mb(call, device)
            t = time_fn(call, device, warmup=1, reps=reps)
        except Exception as e:  # noqa: BLE001 - an OOM or a missing provider is a row, not a crash
            table.add(label, N, name, None, None, None, None, None, f"failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        results[name] = (mem, t["p50_ms"])
        tflops = 6 * N * H * V / (t["p50_ms"] * 1e-3) / 1e12
        table.add(label, N, name, t["p20_ms"], t["p50_ms"], t["p80_ms"], tflops, mem, "")

    def ratio(a, b):  # CPU peaks can read 0 MiB when a call only reuses pages freed just before it
        return f"{a / b:.2f}x" if b > 0 else "n/a (0 MiB measured)"

    if "reference" in results and "barnfast-torch" in results:
        (m_ref, t_ref), (m_ours, t_ours) = results["reference"], results["barnfast-torch"]
        table.notes.append(
            f"{label}, N={N}: reference peak memory / barnfast-torch peak memory = {ratio(m_ref, m_ours)}; "
            f"barnfast-torch time = {t_ours / t_ref:.2f}x the reference's"
        )
    if "liger" in results and "barnfast-triton" in results:
        (m_l, t_l), (m_t, t_t) = results["liger"], results["barnfast-triton"]
        table.notes.append(
            f"{label}, N={N}: barnfast-triton {t_l / t_t:.2f}x faster than Liger, peak memory {ratio(m_t, m_l)} Liger's"
        )
    del h, w, y


def sweep_chunk(device):
    """CPU tuning of TORCH_CHUNK_ELEMS at the acceptance shape (the measured reason next to the constant)."""
    _, N, H, V = CPU_ACCEPTANCE
    h, w, y = inputs(N, H, V, torch.float32, device)
    table = Table(
        "TORCH_CHUNK_ELEMS sweep, barnfast-torch, fp32 fwd+bwd, N=2048 H=512 V=128256",
        ["chunk elems", "rows/chunk", "p50 ms", "peak MiB"],
    )
    ref = fwd_bwd(_reference, h, w, y)
    t = time_fn(ref, device, warmup=1, reps=3)
    table.add("reference", "—", t["p50_ms"], peak_memory_mb(ref, device))
    for log2 in (21, 22, 23, 24, 25):
        flce.TORCH_CHUNK_ELEMS = 2**log2
        call = fwd_bwd(make_provider("barnfast-torch"), h, w, y)
        t = time_fn(call, device, warmup=1, reps=3)
        table.add(f"2**{log2}", 2**log2 // V, t["p50_ms"], peak_memory_mb(call, device))
    print(table.markdown())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-chunk", action="store_true", help="CPU: sweep TORCH_CHUNK_ELEMS and print, no file")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_grad_enabled(True)
    if args.sweep_chunk:
        sweep_chunk(device)
        return
    providers = set(args.providers.split(","))
    cols = ["shape", "N", "provider", "p20 ms", "p50 ms", "p80 ms", "TFLOP/s", "peak MiB", "note"]
    tables = []
    if device.type == "cuda":
        table = Table("fused linear cross-entropy, bf16, fwd+bwd", cols)
        for label, N, H, V in SHAPES:
            run_shape(table, label, N, H, V, torch.bfloat16, device, reps=10, providers=providers)
        tables.append(table)
    else:
        table = Table("fused linear cross-entropy, fp32, fwd+bwd, CPU", cols)
        run_shape(table, *CPU_ACCEPTANCE, torch.float32, device, reps=2,
                  providers=providers & CPU_ACCEPTANCE_PROVIDERS)
        for label, _, H, V in SHAPES:
            run_shape(table, label, CPU_TOKENS[V], H, V, torch.float32, device, reps=3, providers=providers)
        table.notes.append(
            "CPU: N reduced for the H=4096 shapes (2 shared cores, a few seconds per call); "
            "times are CPU timings and say nothing about a GPU"
        )
        table.notes.append(
            f"TORCH_CHUNK_ELEMS = 2**{flce.TORCH_CHUNK_ELEMS.bit_length() - 1}; targets all valid "
            "(no ignore_index), which does not flatter barnfast's skipping of ignored rows"
        )
        tables.append(table)
    write_results(tables, device, "bench_fused_linear_cross_entropy")


if __name__ == "__main__":
    main()
