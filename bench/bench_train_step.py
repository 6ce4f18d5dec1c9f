"""Whole train steps, three ways side by side: barnfast packed vs Hugging Face padded vs the LLaVA recipe.

    python -m bench.bench_train_step            # CPU: tiny width, LLaMA-3 vocabulary (128256)
    python -m bench.bench_train_step --gpu      # CUDA: real-width layer stack in bf16, MFU (auto on CUDA)

Every provider trains the same model (same weights, built once from one seed), on the same samples in
the same steps (one global batch of ``--global-batch`` samples per step, planned by
``barnfast.data.packing.plan_epoch``), with the same AdamW, for ``--steps`` timed steps after one warm-up
step (which also allocates the optimizer state). Stage 2: projector and LLM train, the vision tower
is frozen. All three normalise by the step's target-token count, so their step-0 losses are equal
(checked: the "step-0 loss" column).

Providers:
(a) barnfast: the step's samples packed into micro-batches of at most ``--token-budget`` tokens
    (the planner), merge kernel, attention isolated per sample, fused linear cross-entropy.
(b) hf padded: a plain ``LlavaForConditionalGeneration`` (SDPA attention, the same state dict), its
    own forward with ``input_ids``, ``pixel_values``, ``attention_mask``, ``labels`` and its own loss
    (full (B, S, V) logits, upcast to fp32), ``num_items_in_batch`` = the step's target count;
    micro-batches of ``--micro-batch`` samples, right-padded, in data order (HF's default sampler,
    no length grouping).
(c) llava recipe: :meth:`barnfast.models.vlm.LlavaVLM.forward_padded` (per-sample merge loop, padded
    batch, full logits, ``F.cross_entropy``), Liger reverted on CUDA, on micro-batches formed the way
    LLaVA-1.5's ``group_by_modality_length`` sampler forms a megabatch's batches
    (``bench.llava_sampler.megabatch_chunks``: the step's samples sorted by length, longest first, split
    into ``global_batch / micro_batch`` chunks of near-equal total length; LLaVA's world size for the
    split is ranks x accumulation steps). The step's samples stay those of (a) and (b), so the step-0
    losses still compare; LLaVA's sampler would also keep each megabatch to one modality.
Each provider runs in its own process, so the CPU peak-memory numbers (resident set) do not see
another provider's allocator caches.

Length distribution, modelled on LLaVA-665k's (counted in text tokens of the real data, then
multiplied by ``--text-scale``): 85% single-turn short answers (question 10-40 tokens, answer 5-40,
plus ~30 tokens of template), 10% multi-turn conversations of 2-6 turns with 100-600 text tokens,
5% a long tail, log-uniform from 600 to 2000 tokens. 6% of samples are text-only; the others hold
one image of ``vision.num_tokens`` tokens. Labels cover the answers only, as the chat template does.
On CPU the text is scaled by 1/4 and the image is clip-tiny's 16 tokens (CLIP-L/336's is 576), so a
step stays around a second; on GPU the text is unscaled and the image is 576 tokens (a 2-layer,
32-wide CLIP at 336 px: the vision tower's cost is not what is measured).

Metrics: real tokens/s = non-pad tokens of the timed steps / their wall time; padding efficiency =
real / computed tokens (``barnfast.data.packing.padding_efficiency``; 1.0 by construction when packed,
the column "budget fill" then gives real tokens / (micro-batches x token budget)); peak memory from
``bench.harness.peak_memory_mb`` over the timed steps (CPU: resident set above the post-warm-up
level; CUDA: max allocated above the level before). MFU (CUDA only) = model FLOPs of the real tokens
/ time / the GPU's dense bf16 peak, with

    FLOPs = sum over samples s of [ 6 * N_llm * L_s + 6 * n_layers * H * L_s**2 ]
            + 6 * N_proj * visual_tokens + 2 * N_vision * vision_tokens

N_llm: trainable LLM parameters used as matmuls (layers + lm_head, not the embedding lookup);
6 * n_layers * H * L**2: causal attention, QK^T and PV (2 * 2 * L**2 * H forward, halved by the
causal mask, x3 for forward + backward); the frozen vision tower runs forward only. Padding and
masked-out positions are not counted: work spent on them is waste, which MFU should show.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import time

import numpy as np
import torch

from barnfast.data.batch import IGNORE_INDEX, collate_packed, collate_padded
from barnfast.data.packing import padding_efficiency, plan_epoch
from barnfast.models import backbones, vision
from barnfast.models.liger import revert_liger
from barnfast.models.vlm import build_model
from bench.harness import Table, device_name, peak_memory_mb, time_fn, write_results
from bench.llava_sampler import megabatch_chunks

PROVIDERS = {"a": "(a) barnfast packed", "b": "(b) hf padded", "c": "(c) llava recipe"}
# Dense bf16 peak TFLOP/s (no sparsity), from the vendors' data sheets; matched on the device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}
TEMPLATE_TOKENS = 30  # system prompt + role tags of one conversation (Vicuna / LLaMA-3 templates: 25-40)


# -- samples ---------------------------------------------------------------------------------------
def llava665k_like(n: int, image_tokens: int, image_token_id: int, vocab: int, text_scale: float, seed: int):
    """``n`` samples (ids, labels, has_image) following the distribution in the module docstring."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.85:  # one short question, one short answer
            turns = [(int(rng.integers(10, 41)), int(rng.integers(5, 41)))]
        else:
            total = rng.integers(100, 601) if u < 0.95 else np.exp(rng.uniform(np.log(600), np.log(2000)))
            k = int(rng.integers(2, 7))
            share = rng.dirichlet(np.ones(2 * k)) * total
            turns = [(max(1, int(share[2 * i])), max(1, int(share[2 * i + 1]))) for i in range(k)]
        has_image = rng.random() >= 0.06
        ids, labels = [], []
        head = max(1, round(TEMPLATE_TOKENS * text_scale))
        ids.append(rng.integers(3, vocab, head))
        labels.append(np.full(head, IGNORE_INDEX))
        if has_image:
            ids.append(np.full(image_tokens, image_token_id))
            labels.append(np.full(image_tokens, IGNORE_INDEX))
        for q, a in turns:
            q, a = max(1, round(q * text_scale)), max(1, round(a * text_scale))
            ids += [rng.integers(3, vocab, q), rng.integers(3, vocab, a)]
            labels += [np.full(q, IGNORE_INDEX), ids[-1]]
        out.append((np.concatenate(ids).astype(np.int32), np.concatenate(labels).astype(np.int32), has_image))
    return out


