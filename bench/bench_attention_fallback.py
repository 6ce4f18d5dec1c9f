"""Packed attention without flash-attn: the old dense block-causal mask vs the per-sample O(T) fallback.

    python -m bench.bench_attention_fallback              # T = 16384, CPU (or CUDA if present)
    python -m bench.bench_attention_fallback --tokens 4096

One packed micro-batch of T tokens: samples of LLaVA-665k-like lengths (lognormal around 600 tokens with
a 576-token image, clipped to [64, 2048], the last one cut to fill T exactly), GQA heads as LLaMA-3's ratio
(Hq : Hkv = 4 : 1) at a CPU-sized width (Hq = 8, D = 64; the memory of the mask does not depend on it).

Providers (both ``barnfast.models.attention.packed_attention_forward``, forward only):
- dense mask (old): ``packed_mask=block_causal_mask(cu_seqlens, T)``: a (T, T) bool mask (256 MiB at
  T = 16384) built per micro-batch, plus K/V ``repeat_interleave``d to Hq heads, then SDPA over all T x T;
- per-sample (new): causal SDPA per sample over host ``cu_seqlens``, ``enable_gqa``: no mask, no repeat.

Peak memory: each provider runs in a fresh subprocess (freed memory stays resident in the allocator's
arenas, so one process would hide the second peak); on CPU it is the peak resident set above the resident
set before the call (bench.harness.peak_memory_mb), on CUDA ``max_memory_allocated`` above the allocated
bytes before. The mask time includes building it (the old path built it once per micro-batch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import torch

from bench.harness import Table, device_name, peak_memory_mb, time_fn, write_results

HQ, HKV, D = 8, 2, 64


def sample_lengths(total: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    out = []
    while sum(out) < total:
        out.append(int(np.clip(rng.lognormal(np.log(600), 0.5), 64, 2048)))
    out[-1] -= sum(out) - total
    return [n for n in out if n > 0]


def _inputs(total: int, device: torch.device, dtype: torch.dtype):
    lengths = sample_lengths(total)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, h, total, D, generator=g).to(device, dtype) for h in (HQ, HKV, HKV))
    return lengths, cu, q, k, v


def run_one(provider: str, total: int, device: torch.device, dtype: torch.dtype) -> dict:
    from barnfast.models.attention import block_causal_mask, packed_attention_forward

    lengths, cu, q, k, v = _inputs(total, device, dtype)
    host = tuple(cu.tolist())
    mod = torch.nn.Module()

    def call():
        with torch.no_grad():
            if provider == "dense":
                return packed_attention_forward(mod, q, k, v, None, scaling=D**-0.5, cu_seqlens=cu,
                                                max_seqlen=max(lengths), packed_mask=block_causal_mask(cu, total))[0]
            return packed_attention_forward(mod, q, k, v, None, scaling=D**-0.5, cu_seqlens=cu,
                                            max_seqlen=max(lengths), cu_seqlens_host=host)[0]

    peak = peak_memory_mb(call, device)
    times = time_fn(call, device, warmup=0, reps=2)
    return {"provider": provider, "peak_mib": peak, "p50_ms": times["p50_ms"], "samples": len(lengths),
            "out_sum": float(call().float().sum())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # subprocess mode: one provider, JSON out
    a = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    device = torch.device(a.device)
    if a.one:
        print(json.dumps(run_one(a.one, a.tokens, device, dtype)))
        return
    rows = {}
    for provider in ("per_sample", "dense"):
        cmd = [sys.executable, "-m", "bench.bench_attention_fallback", "--tokens", str(a.tokens), "--dtype", a.dtype,
               "--device", a.device, "--one", provider]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[provider] = json.loads(out.strip().splitlines()[-1])
    new, old = rows["per_sample"], rows["dense"]
    mask_mib = a.tokens**2 / 2**20
    t = Table(f"packed attention forward, T={a.tokens}, {new['samples']} samples, Hq={HQ} Hkv={HKV} D={D}, "
              f"{a.dtype}, {device_name(device)}", ["provider", "peak MiB", "p50 ms"])
    t.add("dense (T, T) mask + repeated K/V (old)", old["peak_mib"], old["p50_ms"])
    t.add("per-sample SDPA, enable_gqa (new)", new["peak_mib"], new["p50_ms"])
    t.notes += [f"the (T, T) bool mask alone is {mask_mib:.0f} MiB; peak = resident set above the one before the "
                "call, each provider in a fresh process",
                f"outputs agree: sum {new['out_sum']:.6g} (new) vs {old['out_sum']:.6g} (old)",
                f"peak ratio old / new: {old['peak_mib'] / max(new['peak_mib'], 1e-9):.1f}x"]
    name = "attention_fallback"
    path = write_results([t], device, name)
    # the name for this table: attention_fallback_<CPU|CUDA>_<date>.md
    alias = path.with_name(f"{name}_{device.type.upper()}_{path.stem.rsplit('_', 1)[-1]}.md")
    alias.write_text(path.read_text())
    print(f"wrote {path} and {alias}")


if __name__ == "__main__":
    main()
