"""A PREDICTION of one stage-2 train step on A100-80G and H100-SXM, from a trace on meta tensors (no GPU).

    python -m bench.predict_gpu                  # -> bench/results/predict_gpu_<date>.md
    python -m bench.predict_gpu --token-budget 16384

What is traced. LLaMA-3-8B (``barnfast.models.backbones.from_name("llama3")``, its real config) and CLIP-L/336
(``vision.from_name("clip-l-336")``) are built on the ``meta`` device in bf16 (FSDP2's compute dtype), so
every op runs with shapes only. One optimizer step of LLaVA-1.5 fine-tuning per GPU is priced: 128 samples
per step on 8 GPUs = 16 samples per GPU, drawn from the LLaVA-665k length model of ``bench/bench_planner.py``.

- barnfast: the 16 samples packed into micro-batches of ``--token-budget`` tokens by
  ``barnfast.data.packing.plan_epoch``; per micro-batch: the frozen tower (forward, no grad), the fused
  projector (``barnfast::projector_mlp``), the merge kernel, the 32 decoder layers with varlen attention
  (per-sample causal FlashAttention), the fused linear cross-entropy over the target tokens only;
  backward through all of it.
- LLaVA recipe (the baseline): the same 16 samples as LLaVA-1.5 batches them (its
  ``group_by_modality_length`` sampler, ``bench.llava_sampler``), one padded (16, L_max) batch; the same
  tower and an eager projector (Linear, GELU, Linear), a per-sample merge (embedding + concatenation + pad,
  priced as 3 passes over the padded rows), the decoder on every padded position (FlashAttention-2 skips
  the pads inside attention only), full (16, L_max, 128256) logits upcast to fp32 and ``F.cross_entropy``.

How each op is priced. A ``TorchDispatchMode`` records every aten op with its FLOPs
(``torch.utils.flop_counter``'s formulas: matmuls, convolutions, attention) and its bytes (inputs + outputs;
views cost nothing). barnfast's custom ops run their fake (meta) kernels and are priced from the kernels'
own loops: the fused loss chunk by chunk as ``_chunked_pass`` runs it (logits GEMM, CE kernel, grad_hidden
GEMM, fp32 grad_weight accumulation), the projector's six GEMMs with their fused epilogues, the merge's one
read and one write per row. Attention is priced as FlashAttention-2: forward 4 * d * heads * sum(L_i^2) / 2
FLOPs (causal), backward 2.5x the forward. Time of an op = max(FLOPs / peak, bytes / bandwidth) (roofline,
no overlap between ops, no launch overhead, no communication: FSDP2's all-gathers and reduce-scatters
overlap the compute in both set-ups and are left out). AdamW (fp32 master weights, two moments, sharded
over 8 ranks) is priced as memory traffic once per step.

Peaks (dense, no sparsity), from the vendors' data sheets:
- A100-SXM4-80GB: bf16 tensor core 312 TFLOP/s, fp32 (no tensor core) 19.5 TFLOP/s, HBM2e 2.039 TB/s
  (NVIDIA A100 data sheet, 2021).
- H100-SXM5-80GB: bf16 tensor core 989 TFLOP/s, fp32 67 TFLOP/s, HBM3 3.35 TB/s (NVIDIA H100 data sheet).
Real kernels reach 60-80% of these; the prediction is an upper bound on speed (a lower bound on time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from barnfast.data.packing import plan_epoch
from barnfast.models import backbones, vision
from bench.bench_planner import llava665k_like_samples
from bench.llava_sampler import megabatch_chunks

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense tensor-core peak, FLOP/s
    fp32_flops: float  # CUDA-core fp32 peak, FLOP/s
    bandwidth: float  # HBM, B/s


GPUS = [GPU("A100-SXM4-80GB", 312e12, 19.5e12, 2.039e12), GPU("H100-SXM5-80GB", 989e12, 67e12, 3.35e12)]

# Assumptions of the workload, each a parameter of the model.
SAMPLES_PER_GPU = 16  # LLaVA-1.5 fine-tune: 128 per step on 8 GPUs
WORLD = 8
TARGET_FRACTION = 0.5  # assistant tokens / text tokens of a LLaVA-665k conversation (answers ~half the text)
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
            "squeeze", "reshape", "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind",
            "empty", "empty_like", "new_empty", "empty_strided", "_reshape_alias", "lift_fresh", "diagonal"}


class Ledger(TorchDispatchMode):
    """Records (phase, op, shape signature, FLOPs, bytes, fp32?) for every op dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.rows = []
        self.phase = "?"
        self.scale = 1.0  # a micro-batch priced once stands for ``scale`` identical ones

    def add(self, op: str, flops: float, nbytes: float, fp32: bool = False, phase: str | None = None):
        self.rows.append((phase or self.phase, op, flops * self.scale, nbytes * self.scale, fp32))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
        if func.namespace == "barnfast":
            _price_barnfast(self, func.name().split("::")[1].split(".")[0], args, out)
            return out
        if name in VIEW_OPS or getattr(func, "is_view", False):
            return out
        tensors = [a for a in _flat((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in _flat(out) if isinstance(o, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors + outs)
        flops = 0.0
        packet = func._overloadpacket
        if packet in flop_registry:
            flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
        fp32 = any(t.dtype == torch.float32 for t in tensors) and flops > 0
        shapes = "x".join(str(tuple(t.shape)) for t in tensors[:3])
        self.add(f"{name} {shapes}", flops, nbytes, fp32)
        return out


def _flat(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat(y)
    else:
        yield x


# ----------------------------------------------------------------------------------------------------------
# barnfast's custom ops, priced from their kernels' loops
# ----------------------------------------------------------------------------------------------------------

_TARGETS = {"n": None}  # target rows of the fused loss (the op sees all rows on meta: no compaction)


def _gemm(ledger, what, m, n, k, bytes_per=2, extra_bytes=0.0):
    ledger.add(what, 2.0 * m * n * k, bytes_per * (m * k + k * n + m * n) + extra_bytes)


def _price_barnfast(ledger, op, args, out):
    if op == "fused_linear_cross_entropy":
        hidden, weight = args[0], args[1]
        N, H = hidden.shape
        V = weight.shape[0]
        k = _TARGETS["n"] or N  # rows left after dropping ignored targets
        rows = max(256, 1 << max(0, math.ceil(math.log2(math.ceil(k / math.ceil(V / H))))))
        chunks = [rows] * (k // rows) + ([k % rows] if k % rows else [])
        for C in chunks:
            _gemm(ledger, f"flce logits GEMM ({C}x{H} @ {H}x{V})", C, V, H)
            ledger.add(f"flce CE kernel ({C}x{V}, 2 sweeps, in place)", 12.0 * C * V, 3 * 2 * C * V)
            _gemm(ledger, f"flce grad_hidden GEMM ({C}x{V} @ {V}x{H})", C, H, V)
            # grad_weight (V, H) fp32 += dlogits.T @ hidden: bf16 operands, the fp32 accumulator read and written
            ledger.add(f"flce grad_weight addmm ({V}x{C} @ {C}x{H}, fp32 acc)", 2.0 * C * V * H,
                       2 * (C * V + C * H) + 8 * V * H)
        ledger.add("flce grad_weight fp32 -> bf16", 0.0, 6 * V * H)
    elif op == "fused_linear_cross_entropy_scale_":
        grad = args[0]
        ledger.add("flce scale saved grads", 0.0, 2 * grad.numel() * grad.element_size())
    elif op == "projector_mlp":
        x, w1, w2 = args[0], args[1], args[3]
        M, n_in = x.shape
        hid, n_out = w1.shape[0], w2.shape[0]
        _gemm(ledger, f"projector fc1+GELU ({M}x{n_in} @ {n_in}x{hid}), stores h and a", M, hid, n_in,
              extra_bytes=2 * M * hid)
        _gemm(ledger, f"projector fc2 ({M}x{hid} @ {hid}x{n_out})", M, n_out, hid)
    elif op == "projector_mlp_backward":
        dy, x, w1, h, w2 = args[:5]
        needs = args[8]
        M, n_in = x.shape
        hid, n_out = w1.shape[0], w2.shape[0]
        if any(needs[:3]):
            _gemm(ledger, f"projector dh+GELU' ({M}x{n_out} @ {n_out}x{hid}), reads h, stores a", M, hid, n_out,
                  extra_bytes=4 * M * hid)
        if needs[3]:
            _gemm(ledger, f"projector dw2 ({n_out}x{M} @ {M}x{hid})", n_out, hid, M)
        if needs[0]:
            _gemm(ledger, f"projector dx ({M}x{hid} @ {hid}x{n_in})", M, n_in, hid)
        if needs[1]:
            _gemm(ledger, f"projector dw1 ({hid}x{M} @ {M}x{n_in})", hid, n_in, M)
    elif op == "merge_visual_text":
        ids, embed = args[0], args[1]
        ledger.add("merge kernel fwd", 0.0, 2 * ids.shape[0] * embed.shape[1] * embed.element_size())
    elif op == "merge_visual_text_backward":
        grad, V, need_embed = args[0], args[3], args[5]
        T, H = grad.shape
        ledger.add("merge kernel bwd (+ (V, H) zero fill)", 0.0,
                   2 * T * H * grad.element_size() + (V * H * grad.element_size() if need_embed else 0))
    else:
        raise KeyError(f"predict_gpu: no price for barnfast::{op}")


# ----------------------------------------------------------------------------------------------------------
# Attention: FlashAttention-2 varlen, priced analytically; a custom autograd function so backward is seen
# ----------------------------------------------------------------------------------------------------------

_SEQLENS = {"lens": None, "ledger": None}


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):  # q (B, heads, T, d), k/v (B, kv_heads, T, d) -> (B, T, heads, d)
        heads, d = q.shape[1], q.shape[3]
        sq = float(sum(int(n) ** 2 for n in _SEQLENS["lens"]))
        ctx.fwd_flops = 4.0 * d * heads * sq / 2  # QK^T and PV, causal
        ctx.io = sum(t.numel() * t.element_size() for t in (q, k, v)) + q.numel() * q.element_size()
        ctx.shapes = (q, k, v)
        _SEQLENS["ledger"].add(f"flash-attn varlen fwd (heads={heads}, d={d})", ctx.fwd_flops, ctx.io)
        return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])

    @staticmethod
    def backward(ctx, dout):
        # FlashAttention-2's backward: 5 matmuls of the forward's 2 (2.5x), reads q, k, v, o, do, writes dq, dk, dv
        _SEQLENS["ledger"].add("flash-attn varlen bwd", 2.5 * ctx.fwd_flops, 2 * ctx.io)
        return tuple(torch.empty_like(t) for t in ctx.shapes)


def _bench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return _VarlenAttention.apply(query, key, value), None


def _register_attention():
    from transformers import AttentionInterface

    AttentionInterface.register("bench_varlen", _bench_attention)


# ----------------------------------------------------------------------------------------------------------
# The model on meta, the two steps
# ----------------------------------------------------------------------------------------------------------


def build(llm_name="llama3", tower_name="clip-l-336"):
    import transformers

    _register_attention()
    bb, vt = backbones.from_name(llm_name), vision.from_name(tower_name)
    cfg = bb.text_config()
    cfg._attn_implementation = "bench_varlen"
    vcfg = vt.vision_config()
    vcfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        lm = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        tower = transformers.CLIPVisionModel(vcfg).to(torch.bfloat16)
        proj = torch.nn.ModuleDict({
            "linear_1": torch.nn.Linear(vt.hidden_size, bb.hidden_size, dtype=torch.bfloat16),
            "linear_2": torch.nn.Linear(bb.hidden_size, bb.hidden_size, dtype=torch.bfloat16),
        })
    tower.requires_grad_(False)
    return bb, vt, lm, tower, proj


def _vision(ledger, tower, vt, images):
    ledger.phase = "vision tower (frozen, fwd)"
    if images == 0:
        return None
    with torch.no_grad():
        px = torch.empty(images, 3, vt.image_size, vt.image_size, device="meta", dtype=torch.bfloat16)
        hs = tower(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    return hs[:, 1:]  # CLS dropped: (I, 576, 1024)


def _decoder(ledger, lm, x, lens):
    ledger.phase = "decoder fwd"
    _SEQLENS["lens"], _SEQLENS["ledger"] = lens, ledger
    T = x.shape[1]
    pos = torch.empty(1, T, device="meta", dtype=torch.long)
    rope = lm.model.rotary_emb(x, pos)
    for layer in lm.model.layers:
        x = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope)
    return lm.model.norm(x)


def barnfast_micro_batch(ledger, parts, lens, images):
    bb, vt, lm, tower, proj = parts
    pm = importlib.import_module("barnfast.kernels.projector_mlp")
    mv = importlib.import_module("barnfast.kernels.merge_visual_text")
    from barnfast.kernels import fused_linear_cross_entropy

    feats = _vision(ledger, tower, vt, images)
    T = int(sum(lens))
    embed = lm.model.embed_tokens.weight
    ledger.phase = "projector + merge fwd"
    if feats is not None:
        visual, _ = pm._projector_mlp_op(feats.reshape(-1, feats.shape[-1]), proj["linear_1"].weight,
                                         proj["linear_1"].bias, proj["linear_2"].weight, proj["linear_2"].bias,
                                         "none", True)
    else:
        visual = embed.new_zeros(0, embed.shape[1])
    ids = torch.empty(T, device="meta", dtype=torch.long)
    x = mv._merge_visual_text_op(ids, embed, visual, 0)[None]
    h = _decoder(ledger, lm, x, lens)[0]
    ledger.phase = "fused loss (fwd computes grads)"
    text = T - images * vt.num_tokens
    _TARGETS["n"] = int(TARGET_FRACTION * text)
    loss = fused_linear_cross_entropy(h, lm.lm_head.weight, torch.empty(T, device="meta", dtype=torch.long),
                                      num_target_tokens=torch.tensor(1.0, device="meta"))
    ledger.phase = "backward"
    loss.backward()
    _TARGETS["n"] = None


def llava_batch(ledger, parts, lens, images):
    bb, vt, lm, tower, proj = parts
    feats = _vision(ledger, tower, vt, images)
    B, L = len(lens), int(max(lens))
    H = bb.hidden_size
    ledger.phase = "projector + merge fwd"
    if feats is not None:
        visual = proj["linear_2"](F.gelu(proj["linear_1"](feats)))
        del visual
    # LLaVA's per-sample merge: embed the text pieces, cat with the image rows, pad to L: ~3 passes of (B, L, H)
    ledger.add("llava merge loop (embed, cat, pad)", 0.0, 3 * 2 * B * L * H * 2)
    x = torch.empty(B, L, H, device="meta", dtype=torch.bfloat16, requires_grad=True)
    h = _decoder(ledger, lm, x, lens)
    ledger.phase = "full logits + cross-entropy"
    logits = lm.lm_head(h).float()  # LLaVA's LlamaForCausalLM upcasts the logits
    labels = torch.empty(B * L, device="meta", dtype=torch.long)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels)
    ledger.phase = "backward"
    loss.backward()


def optimizer(ledger, n_params):
    ledger.phase = "AdamW (fp32 master, 2 moments, sharded over 8 ranks)"
    # read param, grad, m, v (16 B), write param, m, v (12 B), plus the bf16 copy of the param (2 B)
    ledger.add("adamw", 12.0 * n_params / WORLD, 30.0 * n_params / WORLD)


# ----------------------------------------------------------------------------------------------------------
# Pricing and the report
# ----------------------------------------------------------------------------------------------------------


def _token_free(op: str, model_dims: set[int]) -> str:
    """An op label with token counts (any number >= 2000 that is not a model dimension) written as T, so the
    same GEMM of different micro-batches adds up in the top-ops table."""
    return re.sub(r"\d{4,}", lambda m: m.group(0) if int(m.group(0)) in model_dims or int(m.group(0)) < 2000
                  else "T", op)


def price(rows, gpu: GPU, model_dims: set[int] = frozenset()):
    total, by_phase, by_op = 0.0, defaultdict(float), defaultdict(float)
    flops = 0.0
    for phase, op, f, b, fp32 in rows:
        t = max(f / (gpu.fp32_flops if fp32 else gpu.bf16_flops), b / gpu.bandwidth)
        total += t
        flops += f
        by_phase[phase] += t
        by_op[(phase, _token_free(op, model_dims))] += t
    return total, flops, by_phase, by_op


def model_flops(lens_list, images_list, bb, vt, lm, tower_model):
    """Useful FLOPs of the step (the MFU numerator), the convention of bench/bench_train_step.py: 6 N per real
    token (lm_head included, on every token) + causal attention + projector + the tower's forward."""
    n_llm = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    attn = 6 * bb.num_hidden_layers * bb.hidden_size * 1.0  # x sum L^2 (causal: half of 12 N_l H L^2)
    tower = 2 * sum(p.numel() for p in tower_model.parameters()) * vt.num_tokens  # forward only, per image
    proj = 6 * (vt.hidden_size * bb.hidden_size + bb.hidden_size ** 2) * vt.num_tokens
    f = 0.0
    for lens, images in zip(lens_list, images_list):
        f += sum(6 * n_llm * n + attn * n * n for n in lens) + images * (tower + proj)
    return f


def sample_step(seed: int, token_budget: int, tokens_per_image: int):
    """One GPU's 16 samples of a LLaVA-665k-like step: lengths, image flags, barnfast's micro-batches."""
    lens, has_image = llava665k_like_samples(4096, seed)
    lens = lens + (tokens_per_image - 576) * has_image  # the length model counts CLIP-L's 576 per image
    plan = plan_epoch(lens, global_batch=SAMPLES_PER_GPU, token_budget=token_budget, world_size=1, seed=seed)
    idx = plan.step_samples(0)
    return lens, has_image, idx, plan.micro_batches(0, 0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--llm", default="llama3", help="backbone registry name (its config only)")
    p.add_argument("--tower", default="clip-l-336", help="vision registry name (its config only)")
    p.add_argument("--steps", type=int, default=4, help="sampled steps averaged (different samples each)")
    p.add_argument("--out", type=Path, default=RESULTS / f"predict_gpu_{dt.date.today().isoformat()}.md")
    args = p.parse_args(argv)
    torch.set_grad_enabled(True)
    parts = build(args.llm, args.tower)
    bb, vt, lm, tower, proj = parts
    n_params = sum(p.numel() for p in lm.parameters()) + sum(p.numel() for p in proj.parameters())
    ledgers = {"barnfast": Ledger(), "llava recipe": Ledger()}
    useful, samples, pad_eff = 0.0, 0, []
    for s in range(args.steps):
        lens, img, idx, mbs = sample_step(s, args.token_budget, vt.num_tokens)
        with ledgers["barnfast"] as led:
            for mb in mbs:
                barnfast_micro_batch(led, parts, lens[mb].tolist(), int(img[mb].sum()))
                for prm in list(lm.parameters()) + list(proj.parameters()):
                    prm.grad = None
            optimizer(led, n_params)
        # LLaVA: the GPU's 16 samples are one of its sampler's megabatch chunks: one padded batch
        signed = np.where(img, lens, -lens)
        (batch,) = megabatch_chunks(idx, signed, 1)
        with ledgers["llava recipe"] as led:
            llava_batch(led, parts, lens[batch].tolist(), int(img[batch].sum()))
            for prm in list(lm.parameters()) + list(proj.parameters()):
                prm.grad = None
            optimizer(led, n_params)
        pad_eff.append(lens[batch].sum() / (len(batch) * lens[batch].max()))
        useful += model_flops([lens[idx].tolist()], [int(img[idx].sum())], bb, vt, lm, tower)
        samples += len(idx)
    dims = {bb.hidden_size, bb.intermediate_size, lm.lm_head.weight.shape[0], vt.hidden_size,
            bb.num_key_value_heads * bb.head_dim, 4 * vt.hidden_size}
    write_report(args, ledgers, useful, samples, float(np.mean(pad_eff)), dims)


def write_report(args, ledgers, useful, samples, pad_eff, model_dims=frozenset()):
    lines = [
        f"# PREDICTION (not a measurement): one stage-2 step, {args.llm} + {args.tower}, per GPU",
        "",
        f"Generated by `python -m bench.predict_gpu --llm {args.llm} --tower {args.tower} --token-budget "
        f"{args.token_budget} --steps {args.steps}` on "
        f"{dt.date.today().isoformat()}, torch {torch.__version__}, without a GPU: every op of the step traced on "
        "meta tensors and priced by roofline, max(FLOPs / peak, bytes / bandwidth), summed with no overlap "
        "(see the module docstring for what is and is not modelled). Real kernels reach 60-80% of peak, so "
        "real times will be longer; the ratio barnfast / LLaVA recipe is the robust number.",
        "",
        f"Workload: {args.steps} sampled steps of {SAMPLES_PER_GPU} LLaVA-665k-like samples per GPU (128 per "
        f"step on {WORLD} GPUs); barnfast packs them into micro-batches of {args.token_budget} tokens; the "
        f"LLaVA recipe pads them as one length-grouped batch (padding efficiency {pad_eff:.2f}). Targets: "
        f"{TARGET_FRACTION:.0%} of the text tokens.",
        "",
        "| GPU | set-up | step time ms | samples/s/GPU | MFU upper bound | useful TFLOP / step | "
        "executed TFLOP / step | vs LLaVA recipe |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    tops = {}
    for gpu in GPUS:
        res = {k: price(led.rows, gpu, model_dims) for k, led in ledgers.items()}
        t_llava = res["llava recipe"][0]
        for name, (t, flops, by_phase, by_op) in res.items():
            per_step = t / args.steps
            mfu = useful / t / gpu.bf16_flops
            lines.append(f"| {gpu.name} | {name} | {per_step * 1e3:.4g} | {samples / t:.4g} | {mfu:.1%} | "
                         f"{useful / args.steps / 1e12:.4g} | {flops / args.steps / 1e12:.4g} | "
                         f"{t_llava / t:.2f}x |")
            tops[gpu.name, name] = (t, by_phase, by_op)
    for (gpu, name), (t, by_phase, by_op) in tops.items():
        lines += ["", f"## {gpu}, {name}: where the time goes", "", "| phase | ms / step | share |",
                  "| --- | ---: | ---: |"]
        for ph, v in sorted(by_phase.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {ph} | {v / args.steps * 1e3:.1f} | {v / t:.1%} |")
        lines += ["", "| top ops (phase: op; T = the micro-batch's tokens) | ms / step | share |",
                  "| --- | ---: | ---: |"]
        for (ph, op), v in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]:
            lines.append(f"| {ph}: `{op[:110]}` | {v / args.steps * 1e3:.1f} | {v / t:.1%} |")
    lines += ["", "Notes:", "",
              "- MFU = useful FLOPs / time / bf16 peak, useful FLOPs by the 6N convention: the lm_head counts on "
              "every token, which barnfast's fused loss skips for non-target tokens (so barnfast can execute "
              "fewer FLOPs than it is credited with); an upper bound since the roofline assumes peak throughput.",
              "- Not modelled: communication (FSDP2 / ZeRO-3 collectives overlap compute in both), kernel launch "
              "gaps, Liger's fused RMSNorm/RoPE/SwiGLU (both traced with Hugging Face's unfused modules, so the "
              "elementwise rows are an overestimate for barnfast on CUDA), activation checkpointing (off in both; "
              "LLaVA-1.5's scripts turn it on, which would add one decoder forward to the recipe).",
              "- Vision tower: Hugging Face CLIP with SDPA on meta, all 24 layers (LLaVA takes layer -2 in both).",
              "", "Peaks used: " + "; ".join(
        f"{g.name}: bf16 {g.bf16_flops / 1e12:.0f} TFLOP/s, fp32 {g.fp32_flops / 1e12:.1f} TFLOP/s, "
        f"{g.bandwidth / 1e12:.3f} TB/s" for g in GPUS) + " (NVIDIA data sheets, dense)."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