# -- model -----------------------------------------------------------------------------------------
def make_model(gpu: bool, layers: int, seed: int = 0):
    """(barnfast LlavaVLM, tokenizer, backbone, vision tower) for the CPU or the GPU setting."""
    bb = backbones.from_name("llama3-tiny")  # LLaMA-3 vocabulary (128256) and template, tiny width
    vt = vision.from_name("clip-tiny")
    if gpu:
        real = backbones.from_name("llama3")
        bb = dataclasses.replace(
            bb,
            hidden_size=real.hidden_size,
            intermediate_size=real.intermediate_size,
            num_attention_heads=real.num_attention_heads,
            num_key_value_heads=real.num_key_value_heads,
            num_hidden_layers=layers,
        )
        vt = dataclasses.replace(vt, image_size=336)  # 576 visual tokens, as CLIP-L/336
    dtype = torch.bfloat16 if gpu else torch.float32
    model, tok = build_model(bb, vt, seed=seed, dtype=dtype, kernel_backend="auto")
    return model, tok, bb, vt


def hf_twin(model):
    """A plain ``LlavaForConditionalGeneration`` with SDPA attention holding the same weights."""
    from transformers import LlavaForConditionalGeneration

    config = copy.deepcopy(model.hf.config)
    config.text_config._attn_implementation = "sdpa"
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    dtype = next(model.parameters()).dtype
    hf = LlavaForConditionalGeneration(config).to(dtype)
    missing, unexpected = hf.load_state_dict(model.hf.state_dict(), strict=True)
    assert not missing and not unexpected
    return hf


def flops_per_step(samples, model) -> float:
    """Model FLOPs of real tokens (formula in the module docstring)."""
    lm = model.language_model
    cfg = lm.config
    n_llm = (
        sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
        + model.lm_head.weight.numel()
    )
    n_proj = sum(p.numel() for p in model.projector.parameters())
    n_vis = sum(p.numel() for p in model.vision_tower.parameters())
    P = model.vision.num_tokens
    total = 0.0
    for ids, _, has_image in samples:
        L = len(ids)
        total += 6 * n_llm * L + 6 * cfg.num_hidden_layers * cfg.hidden_size * L * L
        if has_image:
            total += 6 * n_proj * P + 2 * n_vis * (P + 1)
    return total


def peak_tflops(name: str) -> float | None:
    for key, v in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return v
    return None


# -- one provider, in its own process ---------------------------------------------------------------
def run_provider(args) -> dict:
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.manual_seed(0)
    model, tok, bb, vt = make_model(args.gpu, args.layers)
    pad_id = tok.pad_token_id or 0
    n = args.global_batch * (args.steps + 1)
    samples = llava665k_like(
        n, vt.num_tokens, model.image_token_id, bb.vocab_size - 256, args.text_scale, seed=1
    )
    lengths = np.array([len(s[0]) for s in samples])
    plan = plan_epoch(lengths, global_batch=args.global_batch, token_budget=args.token_budget, seed=0)
    S = vt.image_size
    gen = torch.Generator().manual_seed(2)
    pixels = [torch.randn(1, 3, S, S, generator=gen) if s[2] else None for s in samples]

    model.set_trainable(projector=True, llm=True)
    if args.provider == "b":
        net = hf_twin(model)
        net.model.vision_tower.requires_grad_(False)
        del model
    else:
        net = model
        if args.provider == "c":  # the recipe's decoder is plain Hugging Face: no Liger (CUDA) either
            revert_liger(model.language_model)
    net.to(device).train()
    opt = torch.optim.AdamW(
        [p for p in net.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0
    )

    def micro_batches(step):
        """(micro-batches, their per-sample lengths) of the step for this provider."""
        idx = plan.step_samples(step)
        if args.provider == "a":
            groups = plan.micro_batches(step, 0)
        elif args.provider == "c":
            signed = np.where([s[2] for s in samples], lengths, -lengths)
            groups = megabatch_chunks(idx, signed, max(1, len(idx) // args.micro_batch))
        else:
            groups = [idx[i : i + args.micro_batch] for i in range(0, len(idx), args.micro_batch)]
        return groups, [lengths[g] for g in groups]

    def gather(g):
        return (
            [samples[i][0] for i in g],
            [samples[i][1] for i in g],
            [pixels[i] for i in g],
            [str(i) for i in g],
        )

    # Built before timing: collation is the data loader's job, in its workers.
    steps = []
    for step in range(args.steps + 1):
        groups, lens = micro_batches(step)
        mbs = []
        for g in groups:
            ids, labels, pix, names = gather(g)
            if args.provider == "a":
                mbs.append(collate_packed(ids, labels, pix, names).to(device))
            else:
                pb = collate_padded(ids, labels, pix, names, pad_id=pad_id).to(device)
                raw = torch.full_like(pb.input_ids, IGNORE_INDEX)  # HF shifts labels itself
                for r, lab in enumerate(labels):
                    raw[r, : len(lab)] = torch.from_numpy(lab.astype(np.int64))
                mbs.append((pb, raw))
        n_targets = sum(int((samples[i][1][1:] != IGNORE_INDEX).sum()) for i in plan.step_samples(step))
        steps.append((mbs, lens, torch.tensor(float(n_targets), device=device)))

    def train_step(k):
        mbs, _, n_targets = steps[k]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for mb in mbs:
            if args.provider == "a":
                loss = net(mb, n_targets)
            elif args.provider == "c":
                loss = net.forward_padded(mb[0], n_targets)
            else:
                pb, raw = mb
                loss = net(
                    input_ids=pb.input_ids,
                    pixel_values=pb.pixel_values,
                    attention_mask=pb.attention_mask,
                    labels=raw,
                    num_items_in_batch=n_targets,
                ).loss
            loss.backward()
            total += loss.detach()
        opt.step()
        return float(total)

    step0_loss = train_step(0)  # warm-up: allocator, kernels' autotuning, AdamW state
    times, counter = [], iter(range(1, args.steps + 1))

    def timed():
        t0 = time.perf_counter()
        train_step(next(counter))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    pct = {}
    peak = peak_memory_mb(lambda: pct.update(time_fn(timed, device, warmup=0, reps=args.steps)), device)
    timed_idx = range(1, args.steps + 1)
    real = sum(int(sum(ln.sum() for ln in steps[k][1])) for k in timed_idx)
    all_lens = [ln for k in timed_idx for ln in steps[k][1]]
    eff = padding_efficiency(all_lens, packed=args.provider == "a")
    fill = real / (len(all_lens) * args.token_budget) if args.provider == "a" else None
    secs = sum(times)
    flops = None  # (b)'s modules are the same; the driver gives it (a)'s count
    if args.gpu and args.provider != "b":
        flops = sum(flops_per_step([samples[i] for i in plan.step_samples(k)], net) for k in timed_idx)
    return {
        "provider": args.provider,
        "step0_loss": step0_loss,
        "real_tokens": real,
        "seconds": secs,
        "tokens_per_s": real / secs,
        "padding_efficiency": eff,
        "budget_fill": fill,
        "peak_mb": peak,
        "step_ms": pct,
        "micro_batches": len(all_lens),
        "flops": flops,
    }


# -- driver ----------------------------------------------------------------------------------------
def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--gpu", action="store_true", default=cuda, help="real-width layer stack in bf16 (auto on CUDA)"
    )
    ap.add_argument("--cpu", dest="gpu", action="store_false")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (CPU 6, GPU 10)")
    ap.add_argument("--global-batch", type=int, default=None, help="samples per step (CPU 16, GPU 32)")
    ap.add_argument("--micro-batch", type=int, default=4, help="samples per padded micro-batch, (b) and (c)")
    ap.add_argument("--token-budget", type=int, default=None, help="tokens per packed micro-batch, (a)")
    ap.add_argument("--text-scale", type=float, default=None, help="text length multiplier (CPU 0.25, GPU 1)")
    ap.add_argument("--layers", type=int, default=4, help="GPU: decoder layers of the real-width stack")
    ap.add_argument("--providers", default="abc")
    ap.add_argument("--provider", help=argparse.SUPPRESS)  # internal: run one provider, print JSON
    args = ap.parse_args()
    gpu = args.gpu
    args.steps = args.steps or (10 if gpu else 6)
    args.global_batch = args.global_batch or (32 if gpu else 16)
    args.token_budget = args.token_budget or (16384 if gpu else 2048)
    args.text_scale = args.text_scale or (1.0 if gpu else 0.25)
    if args.provider:
        print("RESULT " + json.dumps(run_provider(args)))
        return

    results = {}
    for p in args.providers:
        cmd = [
            sys.executable,
            "-m",
            "bench.bench_train_step",
            "--provider",
            p,
            "--gpu" if gpu else "--cpu",
            "--steps",
            str(args.steps),
            "--global-batch",
            str(args.global_batch),
            "--micro-batch",
            str(args.micro_batch),
            "--token-budget",
            str(args.token_budget),
            "--text-scale",
            str(args.text_scale),
            "--layers",
            str(args.layers),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            raise RuntimeError(f"provider {p} failed:\n{out.stderr[-4000:]}")
        results[p] = json.loads(line[0][7:])
        print(f"{PROVIDERS[p]}: {results[p]}", flush=True)

    device = "cuda" if gpu else "cpu"
    name = device_name(device)
    peak = peak_tflops(name) if gpu else None
    cols = [
        "provider",
        "real tokens/s",
        "x vs (b)",
        "x vs (c)",
        "padding eff.",
        "budget fill",
        "peak MiB",
        "mem / (b)",
        "step p50 ms",
        "micro-batches",
        "step-0 loss",
        "MFU",
    ]
    table = Table(f"train step ({'GPU real width' if gpu else 'CPU tiny width'}, LLaMA-3 vocab)", cols)
    base_b, base_c = results.get("b"), results.get("c")
    for p, r in results.items():
        flops = r["flops"] if r["flops"] is not None else (results.get("a") or {}).get("flops")
        mfu = flops / r["seconds"] / (peak * 1e12) if (peak and flops) else None
        table.add(
            PROVIDERS[p],
            r["tokens_per_s"],
            r["tokens_per_s"] / base_b["tokens_per_s"] if base_b else None,
            r["tokens_per_s"] / base_c["tokens_per_s"] if base_c else None,
            r["padding_efficiency"],
            r["budget_fill"],
            r["peak_mb"],
            r["peak_mb"] / base_b["peak_mb"] if base_b else None,
            r["step_ms"]["p50_ms"],
            r["micro_batches"],
            f"{r['step0_loss']:.6f}",
            mfu,
        )
    table.notes += [
        f"{args.steps} timed steps after 1 warm-up, {args.global_batch} samples/step, AdamW; (a) token "
        f"budget {args.token_budget}, (b)/(c) {args.micro_batch} samples per padded micro-batch; "
        f"text scale {args.text_scale}.",
        "LLaVA-665k-like lengths: 85% single-turn short, 10% multi-turn 100-600, 5% tail 600-2000 "
        "text tokens (x text scale); 6% text-only; see the module docstring.",
        "Same weights, samples, steps and normaliser for all: the step-0 losses agree (to fp32 "
        "rounding) when the three compute the same thing.",
    ]
    if not gpu:
        table.notes += [
            "CPU: wall times on a 2-core machine shared with other jobs (noisy, +-30% between runs); "
            "the ratios come from (b)'s padding (micro-batches in data order), (c)'s (LLaVA's "
            "length-grouped micro-batches: less padding than (b), see 'padding efficiency') and their "
            "full (B, S, 128256) fp32 logits, which (a) never builds. Peak memory is the resident set.",
            "(a)'s padding efficiency is 1.0 by construction (packed, varlen attention computes no "
            "pad); 'budget fill' shows how full its micro-batches are.",
        ]
    if gpu:
        table.notes.append(
            f"MFU over dense bf16 peak {peak} TFLOP/s for '{name}'; FLOPs of real tokens only "
            "(formula in the module docstring); the same FLOPs for every provider."
        )
    if base_b and "a" in results:
        a = results["a"]
        speed, mem = a["tokens_per_s"] / base_b["tokens_per_s"], a["peak_mb"] / base_b["peak_mb"]
        ok = speed >= 1.5 and mem <= 0.5 and a["padding_efficiency"] >= 0.95
        table.notes.append(
            f"Targets (a) >= 1.5x (b) real tokens/s: {speed:.2f}x; (a) <= 0.5x (b) peak memory: {mem:.2f}x; "
            f"(a) padding efficiency >= 0.95: {a['padding_efficiency']:.3f} -> {'MET' if ok else 'NOT MET'}."
        )
    write_results([table], device, "bench_train_step")


if __name__ == "__main__":
    main()
